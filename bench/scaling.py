"""Images per second of float and quantized training with 1 and N replicas.

    python bench/scaling.py                       # N = the GPUs, or 2 logical CPUs
    python bench/scaling.py --replicas 4 --img_size 224 --batch_size 64 --jit_compile

One process; the training steps of the recipe (``Trainer.train_step``: KD + metric term
for the quantized model, cross-entropy for the float one) on random images, with the
global batch ``--batch_size``. The single-replica and N-replica steps alternate round by
round; the medians after warm-up are reported, with the scaling efficiency
``(img/s with N) / (N x img/s with 1)`` and the quantized / float throughput.

On a CPU split into logical devices the replicas share the same cores: this checks the
pipeline, not speed. ``--json`` prints one JSON object as the last line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adj_quant.cli.start import start  # noqa: E402

start(xla=True)  # TensorFlow quiet (before it loads); the XLA kernel settings and cache

# isort: split
import tensorflow as tf  # noqa: E402

from adj_quant import distribution, nets  # noqa: E402
from adj_quant.network import FloatNetwork  # noqa: E402
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork  # noqa: E402
from adj_quant.recipe.config import resolve  # noqa: E402
from adj_quant.recipe.trainer import Trainer  # noqa: E402


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--replicas", type=int, default=None,
                   help="N (default: the number of GPUs, or 2 logical CPUs without GPUs)")
    p.add_argument("--img_size", type=int, default=224, help="image size")
    p.add_argument("--batch_size", type=int, default=16, help="global batch")
    p.add_argument("--width_multiplier", type=float, default=1.0, help="network width")
    p.add_argument("--depth_multiplier", type=float, default=1.0, help="network depth")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds (after one warm-up)")
    p.add_argument("--steps", type=int, default=3, help="steps per round and setting")
    p.add_argument("--jit_compile", action="store_true", help="compile the steps with XLA")
    p.add_argument("--json", action="store_true", help="print one JSON object last")
    return p.parse_args(argv)


def make_step(strategy, kind: str, args, workdir: str):
    """``run(images, labels)`` of one training step of ``kind`` under ``strategy``."""
    net = nets.build("efficientnet_b0", num_classes=10, width_multiplier=args.width_multiplier,
                     depth_multiplier=args.depth_multiplier)
    options = resolve({"img_size": args.img_size, "batch_size": args.batch_size,
                       "width_multiplier": args.width_multiplier,
                       "depth_multiplier": args.depth_multiplier, "progress": False,
                       "jit_compile": args.jit_compile, "bits_trainable": kind == "quant"},
                      "pretrain" if kind == "float" else "adjustable")
    with strategy.scope():
        float_model = FloatNetwork(net, dropout_rate=0.0, drop_connect_rate=0.0)
        if kind == "float":
            trainer = Trainer(float_model, options, os.path.join(workdir, "float"))
        else:
            model = QuantizedNetwork.from_float(float_model, QuantConfig(bits_trainable=True))
            trainer = Trainer(model, options, os.path.join(workdir, "quant"),
                              teacher=float_model)
        step = trainer.train_step()
    lr = tf.constant(1e-6)
    train_bits = tf.constant(kind == "quant")

    def run(images, labels):
        parts = step(*distribution.split_batch(strategy, images, labels), lr, lr, train_bits)
        return float(parts["loss"].numpy())

    return run


def main(argv=None) -> dict:
    args = parse(argv)
    gpus = len(tf.config.list_physical_devices("GPU"))
    replicas = args.replicas or (gpus if gpus > 1 else 2)
    if not gpus:
        distribution.split_cpu(replicas)
    many = tf.distribute.MirroredStrategy(devices=distribution.local_devices()[:replicas])
    one = tf.distribute.get_strategy()
    gen = tf.random.Generator.from_seed(0)
    images = gen.uniform([args.batch_size, args.img_size, args.img_size, 3])
    labels = gen.uniform([args.batch_size], 0, 10, tf.int32)
    settings = [(kind, n) for kind in ("float", "quant") for n in (1, replicas)]
    with tempfile.TemporaryDirectory() as workdir:
        steps = {s: make_step(one if s[1] == 1 else many, s[0], args, workdir)
                 for s in settings}
        times = {s: [] for s in settings}
        for round_ in range(args.rounds + 1):  # round 0 warms up (tracing, compiling)
            for s in settings:
                start = time.perf_counter()
                for _ in range(args.steps):
                    steps[s](images, labels)
                if round_:
                    times[s].append((time.perf_counter() - start) / args.steps)
    ips = {s: args.batch_size / statistics.median(t) for s, t in times.items()}
    result = {"device": "GPU" if gpus else f"CPU split into {replicas} logical devices",
              "replicas": replicas, "img_size": args.img_size, "batch_size": args.batch_size,
              "jit_compile": args.jit_compile}
    for kind in ("float", "quant"):
        result[f"{kind}_img_s_1"] = round(ips[(kind, 1)], 2)
        result[f"{kind}_img_s_{replicas}"] = round(ips[(kind, replicas)], 2)
        result[f"{kind}_scaling_efficiency"] = round(
            ips[(kind, replicas)] / (replicas * ips[(kind, 1)]), 3)
    result["quant_vs_float_throughput_1"] = round(ips[("quant", 1)] / ips[("float", 1)], 3)
    result[f"quant_vs_float_throughput_{replicas}"] = round(
        ips[("quant", replicas)] / ips[("float", replicas)], 3)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
