"""Evaluate a checkpoint: top-1/top-5, MicroNet scores, params, ops, quant_info.json.

    python eval.py --ckpt_path runs/digits/finetune            # best checkpoint of a stage
    python eval.py --ckpt_path runs/digits/pretrain --float    # the float model
    python eval.py --ckpt_path runs/digits/finetune --plot bits.png
    python eval.py --tflite model.tflite --dataset digits      # a TFLite model, in the interpreter
    python eval.py --ckpt_path runs/digits                     # a run: its last finished stage

Data and model flags default to the ones the checkpoint was trained with (the
``config.json`` beside it), then to the config file; flags given here override them.
A float checkpoint is evaluated as is with ``--float``; without it, it is quantized with
``--weight_bits/--act_bits`` and calibrated thresholds (``--thresholds`` or calibration).
Installed as ``adjq-eval``; ``python eval.py`` in a checkout runs the same.
"""

from __future__ import annotations

import json
import os
import sys

import adj_quant.cli.quiet  # noqa: F401  (quiet TensorFlow start-up)
from adj_quant.errors import UserError, cli_main
from adj_quant.recipe.config import build_parser

EVAL_FIELDS = ["dataset", "img_size", "num_classes", "labels_offset", "batch_size",
               "max_val_images", "eval_crop", "model", "width_multiplier",
               "depth_multiplier", "weight_bits", "act_bits", "swish_bits", "bias_bits", "range", "bias_range",
               "quantize_se_gate", "quantizer", "calib_images",
               "metric_img_size", "ckpt_path", "config", "progress", "seed", "strategy",
               "logical_cpus", "worker_timeout"]
EXTRA = {
    "--float": dict(action="store_true", dest="float_model",
                    help="evaluate the checkpoint as a float model (no quantization)"),
    "--output": dict(metavar="PATH", help="where to write quant_info.json (a file or a "
                     "directory; default: beside the checkpoint)"),
    "--plot": dict(metavar="FILE.png", help="draw per-layer average weight and activation bits"),
    "--thresholds": dict(metavar="FILE", help="initial_thresholds.json for quantizing a float "
                         "checkpoint (default: calibrate on --calib_images training images)"),
    "--tflite": dict(metavar="MODEL.tflite", help="evaluate a TFLite model in the interpreter"),
    "--json": dict(action="store_true", help="print one JSON object with the results"),
}


def parse(argv=None) -> dict:
    parser = build_parser("eval.py", __doc__, extra=EXTRA, fields=EVAL_FIELDS)
    return vars(parser.parse_args(argv))


def _resolve(cli: dict, ckpt: str | None):
    from adj_quant.recipe.config import resolve, trained_config

    base = trained_config(ckpt) if ckpt else {}
    return resolve({**base, **cli}, None)


def report_lines(result: dict) -> list[str]:
    lines = [f"top-1: {100 * result['top1']:.2f}%   top-5: {100 * result['top5']:.2f}%   "
             f"({result['images']} images)"]
    if "score_micronet" in result:
        lines += [
            f"score_micronet (official counting): {result['score_micronet']:.4f}",
            f"score_adjq (the submission's own counting): {result['score_adjq']:.4f}",
            f"params: {result['params']:,.0f}   ops: {result['ops']:,.0f}   "
            f"(official, at {result['metric_img_size']}x{result['metric_img_size']})",
            f"average bits: weights {result['avg_weight_bits']:.2f}, activations "
            f"{result['avg_act_bits']:.2f}",
        ]
    return lines


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
    out = output or os.path.dirname(ckpt)
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
    from adj_quant import distribution
    from adj_quant.checkpoints import ModelSpec, model_spec_for, resolve_checkpoint, restore_model
    from adj_quant.qnetwork import QuantizedNetwork
    from adj_quant.quant_info import save_quant_info
    from adj_quant.recipe import validation
    from adj_quant.recipe.stages import arch_of, calibrate_activations, quant_config
    from adj_quant.recipe.data import validation_data

    as_float = cli.pop("float_model", False)
    output, plot, thresholds = cli.pop("output", None), cli.pop("plot", None), cli.pop(
        "thresholds", None)
    ckpt = resolve_checkpoint(cli["ckpt_path"], "--ckpt_path")
    out = quant_info_path(output, ckpt)  # checked (folders made) before the work starts
    if plot:
        make_parent(plot, "--plot")
    o = _resolve(cli, ckpt)
    # Before the model: a strategy's devices must be set up before TensorFlow starts.
    strategy = distribution.get_strategy(o.strategy, logical_cpus=o.logical_cpus,
                                         worker_timeout=o.worker_timeout)
    spec = model_spec_for(ckpt, ModelSpec("float", arch_of(o)), "--ckpt_path")
    if spec.arch.num_classes != arch_of(o).num_classes:
        raise UserError(f"--ckpt_path {ckpt} has {spec.arch.num_classes} classes but the "
                        f"dataset has {arch_of(o).num_classes}; pass the matching --num_classes")
    if spec.kind == "quant" and as_float:
        raise UserError(f"--float: {ckpt} holds a quantized model; evaluate it without --float")
    with strategy.scope():
        model = spec.build(seed=o.seed)
        restore_model(model, ckpt)
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


@cli_main
def main(argv=None) -> None:
    cli = parse(argv)
    as_json = cli.pop("json", False)
    if cli.get("tflite"):
        from adj_quant.cli.export import evaluate_tflite

        result = evaluate_tflite(cli)
    elif cli.get("ckpt_path"):
        result = evaluate_checkpoint(cli)
    else:
        raise UserError("pass --ckpt_path CHECKPOINT (a prefix or a run's stage directory) or "
                        "--tflite MODEL.tflite")
    if as_json:
        print(json.dumps(result, indent=1))
        return
    for line in report_lines(result):
        print(line)
    for key in ("quant_info", "plot"):
        if key in result:
            print(f"{key}: {result[key]}")


if __name__ == "__main__":
    sys.exit(main())
