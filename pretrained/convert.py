"""Convert published float ImageNet weights into an adjq float checkpoint directory.

The output directory holds the checkpoint with ``checkpoints.json`` and ``model_spec.json``;
the command ``adjq-convert`` (and ``train.py --pretrained``) has the recipe add its stage
files, so that it is a finished ``pretrain`` stage: what ``train.py --stage calibrate
--ckpt_path DIR`` and ``eval.py --float --ckpt_path DIR`` take; written as ``RUN/pretrain``
it starts the recipe of run ``RUN`` at calibration.

Sources (recognised from the file, see ``pretrained/README.md`` for where to download them):
Keras applications weights (``.weights.h5``, legacy ``.h5``, ``.keras``) of EfficientNetB0,
MobileNetV2 (alpha 1.0 / 1.4) and ResNet50; the official TPU EfficientNet-B0 checkpoint;
slim's MobileNetV2 and ResNet-V1-50 checkpoints. A checkpoint may be given as its prefix, one
of its files, the directory holding it, or the downloaded ``.tar.gz`` / ``.tgz``.
"""

from __future__ import annotations

import os
import sys

from adj_quant.errors import UserError

CHECKPOINT_NAME = "converted"
#: The image size the published accuracies are measured at (all five networks).
PUBLISHED_IMG_SIZE = 224

def _check_model(model: str) -> None:
    from adj_quant import nets
    from pretrained.sources import CONVERTIBLE

    if model not in nets.names():
        raise UserError(f"--model {model!r} is not a known network; known networks: "
                        f"{', '.join(nets.names())}")
    if model not in CONVERTIBLE:
        raise UserError(f"--model {model}: no published weights convert to it; convertible: "
                        + "; ".join(f"{k} ({v})" for k, v in CONVERTIBLE.items()))


def _check_output(output: str, overwrite: bool) -> None:
    if not os.path.lexists(output):
        return
    if not overwrite:
        raise UserError(f"--output {output} already exists; pass --overwrite to replace it, or "
                        "choose another directory")
    if os.path.islink(output) or not os.path.isdir(output):
        raise UserError(f"--output {output} is not a directory; refusing to replace it with "
                        "--overwrite: choose another --output")
    marks = ("checkpoints.json", "model_spec.json")
    if os.listdir(output) and not any(os.path.exists(os.path.join(output, m)) for m in marks):
        raise UserError(f"--output {output} holds files but no adjq checkpoints; --overwrite "
                        "only replaces a checkpoint directory: choose another --output")


def _num_classes(source, labels_offset: int) -> int:
    found = source.num_classes
    if labels_offset < 0:
        raise UserError(f"--labels_offset {labels_offset}: pass 0, or 1 to drop a background "
                        "class")
    if found == 1001 and labels_offset == 0:
        raise UserError(f"SOURCE {source.path} has 1001 classes: class 0 is slim's background "
                        "class; pass --labels_offset 1 to drop it")
    if labels_offset and found == 1000:
        raise UserError(f"--labels_offset {labels_offset}: SOURCE {source.path} has 1000 "
                        "classes, without a background class; leave --labels_offset out")
    if labels_offset >= found:
        raise UserError(f"--labels_offset {labels_offset} leaves no class of the {found} in "
                        f"SOURCE {source.path}")
    return found - labels_offset


def _fill(model, source, labels_offset: int) -> int:
    """Assign every variable of ``model`` from ``source``, in network order; the first
    variable that is missing or has another shape ends in one line. Returns the count."""
    import numpy as np

    net = model.net
    logits = model.layers[net.nodes[-1].name]
    count = 0
    for node in net.layers:
        layer = model.layers[node.name]
        variables = [layer.weights]
        if layer.bn is not None:
            variables += [layer.bn.gamma, layer.bn.beta, layer.bn.moving_mean,
                          layer.bn.moving_variance]
        else:
            variables.append(layer.biases)
        for var in variables:
            name = var.name.split(":")[0]
            value, where = source.tensor(name)
            if layer is logits and labels_offset:
                value = value[..., labels_offset:]
            if list(value.shape) != var.shape.as_list():
                raise UserError(
                    f"SOURCE {source.path} does not fit {net.name} with {net.num_classes} "
                    f"classes: {where} has shape {list(value.shape)} but {name} needs "
                    f"{var.shape.as_list()} (a checkpoint of another network or class count?)")
            if not np.all(np.isfinite(value)):
                raise UserError(f"SOURCE {source.path}: {where} holds NaN or Inf values")
            var.assign(value)
            count += 1
    return count


