"""Quantize the trainable variables of a TensorFlow checkpoint and save it beside the original.

Example::

    adjq-quantize-checkpoint runs/resnet/model.ckpt-100 --algorithm bin --bits 8

writes ``runs/resnet/bin_8bits/model.ckpt-100`` (plus a ``checkpoint`` state file) and prints the
per-variable relative errors' minimum, maximum and unweighted average.

``--algorithm uint8`` stores a float variable in 8 bits only if it has at least ``--min_size``
elements (default 1024, the ``minimum_size`` of TensorFlow's ``quantize_weights`` transform);
smaller ones stay float, bit for bit, and the report says how many of each there are.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter

from adj_quant.cli.start import start
from adj_quant.errors import OneLineParser, UserError, cli_main
from adj_quant.seed_quantizers.formulas import ALGORITHMS, UINT8_MIN_SIZE  # numpy only
from adj_quant.seed_quantizers.variables import BELOW_MIN_SIZE


def build_parser():
    p = OneLineParser(
        prog="adjq-quantize-checkpoint",
        description=(
            "Quantize every trainable float variable of a checkpoint (TF2 object or TF1/slim "
            "name-based; for uint8 only those with at least --min_size elements), copy "
            "everything else unchanged, and save the result to "
            "<checkpoint dir>/bin_<B>bits/, <checkpoint dir>/fixed-point_<B>bits/ or "
            "<checkpoint dir>/uint8/."
        ),
        epilog=__doc__.split("\n\n", 1)[1],  # the example command and what it writes
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint prefix (e.g. dir/model.ckpt-100) or a directory (its latest "
        "checkpoint is used)",
    )
    p.add_argument(
        "--algorithm",
        required=True,
        choices=ALGORITHMS,
        help="bin: 2^B equal bins between min and max, values become bin centres; "
        "fixed-point: decimal-shifted fixed point with B bits, saturating both sides; "
        "uint8: 8-bit affine storage (uint8 + per-tensor min/max, about 4x smaller)",
    )
    p.add_argument(
        "--bits",
        type=int,
        default=None,
        metavar="B",
        help="bits per value: 1..16 for bin, 2..32 for fixed-point; uint8 needs none (or 8)",
    )
    p.add_argument(
        "--min_size",
        "--min-size",
        dest="min_size",
        metavar="N",
        default=None,
        help=f"uint8 only: store a float variable in 8 bits only if it has at least N elements "
        f"(default {UINT8_MIN_SIZE}, like the minimum_size of TensorFlow's quantize_weights "
        "transform); smaller ones (biases, batch-norm vectors) are copied unchanged; 0 stores "
        "every one in 8 bits",
    )
    p.add_argument(
        "--output",
        metavar="DIR",
        default=None,
        help="output directory (default: <checkpoint dir>/<algorithm>_<B>bits, or "
        "<checkpoint dir>/uint8)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory if it exists (atomically); without it an existing "
        "one is refused",
    )
    p.add_argument(
        "--include-optimizer-slots",
        action="store_true",
        help="also quantize optimizer slots and moving-average shadows (copied unchanged by "
        "default)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (output, algorithm, bits, counts, min/max/avg error, "
        "per-variable errors; for uint8 also min_size, num_8bit, num_left_float and "
        "left_float) instead of text, and no progress bar",
    )
    return p


def parse_min_size(text):
    """``--min_size`` text -> int (``None`` stays ``None``); a non-integer is one UserError line."""
    if text is None:
        return None
    if not re.fullmatch(r"\s*[+-]?[0-9]+\s*", text):
        raise UserError(
            f"--min_size {text!r} is not an integer; pass a whole number of elements >= 0 "
            f"(default {UINT8_MIN_SIZE})"
        )
    return int(text)


def _plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    start()
    from adj_quant.seed_quantizers import checkpoint_quantizer as ckpt_quant  # noqa: PLC0415
    from adj_quant.seed_quantizers import formulas  # noqa: PLC0415

    # Cheap checks first: bad flags are reported before TensorFlow is imported.
    bits = formulas.check_bits(args.algorithm, args.bits)
    min_size = formulas.check_min_size(args.algorithm, parse_min_size(args.min_size))
    prefix = ckpt_quant.resolve_checkpoint(args.checkpoint)

    progress = None
    if not args.json:
        from tqdm import tqdm  # noqa: PLC0415

        def progress(keys):
            return tqdm(keys, desc="variables", unit="var", file=sys.stderr,
                        disable=not sys.stderr.isatty())  # no bar frames in log files

    result = ckpt_quant.quantize_checkpoint(
        prefix,
        args.algorithm,
        bits,
        output_dir=args.output,
        overwrite=args.overwrite,
        include_optimizer_slots=args.include_optimizer_slots,
        progress=progress,
        min_size=min_size,
    )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, sort_keys=False))
    else:
        print(
            f"Processed {summary['num_quantized'] + summary['num_copied']} variables: "
            f"{summary['num_quantized']} quantized, {summary['num_copied']} copied unchanged"
        )
        if args.algorithm == "uint8":
            print(
                f"Stored in 8 bits: {_plural(summary['num_8bit'], 'variable')} "
                f"(float, at least --min_size {summary['min_size']} elements)"
            )
            why = Counter(summary["left_float"].values())
            label = {BELOW_MIN_SIZE: "below --min_size"}
            detail = ", ".join(f"{n} {label.get(kind, kind)}" for kind, n in sorted(why.items()))
            left = _plural(summary["num_left_float"], "variable")
            print(f"Left float: {left}" + (f" ({detail})" if detail else ""))
        print(f"Output: {summary['output']}")
        print(f"Min error: {summary['min_error']:.4f}%")
        print(f"Max error: {summary['max_error']:.4f}%")
        print(f"Avg error: {summary['avg_error']:.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
