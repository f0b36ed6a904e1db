"""Exporting a trained checkpoint to TFLite (float, dynamic-range, full-integer int8,
adjustable) or a SavedModel: the work behind ``adjq-export``, also used by sweeps. The
conversion itself is in :mod:`adj_quant.tflite_export`."""

from __future__ import annotations

import os
import time

import numpy as np

from adj_quant.errors import UserError
from adj_quant.files import write_atomic, write_dir_atomic
from adj_quant.tflite_export import (
    QUANTIZATIONS,
    convert,
    export_net,
    float_linear_ops,
    inference_module,
    int4_steps,
    output_ranges,
    remove_channels,
    snap_to_learned_levels,
)

FORMATS = ("tflite", "saved_model", "packed")
#: ``--from``: a checkpoint, or a packed file (``--format packed``'s output).
SOURCES = ("checkpoint", "packed")
PACKED_FILE = "model_packed.safetensors"
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


def default_output(ckpt: str, fmt: str, quantization: str | None) -> str:
    directory = os.path.dirname(os.path.abspath(ckpt))
    if fmt == "packed":
        return os.path.join(directory, PACKED_FILE)
    if fmt == "tflite":
        return os.path.join(directory, f"model_{quantization}.tflite")
    return os.path.join(directory, f"saved_model_{quantization}")


def check_output(path: str, overwrite: bool) -> None:
    """Refuse an existing output without ``overwrite``; a missing parent folder is created
    when the output is written (:func:`make_parent`), as every adjq tool does."""
    if os.path.lexists(path) and not overwrite:
        raise UserError(f"output {path} already exists; pass --overwrite to replace it or "
                        "--output elsewhere")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"output {path}: {parent} is a file, not a folder; pass another "
                        "--output")


def make_parent(path: str) -> None:
    """Create the missing parent folders of ``path``."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create the output folder {parent} ({err.strerror}); pass "
                        "another --output") from None


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
    if quantization == "packed" and spec.kind != "quant":
        raise UserError(f"--format packed needs a quantized checkpoint (a qat8, adjustable or "
                        f"finetune stage); {ckpt} holds a float model: export it as tflite")
    model = spec.build(seed=o.seed)
    restore_model(model, ckpt)
    return model, spec, ckpt


def load_packed_file(path: str, cli: dict, o):
    """``(model, spec)`` of a packed file. A file for another network is refused: another
    than the run's (the config.json beside the file), or than ``--num_classes`` says."""
    from adj_quant.checkpoints import ModelSpec
    from adj_quant.packed import load_packed
    from adj_quant.recipe.config import trained_config
    from adj_quant.recipe.stages import arch_of

    model = load_packed(path, network=arch_of(o) if trained_config(path) else None)
    classes = cli.get("num_classes")
    if classes is not None and classes != model.arch.num_classes:
        raise UserError(f"{path} is a packed file for another network ({model.arch.name}, "
                        f"{model.arch.num_classes} classes), not --num_classes {classes}; pass "
                        "the packed file of this network")
    return model, ModelSpec("quant", model.arch, model.qcfg)


