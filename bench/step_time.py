"""Time one training step of the float and the quantized EfficientNet-B0 on CPU.

One step = forward (``training=True``) + softmax cross-entropy on random labels +
backward + one Adam update of every trainable variable:

* ``float``: :class:`adj_quant.network.FloatNetwork` of ``slim_nets.efficientnet_b0``, batch
  norm in training mode (batch statistics, moving averages updated);
* ``quant``: :class:`adj_quant.qnetwork.QuantizedNetwork` built from that float
  model with every quantizer on and trainable bits (weights, activations, swish inputs
  with ``--swish_bits 0``, biases), activation ranges calibrated on one random batch.

Each model is timed inside ``tf.function`` with and without ``jit_compile=True`` (XLA).
The measurements are interleaved (float, quant, float, quant, ... over every jit setting)
so that noise from other processes on the machine hits all settings alike; the table
reports the median milliseconds per step after ``--warmup`` untimed steps and the
quantized/float ratio per jit setting. A setting whose XLA compilation (or any step)
fails is reported with its error instead of a time.

    python bench/step_time.py                       # 224x224, batch 16, both jit settings
    python bench/step_time.py --jit off --repeats 5 # only plain tf.function
    python bench/step_time.py --json > step_time.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

# Quieter TF start-up; must be set before TensorFlow is imported.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # the benchmark is a CPU benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from adj_quant import xla_config  # noqa: E402

xla_config.configure()  # the kernels' XLA settings and cache, before TensorFlow's first op

# isort: split
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from adj_quant import nets  # noqa: E402
from adj_quant.network import FloatNetwork  # noqa: E402
from adj_quant.qnetwork import QuantConfig, QuantizedNetwork  # noqa: E402

MODES = ("float", "quant")
JIT_CHOICES = {"both": (False, True), "off": (False,), "on": (True,)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Median CPU time of one training step (forward + backward + Adam) of the "
                    "float and the fully quantized EfficientNet-B0, with and without XLA.")
    p.add_argument("--img_size", type=int, default=224,
                   help="input height and width in pixels (default 224)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="images per training step (default 16)")
    p.add_argument("--repeats", type=int, default=10,
                   help="timed steps per setting; the median is reported (default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per setting before timing; the first one traces "
                        "and, with jit, compiles (default 3)")
    p.add_argument("--num_classes", type=int, default=1000,
                   help="number of classes of the logits layer (default 1000)")
    p.add_argument("--modes", default="float,quant",
                   help="comma-separated models to time: float (batch norm, training mode) "
                        "and/or quant (every quantizer, trainable bits) (default float,quant)")
    p.add_argument("--jit", choices=sorted(JIT_CHOICES), default="both",
                   help="time tf.function without (off), with (on) jit_compile=True, or both "
                        "(default both)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, images and labels (default 0)")
    p.add_argument("--json", action="store_true",
                   help="print the results as one JSON object on stdout instead of the table "
                        "(progress still goes to stderr)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        p.error(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    args.modes = list(dict.fromkeys(modes))
    for name in ("img_size", "batch_size", "repeats", "num_classes"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step traces/compiles)")
    return args


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def machine_info() -> dict:
    cpu_model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    return {
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "load_avg_1min_at_start": None if load is None else round(load, 2),
        "tensorflow": tf.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
        "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        "devices": [d.device_type for d in tf.config.get_visible_devices()],
    }


def build_models(args, modes):
    """The float model and (if asked) the quantized model built and calibrated from it."""
    float_model = FloatNetwork(nets.build("efficientnet_b0", num_classes=args.num_classes),
                               seed=args.seed)
    models = {"float": float_model}
    if "quant" in modes:
        qcfg = QuantConfig(weight_bits=8, act_bits=8, swish_bits=0, bias_bits=8,
                           bits_trainable=True)
        qmodel = QuantizedNetwork.from_float(float_model, qcfg, seed=args.seed)
        calib = tf.random.stateless_uniform(
            [args.batch_size, args.img_size, args.img_size, 3], seed=[args.seed, 1])
        qmodel.calibrate_activations([calib], progress=False)
        models["quant"] = qmodel
    return {m: models[m] for m in modes}


def make_step(model: tf.Module, jit: bool, optimizer: str = "keras", autograph: bool = True,
              lean_grappler: bool = False):
    """A compiled training step and the number of variables it trains.

    ``optimizer``: ``"keras"`` (Keras 3's Adam) or ``"adjq"`` (the recipe's own Adam,
    :class:`adj_quant.training_rules.Adam`: one fused ``ResourceApplyAdam`` per variable).
    ``autograph``: convert Python control flow (Keras's ``fit`` does; adjq's trainer does
    not, as its model code needs none).
    ``lean_grappler``: call the step with grappler made lean, as adjq's trainer does
    (:func:`adj_quant.graph_options.lean_grappler`).
    """
    variables = list(model.trainable_variables)
    # Small lr: the weights should stay finite over the few dozen steps of the benchmark.
    if optimizer == "adjq":
        from adj_quant.training_rules import Adam

        adam = Adam(variables, "bench_adam")

        def update(grads):
            adam.apply(grads, variables, 1e-5)
    else:
        opt = tf.keras.optimizers.Adam(learning_rate=1e-5)
        opt.build(variables)  # slots are created eagerly, outside the traced function

        def update(grads):
            opt.apply_gradients([(g, v) for g, v in zip(grads, variables) if g is not None])

    @tf.function(jit_compile=jit, reduce_retracing=True, autograph=autograph)
    def step(images, labels):
        with tf.GradientTape() as tape:
            logits = model(images, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits))
        update(tape.gradient(loss, variables))
        return loss

    if lean_grappler:
        from adj_quant import graph_options

        traced = step

        def step(images, labels):
            with graph_options.lean_grappler():
                return traced(images, labels)

    return step, len(variables)


def short_error(err: BaseException, limit: int = 160) -> str:
    text = " ".join(f"{type(err).__name__}: {err}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run(args) -> dict:
    info = machine_info()
    tf.random.set_seed(args.seed)
    np.random.seed(args.seed)
    images = tf.random.stateless_uniform(
        [args.batch_size, args.img_size, args.img_size, 3], seed=[args.seed, 2])
    labels = tf.random.stateless_uniform(
        [args.batch_size], seed=[args.seed, 3], maxval=args.num_classes, dtype=tf.int32)

    log(f"building models ({', '.join(args.modes)}) ...")
    models = build_models(args, args.modes)
    settings = [(jit, mode) for jit in JIT_CHOICES[args.jit] for mode in args.modes]
    state = {}
    for jit, mode in settings:
        step, nvars = make_step(models[mode], jit, autograph=False, lean_grappler=True)
        state[(jit, mode)] = {"step": step, "vars": nvars, "times": [], "error": None,
                              "first_s": None, "loss": None}

    def one_step(key) -> float | None:
        s = state[key]
        if s["error"] is not None:
            return None
        try:
            t0 = time.perf_counter()
            loss = s["step"](images, labels).numpy()  # .numpy() waits for the step
            dt = time.perf_counter() - t0
        except Exception as err:  # XLA compile / runtime failure: report, don't crash
            s["error"] = short_error(err)
            log(f"  {label(key)}: FAILED {s['error']}")
            return None
        s["loss"] = float(loss)
        return dt

    # Warm-up, interleaved; the first call traces (and with jit compiles).
    for w in range(args.warmup):
        for key in settings:
            dt = one_step(key)
            if w == 0 and dt is not None:
                state[key]["first_s"] = dt
                log(f"  {label(key)}: first step (trace{' + XLA compile' if key[0] else ''}) "
                    f"{dt:.1f} s")
    # Timed steps, interleaved: float, quant, float, quant, ... across all jit settings.
    for r in range(args.repeats):
        for key in settings:
            dt = one_step(key)
            if dt is not None:
                state[key]["times"].append(dt)
        log(f"  repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{label(k)} {state[k]['times'][-1] * 1e3:.0f} ms" for k in settings
            if state[k]["error"] is None and state[k]["times"]))

    results = []
    for jit, mode in settings:
        s = state[(jit, mode)]
        times_ms = [t * 1e3 for t in s["times"]]
        results.append({
            "model": mode, "jit": jit, "trainable_variables": s["vars"],
            "median_ms": statistics.median(times_ms) if times_ms and not s["error"] else None,
            "min_ms": min(times_ms) if times_ms and not s["error"] else None,
            "max_ms": max(times_ms) if times_ms and not s["error"] else None,
            "times_ms": [round(t, 2) for t in times_ms],
            "first_step_s": s["first_s"], "final_loss": s["loss"], "error": s["error"]})
    ratios, round_ratios = {}, {}
    for jit in JIT_CHOICES[args.jit]:
        f = next((r for r in results if r["jit"] == jit and r["model"] == "float"), None)
        q = next((r for r in results if r["jit"] == jit and r["model"] == "quant"), None)
        if f and q and f["median_ms"] and q["median_ms"]:
            ratios["on" if jit else "off"] = q["median_ms"] / f["median_ms"]
            # Steps of one round ran back to back, so their ratio cancels slow load drifts.
            round_ratios["on" if jit else "off"] = statistics.median(
                qt / ft for qt, ft in zip(q["times_ms"], f["times_ms"]))
    return {"machine": info,
            "config": {"img_size": args.img_size, "batch_size": args.batch_size,
                       "repeats": args.repeats, "warmup": args.warmup,
                       "num_classes": args.num_classes, "seed": args.seed,
                       "quant_config": "weight_bits=8 act_bits=8 swish_bits=0 bias_bits=8 "
                                       "bits_trainable=True range_preset=5",
                       "optimizer": "Adam(lr=1e-5), all trainable variables",
                       "loss": "sparse softmax cross-entropy, random labels"},
            "results": results, "ratio_quant_over_float": ratios,
            "ratio_quant_over_float_per_round_median": round_ratios}


def label(key) -> str:
    jit, mode = key
    return f"{mode}/jit={'on' if jit else 'off'}"


def format_table(report: dict) -> str:
    m, c = report["machine"], report["config"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs (os.cpu_count()="
        f"{m['cpu_count']}), load avg at start {m['load_avg_1min_at_start']}",
        f"TensorFlow {m['tensorflow']}, Python {m['python']}, devices {m['devices']}",
        f"batch {c['batch_size']}, {c['img_size']}x{c['img_size']}, {c['num_classes']} classes, "
        f"median of {c['repeats']} interleaved steps after {c['warmup']} warm-up steps, "
        f"seed {c['seed']}",
        f"quant: {c['quant_config']}",
        "",
        "| model | jit_compile | median ms/step | min | max | first step (s) | vars | ratio q/f |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    ratios = report["ratio_quant_over_float"]
    for r in report["results"]:
        jit = "on" if r["jit"] else "off"
        ratio = f"{ratios[jit]:.2f}x" if r["model"] == "quant" and jit in ratios else ""
        if r["error"]:
            lines.append(f"| {r['model']} | {jit} | FAILED: {r['error']} | | | | "
                         f"{r['trainable_variables']} | |")
            continue
        first = f"{r['first_step_s']:.1f}" if r["first_step_s"] is not None else "?"
        lines.append(f"| {r['model']} | {jit} | {r['median_ms']:.0f} | {r['min_ms']:.0f} | "
                     f"{r['max_ms']:.0f} | {first} | {r['trainable_variables']} | {ratio} |")
    if ratios:
        round_ratios = report.get("ratio_quant_over_float_per_round_median", {})
        lines.append("")
        lines.append("quantized/float ratio of the medians: " + ", ".join(
            f"jit {k}: {v:.2f}x" for k, v in ratios.items()))
        lines.append("median of the per-round quantized/float ratios: " + ", ".join(
            f"jit {k}: {v:.2f}x" for k, v in round_ratios.items()))
    bad = [r for r in report["results"] if r["final_loss"] is not None
           and not np.isfinite(r["final_loss"])]
    if bad:
        lines.append("warning: non-finite loss in " + ", ".join(
            f"{r['model']}/jit={'on' if r['jit'] else 'off'}" for r in bad))
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(format_table(report))
    failed = all(r["error"] for r in report["results"])
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
