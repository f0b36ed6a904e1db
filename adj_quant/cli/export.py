"""Export a checkpoint to TFLite (float, dynamic-range, int8, adjustable), a SavedModel or a
packed adjq file (weights at their learned bits).

    adjq-export --ckpt_path runs/digits/qat8 --format tflite --quantization int8
    adjq-export --ckpt_path runs/digits/finetune --format tflite --quantization adjustable --eval
    adjq-export --ckpt_path runs/digits/finetune --format packed
    adjq-export --from packed --ckpt_path runs/digits/finetune/model_packed.safetensors \\
        --quantization adjustable
    python eval.py --tflite runs/digits/finetune/model_adjustable.tflite

The export is :func:`adj_quant.recipe.export.export` (the conversion itself is in
:mod:`adj_quant.tflite_export`, the interpreter in :mod:`adj_quant.tflite_runner`).
Installed as ``adjq-export``.
"""

from __future__ import annotations

import argparse

from adj_quant.cli.start import start
from adj_quant.errors import UserError, cli_main
from adj_quant.recipe.config import build_parser
from adj_quant.recipe.evaluation import evaluate_tflite
from adj_quant.recipe.export import (
    DATA_FIELDS,
    DEFAULT_REPRESENTATIVE,
    FORMATS,
    SOURCES,
    export,
)
from adj_quant.tflite_export import QUANTIZATIONS

EXTRA = {
    "--ckpt_path": dict(metavar="PATH", required=True,
                        help="checkpoint to export: a prefix, or a run's stage directory (its "
                             "best checkpoint); a float (pretrain) or quantized (qat8, "
                             "adjustable, finetune) model. With --from packed: the packed file"),
    "--from": dict(choices=SOURCES, default="checkpoint", dest="source",
                   help="checkpoint: --ckpt_path is a checkpoint; packed: --ckpt_path is a "
                        "packed file (--format packed) to convert to tflite or saved_model"),
    "--format": dict(choices=FORMATS, default="tflite",
                     help="tflite: a .tflite flatbuffer; saved_model: a SavedModel directory of "
                          "the same BN-folded inference function (float or adjustable only); "
                          "packed: one safetensors file with every weight at its learned bits "
                          "(quantized checkpoints; no --quantization)"),
    "--quantization": dict(choices=QUANTIZATIONS, default=None,
                           help="(tflite and saved_model) float: no quantization; dynamic: int8 "
                                "weights, float activations; int8: full-integer post-training "
                                "quantization calibrated on --representative_images training "
                                "images; adjustable: full-integer with the learned weight "
                                "levels (INT4 tensors where they fit, see --int4) and "
                                "activation ranges of a quantized checkpoint"),
    "--int4": dict(action=argparse.BooleanOptionalAction, default=True,
                   help="with --quantization adjustable: store a conv / depthwise weight "
                        "tensor as INT4 when every channel's learned levels fit in [-7, 7] "
                        "(--no-int4: every tensor INT8)"),
    "--int4_split": dict(action=argparse.BooleanOptionalAction, default=True,
                         help="with --int4: a conv with only some channels that fit INT4 "
                              "becomes an INT4 op and an INT8 op, concatenated and gathered "
                              "back into order (--no-int4_split: such a conv stays one INT8 "
                              "op; fewer ops, a larger file)"),
    "--remove_channels": dict(action=argparse.BooleanOptionalAction, default=True,
                              help="(a pruned quantized checkpoint) leave out of the exported "
                                   "graph the channels pruning removed, with the channels "
                                   "that only they fed or read (a depthwise channel, an SE "
                                   "gate channel, a consumer's input channel); the logits "
                                   "do not change (--no-remove_channels: keep them as zeros)"),
    "--output": dict(metavar="PATH",
                     help="output file (tflite) or directory (saved_model) (default: "
                          "<ckpt dir>/model_<quantization>.tflite or "
                          "<ckpt dir>/saved_model_<quantization>/)"),
    "--representative_images": dict(type=int, metavar="N", default=DEFAULT_REPRESENTATIVE,
                                     help="training images that calibrate the int8 activation "
                                          "ranges (int8 and adjustable)"),
    "--overwrite": dict(action="store_true",
                        help="replace an existing output (atomically); without it an existing "
                             "output is refused"),
    "--eval": dict(action="store_true", dest="evaluate",
                   help="after a tflite export, evaluate the file in the TFLite interpreter on "
                        "the validation split and print top-1/top-5"),
}


# --------------------------------------------------------------------------- CLI