def describe(source: str, labels_offset: int = 0) -> dict:
    """What ``source`` holds, without converting it: ``{"format", "model", "num_classes"
    (after ``labels_offset``), "source_num_classes", "description"}``. Raises
    :class:`UserError` as :func:`convert` does for a source it cannot read."""
    from pretrained.sources import open_source

    with open_source(source) as src:
        return {"format": src.format, "model": src.model,
                "num_classes": _num_classes(src, labels_offset),
                "source_num_classes": src.num_classes, "description": src.description}


def convert(source: str, model: str | None, output: str, *, labels_offset: int = 0,
            overwrite: bool = False, stage_files=None) -> str:
    """Convert the published weights at ``source`` into a float checkpoint directory
    ``output`` (the checkpoint, ``checkpoints.json`` and ``model_spec.json``) and return
    ``output``.

    ``stage_files(directory, output, net, info)``, if given, adds its own files to the
    directory before it appears (atomically, with the checkpoint): the recipe passes
    :func:`adj_quant.recipe.stages.converted_pretrain_files`, which makes it a finished
    ``pretrain`` stage.

    ``model`` is a declared network (``efficientnet_b0``, ``mobilenet_v2``,
    ``mobilenet_v2_140``, ``resnet_v1_50``, ``resnet_v1_50_keras``), or None for the one the
    source holds. The class count is the source's, less ``labels_offset`` leading classes
    (1 drops the background class of slim's 1001-class checkpoints). An existing ``output``
    is replaced only with ``overwrite`` (and only if it is a checkpoint directory). Bad input
    raises :class:`~adj_quant.errors.UserError` with one line; notes (EMA shadows used, the
    Keras EfficientNet normalisation) are printed to stderr.
    """
    from adj_quant import nets
    from adj_quant.network import FloatNetwork
    from pretrained.sources import open_source

    source, output = os.fspath(source), os.fspath(output)
    if model is not None:
        _check_model(model)
    _check_output(output, overwrite)
    with open_source(source, model) as src:
        chosen = model or src.model
        classes = _num_classes(src, labels_offset)
        net = nets.build(chosen, num_classes=classes)
        float_model = FloatNetwork(net)
        count = _fill(float_model, src, labels_offset)
        for note in src.notes:
            print(note, file=sys.stderr)
        if src.ema_used:
            print(f"using the ExponentialMovingAverage values of {src.ema_used} of {count} "
                  "variables (the publisher's accuracy is measured with them)", file=sys.stderr)
        info = {"source": os.path.abspath(source), "format": src.format,
                "source_holds": src.description, "model": chosen, "num_classes": classes,
                "source_num_classes": src.num_classes, "labels_offset": labels_offset,
                "variables": count, "ema_variables": src.ema_used}
    _write(output, float_model, net, info, stage_files)
    return output


def _write(output: str, model, net, info: dict, stage_files) -> None:
    import tensorflow as tf

    from adj_quant.checkpoints import ModelSpec, RunCheckpoints, save_spec
    from adj_quant.files import write_dir_atomic

    def fill(tmp: str) -> None:
        ckpts = RunCheckpoints(tmp, keep=0)
        ckpts.save(tf.train.Checkpoint(model=model), CHECKPOINT_NAME, dict(info))
        ckpts.mark_finished(converted_from=info["source"])
        save_spec(tmp, ModelSpec("float", net))
        if stage_files is not None:
            stage_files(tmp, output, net, info)

    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        write_dir_atomic(output, fill)
    except PermissionError as err:
        raise UserError(f"--output {output}: cannot write there ({err.strerror}); choose "
                        "another directory") from None