def export(cli: dict) -> dict:
    """Export a checkpoint (or, ``source="packed"``, a packed file) as the flags in ``cli``
    say; returns what was written."""
    from adj_quant.checkpoints import resolve_checkpoint
    from adj_quant.recipe import data as data_lib
    from adj_quant.recipe.data import data_args

    fmt, quantization = cli["format"], cli.get("quantization")
    source = cli.get("source") or "checkpoint"
    count = cli.get("representative_images", DEFAULT_REPRESENTATIVE)
    if count <= 0:
        raise UserError(f"--representative_images {count} must be positive")
    if fmt == "packed":
        return _export_packed(cli)
    if quantization is None:
        raise UserError(f"--format {fmt} needs --quantization: pass one of "
                        f"{', '.join(QUANTIZATIONS)}")
    if fmt == "saved_model" and quantization in ("dynamic", "int8"):
        raise UserError(f"--format saved_model --quantization {quantization}: {quantization} "
                        "quantization happens in the TFLite converter; write a tflite file, or "
                        "a saved_model with --quantization float or adjustable")
    if source == "packed":
        ckpt = os.fspath(cli["ckpt_path"])
        if not os.path.isfile(ckpt):
            raise UserError(f"{ckpt}: no such packed file; pass the file adjq-export "
                            "--format packed wrote")
    else:
        ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    output = cli.get("output") or default_output(ckpt, fmt, quantization)
    check_output(output, cli.get("overwrite", False))
    o = resolve_options(cli, ckpt)
    if source == "packed":
        model, spec = load_packed_file(ckpt, cli, o)
    else:
        model, spec, ckpt = load_checkpoint(ckpt, o, quantization)
    net = export_net(model, spec, quantization)
    removed = 0
    if spec.kind != "float" and model.qcfg.pruned and cli.get("remove_channels", True):
        removed = remove_channels(net, o.img_size)
    module = inference_module(net, o.img_size)
    started = time.time()
    levels = None
    activation_ranges = "learned (per tensor: the union of the channels' ranges)" if (
        quantization == "adjustable") else None
    if fmt == "saved_model":
        import tensorflow as tf

        make_parent(output)
        write_dir_atomic(output, lambda tmp: tf.saved_model.save(
            module, tmp, signatures={"serving_default": module.serve}))
    else:
        representative = None
        if quantization in ("int8", "adjustable"):
            name, dataset_dir, _, offset = data_args(o)
            representative = data_lib.representative_images(
                name, img_size=o.img_size, count=count, seed=o.seed, dataset_dir=dataset_dir,
                labels_offset=offset, eval_crop=o.eval_crop)
        if quantization == "adjustable" and cli.get("int4", True):
            net.int4 = int4_steps(model, net, split=cli.get("int4_split", True))
            net.out_ranges = output_ranges(net, representative)
            module = inference_module(net, o.img_size)
        tflite = convert(module, quantization, representative)
        if quantization == "adjustable":
            left_float = float_linear_ops(tflite)
            if left_float:
                # The converter sometimes keeps a conv float behind a FakeQuant range; then
                # calibrated activation ranges give a fully integer model (weights still
                # hold their learned levels).
                activation_ranges = (f"calibrated on {count} images: with the learned "
                                     f"ranges the converter left {left_float} layer(s) float")
                net.act_ranges, net.int4, net.out_ranges = {}, {}, {}
                tflite = convert(inference_module(net, o.img_size), quantization,
                                 representative)
            tflite, levels = snap_to_learned_levels(tflite, model, net)
            levels["table"] = weight_table(model, levels)
        make_parent(output)
        write_atomic(output, tflite)
    return {"output": output, "size_bytes": tree_size(output), "checkpoint": ckpt,
            "model_kind": spec.kind, "format": fmt, "quantization": quantization,
            "seconds": time.time() - started, "options": o, "levels": levels,
            "activation_ranges": activation_ranges, "removed_weights": removed}


def weight_table(model, levels: dict) -> dict:
    """Per weight tensor: learned bits (min, max), container, counted bits; and the total
    counted weight bits (kept weights times their channel's bits)."""
    rows, total = [], 0
    for scope, layer in model.layers.items():
        bits = layer.weight_quant.bits().numpy()
        axis = 2 if layer.kind == "dws" else len(layer.weights.shape) - 1
        if layer.mask is None:
            per = int(np.prod(layer.weights.shape)) // len(bits)
            kept = np.full(len(bits), per)
        else:
            mask = layer.mask.numpy()
            kept = np.moveaxis(mask, axis, 0).reshape(len(bits), -1).sum(axis=1)
        counted = int((bits * kept).sum())
        total += counted
        info = levels["layers"][scope]
        rows.append({"layer": scope, "bits": (int(bits.min()), int(bits.max())),
                     "container": info["container"], "counted_bits": counted,
                     "weights": info["weights"], "int4_weights": info["int4_weights"]})
    return {"rows": rows, "counted_weight_bits": total}


def _export_packed(cli: dict) -> dict:
    from adj_quant.checkpoints import resolve_checkpoint
    from adj_quant.packed import pack

    if cli.get("source") == "packed":
        raise UserError("--from packed --format packed: the file is packed already; convert it "
                        "with --format tflite")
    if cli.get("quantization") is not None:
        raise UserError(f"--quantization {cli['quantization']} does not apply to --format "
                        "packed (it stores the learned grids); drop it")
    ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    output = cli.get("output") or default_output(ckpt, "packed", None)
    check_output(output, cli.get("overwrite", False))
    o = resolve_options(cli, ckpt)
    started = time.time()
    model, spec, ckpt = load_checkpoint(ckpt, o, "packed")
    data, info = pack(model, spec)
    make_parent(output)
    write_atomic(output, data)
    return {"output": output, "size_bytes": tree_size(output), "checkpoint": ckpt,
            "model_kind": spec.kind, "format": "packed", "quantization": None,
            "seconds": time.time() - started, "options": o, "packed": info, "levels": None,
            "activation_ranges": None}