DATA_HELP = {
    "dataset": "'digits', 'synthetic', or a directory of slim ImageNet TFRecord shards: the "
               "representative images (int8, adjustable) and the --eval data (default: the "
               "checkpoint's, from the config.json beside it)",
    "img_size": "input size of the exported model (default: the checkpoint's training size)",
    "num_classes": "number of classes (default: the checkpoint's)",
    "labels_offset": "subtracted from TFRecord labels for --eval (default: the checkpoint's)",
    "batch_size": "with --eval: images per interpreter call is the larger of this and 64",
    "max_val_images": "with --eval: evaluate at most this many validation images (default: all)",
    "config": "TOML config file for defaults the checkpoint's config.json does not set",
    "progress": "show a progress bar during --eval",
    "seed": "seed of the representative image sample",
}


def parse(argv=None) -> dict:
    parser = build_parser("adjq-export", __doc__, extra=EXTRA,
                          fields=DATA_FIELDS)
    for action in parser._actions:  # noqa: SLF001 (export-specific wording of shared flags)
        if action.dest in DATA_HELP:
            action.help = DATA_HELP[action.dest]
    return vars(parser.parse_args(argv))


@cli_main
def main(argv=None) -> dict:
    start(xla=True)
    cli = parse(argv)
    evaluate = cli.pop("evaluate", False)
    if evaluate and cli["format"] != "tflite":
        raise UserError(f"--eval evaluates a .tflite file; drop it with --format "
                        f"{cli['format']}")
    result = export(cli)
    what = "packed" if result["format"] == "packed" else (
        f"{result['quantization']} {result['format']}")
    source = "packed file" if cli.get("source") == "packed" else (
        f"{result['model_kind']} checkpoint")
    print(f"wrote {result['output']} ({result['size_bytes']:,} bytes, {what} of the {source} "
          f"{result['checkpoint']})")
    if result.get("removed_weights"):
        print(f"removed channels: {result['removed_weights']:,} weights left out of the graph "
              "(the channels pruning removed, and those only they fed or read)")
    if result.get("activation_ranges"):
        print(f"activation ranges: {result['activation_ranges']}")
    if result.get("packed"):
        print_packed_table(result)
    if result.get("levels") and "table" in result["levels"]:
        print_weight_table(result)
    if evaluate:
        o = result["options"]  # the checkpoint's data, wherever the file went
        accuracy = evaluate_tflite({
            "tflite": result["output"], "dataset": o.dataset, "num_classes": o.num_classes,
            "labels_offset": o.labels_offset, "batch_size": o.batch_size,
            "max_val_images": o.max_val_images, "config": o.config, "progress": o.progress})
        speed = accuracy.get("images_per_second")
        print(f"interpreter top-1: {100 * accuracy['top1']:.2f}%   top-5: "
              f"{100 * accuracy['top5']:.2f}%   ({accuracy['images']} images"
              + (f", {speed:,.0f} img/s" if speed else "") + ")")
        result.update({f"eval_{k}": v for k, v in accuracy.items()})
    return result


def _bits(low: int, high: int) -> str:
    return str(low) if low == high else f"{low}-{high}"


def print_weight_table(result: dict) -> None:
    """Per weight tensor of an adjustable .tflite: learned bits and container; totals."""
    table = result["levels"]["table"]
    print(f"{'layer':40s} {'learned bits':>12s} {'container':>9s}")
    for row in table["rows"]:
        print(f"{row['layer']:40s} {_bits(*row['bits']):>12s} {row['container']:>9s}")
    rows = table["rows"]
    whole = sum(row["container"] == "INT4" for row in rows)
    split = sum(row["container"] == "INT4+INT8" for row in rows)
    int4 = sum(row["int4_weights"] for row in rows)
    print(f"{whole} of {len(rows)} weight tensors INT4, {split} split INT4+INT8; "
          f"{int4:,} of {sum(row['weights'] for row in rows):,} weights INT4; file "
          f"{result['size_bytes']:,} bytes; counted weight bits / 8: "
          f"{table['counted_weight_bits'] / 8:,.0f} bytes")


def print_packed_table(result: dict) -> None:
    """Per weight tensor of a packed file: bits, kept channels, encoding, code bytes."""
    info = result["packed"]
    print(f"{'layer':40s} {'bits':>5s} {'channels':>9s} {'encoding':>8s} {'bytes':>8s}")
    for row in info["layers"]:
        bits = _bits(min(row["bits"]), max(row["bits"])) if row["bits"] else "-"
        print(f"{row['layer']:40s} {bits:>5s} {row['channels']:>4d}/{row['of']:<4d} "
              f"{row['encoding']:>8s} {row['code_bytes']:>8,}")
    print(f"file {info['size_bytes']:,} bytes; weight codes {info['code_bytes']:,} bytes; "
          f"counted weight bits / 8: {info['weight_bits'] / 8:,.0f} bytes")


def console_main() -> None:
    """``adjq-export``: :func:`main` without its return value (which would be printed)."""
    main()


if __name__ == "__main__":
    main()

