"""Train Adjustable Quantization: the whole recipe, or one stage of it.

    python train.py                                  # the whole recipe on digits
    python train.py --stage adjustable --bits_trainable --iter_train --ckpt_path runs/x/qat8
    python train.py --config configs/imagenet.toml --dataset /data/imagenet --stage qat8

Stages: pretrain, calibrate, qat8, adjustable, finetune (see adj_quant/recipe/stages.py).
Installed as ``adjq-train``; ``python train.py`` in a checkout runs the same.
A config file sets defaults (top level and per-stage tables); flags override them.
"""

from __future__ import annotations

from adj_quant.cli.start import start
from adj_quant.errors import cli_main
from adj_quant.recipe.config import build_parser


def parse(argv=None) -> dict:
    parser = build_parser("train.py", __doc__)
    return vars(parser.parse_args(argv))


@cli_main
def main(argv=None) -> None:
    start(xla=True)
    cli = parse(argv)
    from adj_quant.distribution import exit_if_a_worker_is_lost
    from adj_quant.recipe import stages

    with exit_if_a_worker_is_lost(argv):
        _run(cli, stages)


def _run(cli: dict, stages) -> None:
    stage = cli.pop("stage", None)
    if stage:
        result = stages.STAGE_FUNCTIONS[stage](cli)
        keys = ("top1", "metric", "avg_weight_bits", "avg_act_bits", "best_checkpoint",
                "float_top1")
        print(f"[{stage}] done: " + ", ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
            for k, v in result.items() if k in keys))
        return
    results = stages.run_recipe(cli)
    print(stages.summary_table(results))
    print(f"\nquant_info.json: {results['quant_info']}")


if __name__ == "__main__":
    main()
