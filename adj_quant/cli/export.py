"""Export a checkpoint to TFLite (float, dynamic-range, full-integer int8, adjustable) or a SavedModel.

    adjq-export --ckpt_path runs/digits/qat8 --format tflite --quantization int8
    adjq-export --ckpt_path runs/digits/finetune --format tflite --quantization adjustable --eval
    python eval.py --tflite runs/digits/finetune/model_adjustable.tflite

The conversion itself is in :mod:`adj_quant.tflite_export`, the interpreter in
:mod:`adj_quant.tflite_runner`. Installed as ``adjq-export``.
"""

from __future__ import annotations

import os
import time

import adj_quant.cli.quiet  # noqa: F401  (quiet TensorFlow start-up)
from adj_quant.errors import UserError, cli_main
from adj_quant.files import write_atomic, write_dir_atomic
from adj_quant.recipe.config import build_parser
from adj_quant.tflite_export import (
    QUANTIZATIONS,
    convert,
    export_net,
    float_linear_ops,
    inference_module,
    snap_to_learned_levels,
)
from adj_quant.tflite_runner import TFLiteRunner, interpreter_accuracy

FORMATS = ("tflite", "saved_model")
DATA_FIELDS = ["dataset", "img_size", "num_classes", "labels_offset", "batch_size", "eval_crop",
               "model", "width_multiplier", "depth_multiplier", "max_val_images", "config", "progress", "seed"]
DEFAULT_REPRESENTATIVE = 100
EXTRA = {
    "--ckpt_path": dict(metavar="PATH", required=True,
                        help="checkpoint to export: a prefix, or a run's stage directory (its "
                             "best checkpoint); a float (pretrain) or quantized (qat8, "
                             "adjustable, finetune) model"),
    "--format": dict(choices=FORMATS, default="tflite",
                     help="tflite: a .tflite flatbuffer; saved_model: a SavedModel directory of "
                          "the same BN-folded inference function (float or adjustable only)"),
    "--quantization": dict(choices=QUANTIZATIONS, required=True,
                           help="float: no quantization; dynamic: int8 weights, float "
                                "activations; int8: full-integer post-training quantization "
                                "calibrated on --representative_images training images; "
                                "adjustable: full-integer int8 with the learned weight levels "
                                "and activation ranges of a quantized checkpoint"),
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


# --------------------------------------------------------------------------- options


def resolve_options(cli: dict, beside: str | None):
    """Options from the config.json beside ``beside`` (a checkpoint or model file), then ``cli``."""
    from adj_quant.recipe.config import resolve, trained_config

    keep = {k: v for k, v in cli.items() if k in DATA_FIELDS}
    base = trained_config(beside) if beside else {}
    return resolve({**base, **keep}, None)


# --------------------------------------------------------------------------- files


def default_output(ckpt: str, fmt: str, quantization: str) -> str:
    directory = os.path.dirname(os.path.abspath(ckpt))
    if fmt == "tflite":
        return os.path.join(directory, f"model_{quantization}.tflite")
    return os.path.join(directory, f"saved_model_{quantization}")


def check_output(path: str, overwrite: bool) -> None:
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it or "
                        "--output elsewhere")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UserError(f"output directory {parent} does not exist; create it or pass another "
                        "--output")


def tree_size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(path) for name in names)


# --------------------------------------------------------------------------- export


def load_checkpoint(ckpt_path: str, o, quantization: str | None = None):
    """``(model, spec, ckpt)``: the model a run's checkpoint holds, restored."""
    from adj_quant.checkpoints import ModelSpec, model_spec_for, resolve_checkpoint, restore_model
    from adj_quant.recipe.stages import arch_of

    ckpt = resolve_checkpoint(ckpt_path, "--ckpt_path")
    spec = model_spec_for(ckpt, ModelSpec("float", arch_of(o)), "--ckpt_path")
    if quantization == "adjustable" and spec.kind != "quant":
        raise UserError(f"--quantization adjustable needs a quantized checkpoint (a qat8, "
                        f"adjustable or finetune stage); {ckpt} holds a float model: export it "
                        "with --quantization int8 (post-training quantization) instead")
    model = spec.build(seed=o.seed)
    restore_model(model, ckpt)
    return model, spec, ckpt


