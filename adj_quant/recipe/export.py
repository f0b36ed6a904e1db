"""Exporting a trained checkpoint to TFLite (float, dynamic-range, full-integer int8,
adjustable) or a SavedModel: the work behind ``adjq-export``, also used by sweeps. The
conversion itself is in :mod:`adj_quant.tflite_export`."""

from __future__ import annotations

import os
import time

from adj_quant.errors import UserError
from adj_quant.files import write_atomic, write_dir_atomic
from adj_quant.tflite_export import (
    convert,
    export_net,
    float_linear_ops,
    inference_module,
    snap_to_learned_levels,
)

FORMATS = ("tflite", "saved_model")
DATA_FIELDS = ["dataset", "img_size", "num_classes", "labels_offset", "batch_size", "eval_crop",
               "model", "width_multiplier", "depth_multiplier", "max_val_images", "config",
               "progress", "seed"]
DEFAULT_REPRESENTATIVE = 100


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
