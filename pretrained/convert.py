"""Convert published float ImageNet weights into an adjq float checkpoint directory.

The output directory is written like a finished ``pretrain`` stage (``model_spec.json``,
``checkpoints.json``, the checkpoint, ``result.json``), so it is what
``train.py --stage calibrate --ckpt_path DIR`` and ``eval.py --float --ckpt_path DIR`` take;
written as ``RUN/pretrain`` it starts the recipe of run ``RUN`` at calibration.

Sources (recognised from the file, see ``pretrained/README.md`` for where to download them):
Keras applications weights (``.weights.h5``, legacy ``.h5``, ``.keras``) of EfficientNetB0,
MobileNetV2 (alpha 1.0 / 1.4) and ResNet50; the official TPU EfficientNet-B0 checkpoint;
slim's MobileNetV2 and ResNet-V1-50 checkpoints. A checkpoint may be given as its prefix, one
of its files, the directory holding it, or the downloaded ``.tar.gz`` / ``.tgz``.
"""

from __future__ import annotations

import argparse
import os
import sys

from adj_quant.errors import OneLineParser, UserError, cli_main

CHECKPOINT_NAME = "converted"
#: The image size the published accuracies are measured at (all five networks).
PUBLISHED_IMG_SIZE = 224

EXAMPLES = """\
examples:
  # Keras applications weights (downloaded by keras.applications, or from the URLs in
  # pretrained/README.md); the network is recognised from the file
  python -m pretrained.convert efficientnetb0.h5 --output runs/b0_keras/pretrain
  python -m pretrained.convert mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.4_224.h5 \\
      --output runs/mnv2_140_keras/pretrain
  python -m pretrained.convert resnet50_weights_tf_dim_ordering_tf_kernels.h5 \\
      --output runs/resnet50_keras/pretrain

  # the official TPU EfficientNet-B0 checkpoint (tarball, directory or prefix)
  python -m pretrained.convert efficientnet-b0.tar.gz --output runs/b0_tpu/pretrain

  # slim checkpoints: MobileNetV2 has 1001 classes (0 = background), drop it
  python -m pretrained.convert mobilenet_v2_1.4_224.tgz --labels_offset 1 \\
      --output runs/mnv2_140/pretrain
  python -m pretrained.convert resnet_v1_50.ckpt --output runs/resnet50/pretrain

then: python eval.py --float --ckpt_path OUT --dataset IMAGENET_TFRECORDS --labels_offset 1
      python train.py --stage calibrate --run_dir RUN --model MODEL --dataset ...
"""


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
            overwrite: bool = False) -> str:
    """Convert the published weights at ``source`` into a float checkpoint directory
    ``output`` (written like a finished ``pretrain`` stage) and return ``output``.

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
    _write(output, float_model, net, info)
    return output


def _write(output: str, model, net, info: dict) -> None:
    import tensorflow as tf

    from adj_quant.checkpoints import ModelSpec, RunCheckpoints, save_spec
    from adj_quant.files import write_dir_atomic, write_json_atomic

    def fill(tmp: str) -> None:
        ckpts = RunCheckpoints(tmp, keep=0)
        ckpts.save(tf.train.Checkpoint(model=model), CHECKPOINT_NAME, dict(info))
        ckpts.mark_finished(converted_from=info["source"])
        save_spec(tmp, ModelSpec("float", net))
        # What eval.py / export take as defaults for this checkpoint (flags override them).
        write_json_atomic(os.path.join(tmp, "config.json"), {
            "model": net.name, "num_classes": net.num_classes, "img_size": PUBLISHED_IMG_SIZE,
            "width_multiplier": 1.0, "depth_multiplier": 1.0}, sort_keys=True)
        write_json_atomic(os.path.join(tmp, "result.json"), {
            "best_checkpoint": os.path.join(output, CHECKPOINT_NAME), **info})

    parent = os.path.dirname(os.path.abspath(output))
    try:
        os.makedirs(parent, exist_ok=True)
        write_dir_atomic(output, fill)
    except PermissionError as err:
        raise UserError(f"--output {output}: cannot write there ({err.strerror}); choose "
                        "another directory") from None


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog="python -m pretrained.convert",
        description="Convert published float ImageNet weights (Keras applications, the TPU "
                    "EfficientNet-B0 checkpoint, slim's MobileNetV2 / ResNet-V1-50 "
                    "checkpoints) into an adjq float checkpoint directory, written like a "
                    "finished pretrain stage.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "source", metavar="SOURCE",
        help="the weights: a Keras .weights.h5 / .h5 / .keras file, a TF checkpoint (prefix, "
             "one of its files, or the directory holding it), or the downloaded .tar.gz/.tgz")
    parser.add_argument(
        "--model", default=None,
        help="the declared network to convert into (efficientnet_b0, mobilenet_v2, "
             "mobilenet_v2_140, resnet_v1_50, resnet_v1_50_keras); default: the one the "
             "source holds")
    parser.add_argument(
        "--output", required=True, metavar="DIR",
        help="the checkpoint directory to write (RUN/pretrain makes it run RUN's pretrain "
             "stage, so the recipe starts at calibrate)")
    parser.add_argument(
        "--labels_offset", type=int, default=0,
        help="leading classes to drop from the logits: 1 for slim's 1001-class checkpoints "
             "(class 0 is background); 0 for 1000-class ones (Keras, TPU, slim ResNet-V1)")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace --output if it exists (only a checkpoint directory is replaced)")
    return parser


@cli_main
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    import adj_quant.cli.quiet  # noqa: F401, PLC0415 (quiet TensorFlow start-up)

    out = convert(args.source, args.model, args.output, labels_offset=args.labels_offset,
                  overwrite=args.overwrite)
    from adj_quant.checkpoints import load_spec, resolve_checkpoint

    net = load_spec(resolve_checkpoint(out)).arch
    print(f"{out}: float {net.name} with {net.num_classes} classes, converted from "
          f"{args.source}")
    print(f"  check it:  python eval.py --float --ckpt_path {out} --dataset IMAGENET_DIR "
          "[--labels_offset 1 for slim TFRecords]")


if __name__ == "__main__":
    main()