def export(cli: dict) -> dict:
    """Export a checkpoint as the flags in ``cli`` say; returns what was written."""
    from adj_quant.checkpoints import resolve_checkpoint
    from adj_quant.recipe import data as data_lib
    from adj_quant.recipe.data import data_args

    fmt, quantization = cli["format"], cli["quantization"]
    count = cli.get("representative_images", DEFAULT_REPRESENTATIVE)
    if count <= 0:
        raise UserError(f"--representative_images {count} must be positive")
    if fmt == "saved_model" and quantization in ("dynamic", "int8"):
        raise UserError(f"--format saved_model --quantization {quantization}: {quantization} "
                        "quantization happens in the TFLite converter; write a tflite file, or "
                        "a saved_model with --quantization float or adjustable")
    ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    output = cli.get("output") or default_output(ckpt, fmt, quantization)
    check_output(output, cli.get("overwrite", False))
    o = resolve_options(cli, ckpt)
    model, spec, ckpt = load_checkpoint(ckpt, o, quantization)
    net = export_net(model, spec, quantization)
    module = inference_module(net, o.img_size)
    started = time.time()
    levels = None
    activation_ranges = "learned (per tensor: the union of the channels' ranges)" if (
        quantization == "adjustable") else None
    if fmt == "saved_model":
        import tensorflow as tf

        write_dir_atomic(output, lambda tmp: tf.saved_model.save(
            module, tmp, signatures={"serving_default": module.serve}))
    else:
        representative = None
        if quantization in ("int8", "adjustable"):
            name, dataset_dir, _, offset = data_args(o)
            representative = data_lib.representative_images(
                name, img_size=o.img_size, count=count, seed=o.seed, dataset_dir=dataset_dir,
                labels_offset=offset, eval_crop=o.eval_crop)
        tflite = convert(module, quantization, representative)
        if quantization == "adjustable":
            left_float = float_linear_ops(tflite)
            if left_float:
                # The converter sometimes keeps a conv float behind a FakeQuant range; then
                # calibrated activation ranges give a fully integer model (weights still
                # hold their learned levels).
                activation_ranges = (f"calibrated on {count} images: with the learned "
                                     f"ranges the converter left {left_float} layer(s) float")
                net.act_ranges = {}
                tflite = convert(inference_module(net, o.img_size), quantization,
                                 representative)
            tflite, levels = snap_to_learned_levels(tflite, model, net)
        write_atomic(output, tflite)
    return {"output": output, "size_bytes": tree_size(output), "checkpoint": ckpt,
            "model_kind": spec.kind, "format": fmt, "quantization": quantization,
            "seconds": time.time() - started, "options": o, "levels": levels,
            "activation_ranges": activation_ranges}


def evaluate_tflite(cli: dict) -> dict:
    """``eval.py --tflite FILE``: accuracy of a .tflite model in the interpreter.

    Data flags default to the ``config.json`` beside the file (the checkpoint directory the
    default ``--output`` writes to), then to the config file; the image size and class count
    come from the model itself.
    """
    from adj_quant.recipe import data as data_lib
    from adj_quant.recipe.data import data_args

    path = cli["tflite"]
    if not os.path.isfile(path):
        raise UserError(f"--tflite {path}: no such file")
    runner = TFLiteRunner(path)
    if "img_size" in cli and cli["img_size"] != runner.img_size:
        raise UserError(f"--img_size {cli['img_size']} but {path} takes {runner.img_size}x"
                        f"{runner.img_size} images; drop --img_size")
    o = resolve_options({**cli, "img_size": runner.img_size}, path)
    name, dataset_dir, _, offset = data_args(o)
    classes = o.num_classes or runner.num_classes
    batch = max(o.batch_size, 64)
    dataset = data_lib.make_dataset(name, "validation", batch_size=batch, img_size=runner.img_size,
                                    training=False, dataset_dir=dataset_dir, labels_offset=offset,
                                    num_classes=classes, eval_crop=o.eval_crop)
    result = interpreter_accuracy(path, dataset, batch=batch, progress=o.progress,
                                  max_images=o.max_val_images)
    result.update(tflite=path, size_bytes=os.path.getsize(path))
    return result


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
    cli = parse(argv)
    evaluate = cli.pop("evaluate", False)
    if evaluate and cli["format"] != "tflite":
        raise UserError("--eval evaluates a .tflite file; drop it with --format saved_model")
    result = export(cli)
    print(f"wrote {result['output']} ({result['size_bytes']:,} bytes, {result['quantization']} "
          f"{result['format']} of the {result['model_kind']} checkpoint {result['checkpoint']})")
    if result.get("activation_ranges"):
        print(f"activation ranges: {result['activation_ranges']}")
    if evaluate:
        o = result["options"]  # the checkpoint's data, wherever the file went
        accuracy = evaluate_tflite({
            "tflite": result["output"], "dataset": o.dataset, "num_classes": o.num_classes,
            "labels_offset": o.labels_offset, "batch_size": o.batch_size,
            "max_val_images": o.max_val_images, "config": o.config, "progress": o.progress})
        print(f"interpreter top-1: {100 * accuracy['top1']:.2f}%   top-5: "
              f"{100 * accuracy['top5']:.2f}%   ({accuracy['images']} images)")
        result.update({f"eval_{k}": v for k, v in accuracy.items()})
    return result


def console_main() -> None:
    """``adjq-export``: :func:`main` without its return value (which would be printed)."""
    main()


if __name__ == "__main__":
    main()

