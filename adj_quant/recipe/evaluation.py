"""Evaluating a trained checkpoint or a TFLite file on the validation split: top-1/top-5, the
MicroNet scores, params, ops and ``quant_info.json`` (the work behind ``adjq-eval``, also
used by sweeps)."""

from __future__ import annotations

import os
import time

from adj_quant.errors import UserError

EVAL_FIELDS = ["dataset", "img_size", "num_classes", "labels_offset", "batch_size",
               "max_val_images", "eval_crop", "model", "width_multiplier",
               "depth_multiplier", "weight_bits", "act_bits", "swish_bits", "bias_bits", "range",
               "bias_range", "quantize_se_gate", "quantizer", "calib_images",
               "metric_img_size", "ckpt_path", "config", "progress", "seed", "strategy",
               "logical_cpus", "worker_timeout"]
def _resolve(cli: dict, ckpt: str | None):
    from adj_quant.recipe.config import resolve, trained_config

    base = trained_config(ckpt) if ckpt else {}
    return resolve({**base, **cli}, None)


def make_parent(path: str, flag: str) -> None:
    """Create the folder ``path`` will be written into, or refuse at once."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as err:
        raise UserError(f"{flag} {path}: cannot create its folder {parent} ({err.strerror}); "
                        "pass a path in a writable folder") from None
    if os.path.isdir(path):
        raise UserError(f"{flag} {path} is a directory; pass a file name")


def quant_info_path(output: str | None, ckpt: str) -> str:
    """Where ``quant_info.json`` goes: ``--output`` (a file, or a directory: created if it ends
    with a separator), default beside the checkpoint."""
    out = output or os.path.dirname(ckpt) or "."
    if os.path.isdir(out) or out.endswith(os.sep):
        try:
            os.makedirs(out, exist_ok=True)
        except OSError as err:
            raise UserError(f"--output {out}: cannot create it ({err.strerror}); pass a "
                            "writable folder") from None
        return os.path.join(out, "quant_info.json")
    make_parent(out, "--output")
    return out


def evaluate_checkpoint(cli: dict) -> dict:
    """``eval.py --ckpt_path CKPT``, or ``eval.py --model keras:PATH`` (the Keras model's own
    weights, no training): a float model is quantized at ``--weight_bits/--act_bits`` with
    calibrated (or ``--thresholds``) activation ranges unless ``--float``."""
    from adj_quant import distribution
    from adj_quant.checkpoints import ModelSpec, model_spec_for, resolve_checkpoint, restore_model
    from adj_quant.qnetwork import QuantizedNetwork
    from adj_quant.quant_info import save_quant_info
    from adj_quant.recipe import validation
    from adj_quant.recipe.data import validation_data
    from adj_quant.recipe.stages import arch_of, calibrate_activations, quant_config

    as_float = cli.pop("float_model", False)
    output, plot, thresholds = cli.pop("output", None), cli.pop("plot", None), cli.pop(
        "thresholds", None)
    if cli.get("ckpt_path"):
        ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    else:  # a saved Keras model, evaluated with its own weights
        ckpt = cli["model"][len("keras:"):]
    out = quant_info_path(output, ckpt)  # checked (folders made) before the work starts
    if plot:
        make_parent(plot, "--plot")
    o = _resolve(cli, ckpt if cli.get("ckpt_path") else None)
    # Before the model: a strategy's devices must be set up before TensorFlow starts.
    strategy = distribution.get_strategy(o.strategy, logical_cpus=o.logical_cpus,
                                         worker_timeout=o.worker_timeout)
    if cli.get("ckpt_path"):
        spec = model_spec_for(ckpt, ModelSpec("float", arch_of(o)), "--ckpt_path")
    else:
        spec = ModelSpec("float", arch_of(o))  # refuses a class count that does not fit
    if spec.arch.num_classes != arch_of(o).num_classes:
        raise UserError(f"--ckpt_path {ckpt} has {spec.arch.num_classes} classes but the "
                        f"dataset has {arch_of(o).num_classes}; pass the matching --num_classes")
    if spec.kind == "quant" and as_float:
        raise UserError(f"--float: {ckpt} holds a quantized model; evaluate it without --float")
    with strategy.scope():
        model = spec.build(seed=o.seed)
        if cli.get("ckpt_path"):
            restore_model(model, ckpt)
        else:
            from adj_quant.keras_import import load_weights
            from adj_quant.recipe.stages import keras_model

            load_weights(model, keras_model(o.model)[1])
        if spec.kind == "float" and not as_float:
            qmodel = QuantizedNetwork.from_float(model, quant_config(o, False), seed=o.seed)
            if thresholds:
                qmodel.load_thresholds(thresholds)
            else:
                calibrate_activations(qmodel, o)
            model = qmodel
        val = validation_data(o, model.arch.num_classes)
        result = validation.accuracy(model, val, progress=o.progress,
                                     max_images=o.max_val_images)
    bits = validation.bits_of(model)
    img = o.metric_img_size or o.img_size
    result.update(validation.scores(bits, model.arch, img), metric_img_size=img, checkpoint=ckpt)
    summary = {k: result[k] for k in ("avg_weight_bits", "avg_act_bits", "params", "ops",
                                      "score_adjq", "score_micronet", "top1", "top5")}
    result["quant_info"] = out
    if not distribution.is_chief(strategy):  # the chief writes the files
        return result
    save_quant_info(out, bits, model.arch, summary)
    if plot:
        from adj_quant.recipe.plots import per_layer_bits_png

        with open(plot, "wb") as f:
            f.write(per_layer_bits_png(bits, model.arch.layer_names, os.path.basename(ckpt)))
        result["plot"] = plot
    return result


def evaluate_tflite(cli: dict) -> dict:
    """``eval.py --tflite FILE``: accuracy of a .tflite model in the interpreter.

    Data flags default to the ``config.json`` beside the file (the checkpoint directory the
    default ``--output`` writes to), then to the config file; the image size and class count
    come from the model itself.
    """
    from adj_quant.recipe import data as data_lib
    from adj_quant.recipe.data import data_args
    from adj_quant.recipe.export import resolve_options
    from adj_quant.tflite_runner import TFLiteRunner

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


def interpreter_accuracy(model_path: str, dataset, *, batch: int = 1, progress: bool = True,
                         max_images: int | None = None, what: str = "validation data") -> dict:
    """Top-1/top-5 of a .tflite file over ``dataset`` (batches of ``(images, labels)``) and
    ``images_per_second`` of the interpreter."""
    from adj_quant.recipe.validation import accuracy
    from adj_quant.tflite_runner import TFLiteRunner, topk_hits

    runner = TFLiteRunner(model_path, batch)
    timed = {"seconds": 0.0, "images": 0}

    def step(images, labels):
        images, labels = images.numpy(), labels.numpy()
        if images.shape[1:] != (runner.img_size, runner.img_size, 3):
            raise UserError(f"{what}: images of shape {list(images.shape[1:])} but the model "
                            f"takes {runner.img_size}x{runner.img_size}x3; pass --img_size "
                            f"{runner.img_size}")
        if labels.size and labels.max() >= runner.num_classes:
            raise UserError(f"{what}: label {labels.max()} but the model has "
                            f"{runner.num_classes} classes; pass the matching --dataset")
        top1 = top5 = 0
        for start in range(0, len(images), batch):
            started = time.perf_counter()
            logits = runner(images[start:start + batch])
            timed["seconds"] += time.perf_counter() - started
            part = labels[start:start + batch]
            timed["images"] += len(part)
            top1 += topk_hits(logits, part, 1)
            top5 += topk_hits(logits, part, 5)
        return top1, top5

    result = accuracy(None, dataset, what=what, progress=progress, max_images=max_images,
                      step=step, desc="tflite")
    # Throughput of the interpreter calls alone (input quantization, invoke, output), not of
    # data loading.
    if timed["seconds"] > 0:
        result["images_per_second"] = timed["images"] / timed["seconds"]
    return result
