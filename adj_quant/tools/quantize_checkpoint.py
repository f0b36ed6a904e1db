"""Quantize the trainable variables of a TensorFlow checkpoint and save it beside the original.

Example::

    python -m adj_quant.tools.quantize_checkpoint runs/resnet/model.ckpt-100 --algorithm bin --bits 8

writes ``runs/resnet/bin_8bits/model.ckpt-100`` (plus a ``checkpoint`` state file) and prints the
per-variable relative errors' minimum, maximum and unweighted average.
"""

from __future__ import annotations

import argparse
import json
import sys

from adj_quant.ckpt_quant import ALGORITHMS  # numpy only; TensorFlow is imported lazily
from adj_quant.errors import cli_main


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m adj_quant.tools.quantize_checkpoint",
        description=(
            "Quantize every trainable float variable of a checkpoint (TF2 object or TF1/slim "
            "name-based), copy everything else unchanged, and save the result to "
            "<checkpoint dir>/bin_<B>bits/, <checkpoint dir>/fixed-point_<B>bits/ or "
            "<checkpoint dir>/uint8/."
        ),
    )
    p.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="checkpoint prefix (e.g. dir/model.ckpt-100) or a directory (its latest checkpoint is used)",
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
        "--output",
        metavar="DIR",
        default=None,
        help="output directory (default: <checkpoint dir>/<algorithm>_<B>bits, or <checkpoint dir>/uint8)",
    )
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the output directory if it exists (atomically); without it an existing one is refused",
    )
    p.add_argument(
        "--include-optimizer-slots",
        action="store_true",
        help="also quantize optimizer slots and moving-average shadows (copied unchanged by default)",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (output, algorithm, bits, counts, min/max/avg error, per-variable errors) "
        "instead of text, and no progress bar",
    )
    return p


@cli_main
def main(argv=None):
    args = build_parser().parse_args(argv)
    from adj_quant import ckpt_quant  # noqa: PLC0415

    # Cheap checks first: bad flags are reported before TensorFlow is imported.
    bits = ckpt_quant.check_bits(args.algorithm, args.bits)
    prefix = ckpt_quant.resolve_checkpoint(args.checkpoint)

    progress = None
    if not args.json:
        from tqdm import tqdm  # noqa: PLC0415

        def progress(keys):
            return tqdm(keys, desc="variables", unit="var", file=sys.stderr)

    result = ckpt_quant.quantize_checkpoint(
        prefix,
        args.algorithm,
        bits,
        output_dir=args.output,
        overwrite=args.overwrite,
        include_optimizer_slots=args.include_optimizer_slots,
        progress=progress,
    )
    summary = result.summary()
    if args.json:
        print(json.dumps(summary, sort_keys=False))
    else:
        print(
            f"Processed {summary['num_quantized'] + summary['num_copied']} variables: "
            f"{summary['num_quantized']} quantized, {summary['num_copied']} copied unchanged"
        )
        print(f"Output: {summary['output']}")
        print(f"Min error: {summary['min_error']:.4f}%")
        print(f"Max error: {summary['max_error']:.4f}%")
        print(f"Avg error: {summary['avg_error']:.4f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
