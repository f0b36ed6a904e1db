"""Run in a fresh process by test_distributed.py: MirroredStrategy over 2 logical CPUs.

    python tests/replicas_check.py SPEC.json

SPEC.json: ``{"out", "run_dir", "pretrain", "qat8", "model", "stages": [[stage, [flags...]],
...], "evaluate": [flags...]}`` (``model``: the ``--model`` of the stages).

1. One adjustable step's gradients (bits trainable, KD, the metric term) on one device
   and summed over 2 replicas, for the same global batch.
2. The recipe's stages of ``stages``, run as a user runs them with
   ``--strategy mirrored --logical_cpus 2``.
3. ``eval.py`` with the flags ``evaluate`` under the same strategy (its result is saved as
   ``evaluate`` in the output).

The logical devices must be set before TensorFlow initialises, hence a process of its own.
"""

import json
import os
import sys

import numpy as np
import tensorflow as tf

from adj_quant import distribution
from adj_quant import training_rules as rules
from adj_quant.cli import train as train_cli
from adj_quant.recipe import data as data_lib
from adj_quant.recipe import stages
from adj_quant.recipe.trainer import Trainer


def build(strategy, cli, qat8_ckpt):
    with strategy.scope():
        st = stages.Stage("adjustable", dict(cli))
        teacher = st.teacher()
        model = st.quantized_from(qat8_ckpt, "qat8", stages.quant_config(st.o, True), None)
        return st, Trainer(model, st.o, os.path.join(cli["run_dir"], "scratch"), teacher=teacher)


def gradients(strategy, trainer, images, labels):
    variables = trainer.weight_vars + trainer.bits_vars
    replicas = strategy.num_replicas_in_sync

    def replica(x, y):
        with tf.GradientTape() as tape:
            parts = rules.replica_share(
                trainer._loss(x, y, training=True),
                distribution.replica_fraction(x, trainer.o.batch_size), replicas, trainer.o.beta)
        grads = tape.gradient(parts["loss"], variables)
        return parts["loss"], distribution.all_reduce_sum(grads) if replicas > 1 else grads

    @tf.function
    def run(x, y):
        loss, grads = strategy.run(replica, (x, y))
        return distribution.reduce_sum(strategy, loss), [
            strategy.experimental_local_results(g)[0] for g in grads]

    loss, grads = run(*distribution.split_batch(strategy, images, labels))
    return float(loss), {v.name: g.numpy() for v, g in zip(variables, grads)}


def main(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    run_dir, pretrain_dir, qat8_ckpt = spec["run_dir"], spec["pretrain"], spec["qat8"]
    distribution.split_cpu(2)
    mirrored = distribution.get_strategy("mirrored", logical_cpus=2)
    cli = {"img_size": 32, "batch_size": 32, "model": spec["model"], "progress": False,
           "bits_trainable": True, "metric": 0.01, "lr_bits": 0.05,
           "run_dir": run_dir, "teacher_ckpt": pretrain_dir}
    batches = data_lib.make_dataset("digits", "train", batch_size=32, img_size=32, training=True,
                                    seed=7, drop_remainder=True)
    images, labels = next(iter(batches))
    result = {}
    for name, strategy in (("one", tf.distribute.get_strategy()), ("two", mirrored)):
        _, trainer = build(strategy, cli, qat8_ckpt)
        result[f"loss_{name}"], grads = gradients(strategy, trainer, images, labels)
        np.savez(os.path.join(run_dir, f"grads_{name}.npz"), **grads)

    result["replicas"] = mirrored.num_replicas_in_sync

    # The recipe's stages, as a user runs them.
    for stage, flags in spec["stages"]:
        train_cli.main(["--stage", stage, "--run_dir", run_dir, *flags, "--strategy", "mirrored",
                        "--logical_cpus", "2"])
    if "evaluate" in spec:
        from adj_quant.cli import evaluate
        result["evaluate"] = evaluate.evaluate_checkpoint(evaluate.parse(
            [*spec["evaluate"], "--strategy", "mirrored", "--logical_cpus", "2"]))
    with open(spec["out"], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
