"""Evaluate a checkpoint: top-1/top-5, MicroNet scores, params, ops, quant_info.json.

    python eval.py --ckpt_path runs/digits/finetune            # best checkpoint of a stage
    python eval.py --ckpt_path runs/digits/pretrain --float    # the float model
    python eval.py --ckpt_path runs/digits/finetune --plot bits.png
    python eval.py --tflite model.tflite --dataset digits      # a TFLite model, in the interpreter
    python eval.py --ckpt_path runs/digits                     # a run: its last finished stage
    python eval.py --model keras:model.keras --img_size 32     # a saved Keras model, untrained

Data and model flags default to the ones the checkpoint was trained with (the
``config.json`` beside it), then to the config file; flags given here override them.
A float checkpoint is evaluated as is with ``--float``; without it, it is quantized with
``--weight_bits/--act_bits`` and calibrated thresholds (``--thresholds`` or calibration).
``--model keras:PATH`` without ``--ckpt_path`` does the same with the weights of a saved
float Keras model, imported as ``train.py`` imports it; ``quant_info.json`` goes beside it.
Installed as ``adjq-eval``; ``python eval.py`` in a checkout runs the same.
"""

from __future__ import annotations

import json
import os
import sys

from adj_quant.cli.start import start
from adj_quant.errors import UserError, cli_main
from adj_quant.recipe.config import build_parser
from adj_quant.recipe.evaluation import EVAL_FIELDS, evaluate_checkpoint, evaluate_tflite

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
    if "images_per_second" in result:
        lines.append(f"interpreter: {result['images_per_second']:,.0f} img/s")
    return lines


@cli_main
def main(argv=None) -> None:
    start(xla=True)
    cli = parse(argv)
    as_json = cli.pop("json", False)
    if cli.get("tflite"):
        result = evaluate_tflite(cli)
    elif cli.get("ckpt_path") or str(cli.get("model") or "").startswith("keras:"):
        thresholds = cli.get("thresholds")
        if thresholds and not os.path.exists(thresholds):
            raise UserError(f"--thresholds {thresholds} not found; pass a calibrate stage's "
                            "initial_thresholds.json (RUN/calibrate/initial_thresholds.json), "
                            "or leave --thresholds out to calibrate now")
        result = evaluate_checkpoint(cli)
    else:
        raise UserError("pass --ckpt_path CHECKPOINT (a prefix or a run's stage directory), "
                        "--model keras:MODEL.keras or --tflite MODEL.tflite")
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
