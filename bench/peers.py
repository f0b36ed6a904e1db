"""adjq's EfficientNet-B0 side by side with its peers: Keras float and tfmot 8-bit QAT, on CPU.

Models (``--models``, default the first four):

* ``adjq_float``: :class:`adj_quant.network.FloatNetwork` of ``slim_nets.efficientnet_b0``,
  batch norm in training mode (batch statistics), as in ``bench/step_time.py``;
* ``adjq_quant``: :class:`adj_quant.qnetwork.QuantizedNetwork` built from it with
  ``QuantConfig(weight_bits=8, act_bits=8, swish_bits=0, bias_bits=8, bits_trainable=True)``,
  activation ranges calibrated on one random batch (``step_time.build_models``); like
  step_time it has no dropout, while the three other models keep dropout 0.2 and drop
  connect 0.2;
* ``keras_float``: Keras 3 ``keras.applications.EfficientNetB0(weights=None,
  classes=--num_classes, classifier_activation=None)`` (logits), preprocessing included;
* ``tfmot_qat``: tfmot's default 8-bit QAT of tf-keras's (Keras 2) EfficientNetB0. tfmot
  refuses the SE ``Multiply``, ``Rescaling`` and ``Normalization`` layers, so every layer
  except those is annotated (``quantize_annotate_layer`` in a ``clone_function``) and the
  refused ones stay float; the output says how many;
* ``tf_keras_float`` (opt-in): tf-keras's float EfficientNetB0, tfmot's own float baseline;
  with it, ``tfmot_vs_tf_keras`` is tfmot's QAT cost without the Keras 3 / Keras 2 difference.

One training step = forward (``training=True``) + softmax cross-entropy on fixed random
labels + backward + one Adam update (lr 1e-5) of every trainable variable, inside
``tf.function`` (``--jit_compile`` for XLA; adjq's steps are traced without AutoGraph, as
its trainer traces them, the Keras and tfmot ones with it, as ``fit`` does). Every model
uses the same step
(``step_time.make_step``) with its own framework's Adam: the adjq models train with the
recipe's optimizer (``adj_quant.training_rules.Adam``, one fused ``ResourceApplyAdam`` per
variable), the Keras and tfmot models with Keras 3's Adam (which also updates the tf-keras
variables directly). Global seeds are set once, before any model
is built (see ``seed_everything``).

Arrangement: ONE process. Keras 3 and tf-keras (with tfmot) share a process without trouble,
so all models are timed side by side under the same load. One catch: importing tfmot sets
``TF_USE_LEGACY_KERAS=1``, which turns ``tf.keras`` into tf-keras if ``tf.keras`` has not
been resolved yet. The script therefore ignores a ``TF_USE_LEGACY_KERAS`` from the
environment, resolves ``tf.keras`` to Keras 3 before importing tfmot (tfmot finds tf-keras
by itself) and removes the variable again afterwards, so the child processes start clean.

Method:

* time to first step: build (for adjq_quant: float model + quantized twin + calibration;
  for tfmot_qat: tf-keras model + annotate + quantize_apply) + trace + first step, measured
  per model in this process after a tiny warm-up of the TensorFlow runtime, and again in a
  fresh process for the peak-RSS measurement (``first_step_fresh_s``). adjq compiles its
  activation quantizers with XLA and keeps the kernels in an on-disk cache
  (``adj_quant/xla_config.py``); the script starts from an empty temporary cache, so the
  in-process number is a cold start. The cache's keys contain TensorFlow's function names,
  which depend on what the process traced before, so the fresh process (which traced
  nothing else) compiles its kernels too: a cold start in a new process, as the first stage
  of a run pays. For the adjq models the same child runs a second time and finds those
  kernels (``first_step_fresh_warm_s``: what the same command pays when run again, e.g.
  the next sweep point). ``--warm_cache`` uses the user's cache instead;
* training step: ``--warmup`` untimed steps (the first is the first step above), then
  ``--rounds`` rounds of one step per model in turn (A, B, C, D, A, B, C, D, ...). Reported:
  median, min and max ms per model; each ratio is the median of the per-round ratios (the
  two steps of a round ran close together, which cancels slow load drifts), with the min-max
  across rounds, plus the ratio of the medians;
* inference: forward with ``training=False`` (quantizers on) of ``--infer_batch_size``
  images (default 32) inside ``tf.function``, warm-up and interleaved rounds as above;
  images per second from the median;
* peak RSS: one child process of this script per model (hidden ``--_rss_child MODEL``) that
  imports only what its model needs, builds it and runs 3 training steps; its peak RSS is
  reported (``VmHWM`` from ``/proc/self/status``, not ``ru_maxrss``: a child's ``ru_maxrss``
  starts at the RSS of the parent that spawned it, here several GB), and the peak after its
  imports for reference. ``--skip_rss`` skips this;
* load: the CPU time used by other processes during the timed phases, from ``/proc/stat``
  minus this process's own CPU time (in CPUs, e.g. 0.5 = half a core), per phase and the
  worst round, and the 1-minute load average at start and end.

The peers need the ``bench`` extra (``pip install -e ".[bench]"``: tf-keras and
tensorflow-model-optimization). Without it the script says so in one line on stderr and
times the adjq models only; the ratios that need a peer are null in the JSON.

    python bench/peers.py                       # 224x224, batch 16 (not yet run at this size)
    python bench/peers.py --json | tail -n 1 > peers.json   # the JSON is the last line
    python bench/peers.py --models adjq_quant,tfmot_qat --skip_rss
    python bench/peers.py --img_size 64 --batch_size 2 --rounds 3 --warmup 1 --num_classes 10
                                                # smoke run, ~6 min on 2 busy cores
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))

ADJQ_MODELS = ("adjq_float", "adjq_quant")
PEER_MODELS = ("keras_float", "tfmot_qat", "tf_keras_float")
ALL_MODELS = ADJQ_MODELS + PEER_MODELS
DEFAULT_MODELS = "adjq_float,adjq_quant,keras_float,tfmot_qat"
TFMOT_FLOAT_CLASSES = ("Multiply", "Rescaling", "Normalization")  # tfmot refuses these
RSS_CHILD_STEPS = 3
PEER_MODULES = {"keras_float": ("keras",), "tf_keras_float": ("tf_keras",),
                "tfmot_qat": ("tf_keras", "tensorflow_model_optimization")}
# JSON key: (numerator, denominator) models.
RATIOS = {
    "float_vs_keras": ("adjq_float", "keras_float"),
    "quant_vs_tfmot": ("adjq_quant", "tfmot_qat"),
    "quant_vs_float": ("adjq_quant", "adjq_float"),
    "tfmot_vs_keras": ("tfmot_qat", "keras_float"),
    "tfmot_vs_tf_keras": ("tfmot_qat", "tf_keras_float"),
}
RSS_RATIOS = {
    "peak_rss_quant_vs_float": ("adjq_quant", "adjq_float"),
    "peak_rss_tfmot_vs_keras": ("tfmot_qat", "keras_float"),
}
FIRST_STEP_KEYS = {"adjq_quant": "first_step_quant_s", "adjq_float": "first_step_float_s",
                   "keras_float": "first_step_keras_s", "tfmot_qat": "first_step_tfmot_s",
                   "tf_keras_float": "first_step_tf_keras_s"}
PEERS_MISSING = ("bench/peers.py: the peers (Keras's float EfficientNetB0 via tf-keras, tfmot "
                 "QAT) are not installed; install them with pip install -e \".[bench]\" — "
                 "running the adjq part only")
ARRANGEMENT = ("one process: adjq (plain TF), Keras 3 and tf-keras/tfmot side by side; "
               "every model trains with the same step and its own framework's Adam")

# TensorFlow, NumPy and bench/step_time.py, imported by load_tensorflow() once the environment
# is set (and after argument parsing, so --help and bad flags answer at once).
tf = np = st = None


# --------------------------------------------------------------------------- arguments

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="CPU training-step time, time to first step, inference speed and peak "
                    "memory of adjq's float and quantized EfficientNet-B0 next to Keras's "
                    "float EfficientNetB0 and its tfmot 8-bit QAT. Arrangement: " + ARRANGEMENT
                    + "; tf.keras is pinned to Keras 3 before tfmot is imported.",
        epilog="The peers need pip install -e \".[bench]\"; without them only the adjq models "
               "run. Progress goes to stderr.")
    p.add_argument("--img_size", type=int, default=224,
                   help="input height and width in pixels (default 224)")
    p.add_argument("--batch_size", type=int, default=16,
                   help="images per training step (default 16)")
    p.add_argument("--rounds", type=int, default=10,
                   help="timed rounds; each round runs one step of every model in turn "
                        "(default 10)")
    p.add_argument("--warmup", type=int, default=3,
                   help="untimed steps per model before the rounds; the first one traces "
                        "(default 3)")
    p.add_argument("--num_classes", type=int, default=1000,
                   help="number of classes of the logits layer (default 1000)")
    p.add_argument("--models", default=DEFAULT_MODELS,
                   help=f"comma-separated models to run, from {', '.join(ALL_MODELS)} "
                        f"(default {DEFAULT_MODELS})")
    p.add_argument("--infer_batch_size", type=int, default=32,
                   help="images per inference call (training=False, quantizers on) "
                        "(default 32)")
    p.add_argument("--skip_rss", action="store_true",
                   help="skip the peak-RSS measurement (one child process per model)")
    p.add_argument("--jit_compile", action="store_true",
                   help="compile the training and inference functions with XLA "
                        "(tf.function(jit_compile=True)); default off")
    p.add_argument("--json", action="store_true",
                   help="after the table, print the results as one JSON object on the last "
                        "line of stdout")
    p.add_argument("--warm_cache", action="store_true",
                   help="use adjq's on-disk XLA kernel cache as it is (ADJQ_XLA_CACHE or "
                        "~/.cache/adjq/xla); by default the run starts from an empty "
                        "temporary cache, so the in-process first step is a cold start and "
                        "the fresh-process one (peak-RSS children) a warm start")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the weights, images and labels (default 0)")
    p.add_argument("--_rss_child", metavar="MODEL", choices=ALL_MODELS, default=None,
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    bad = [m for m in models if m not in ALL_MODELS]
    if bad or not models:
        p.error(f"--models {args.models!r}: choose from {', '.join(ALL_MODELS)}")
    args.models = list(dict.fromkeys(models))
    for name in ("img_size", "batch_size", "rounds", "num_classes", "infer_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.img_size < 32 and any(m not in ADJQ_MODELS for m in args.models):
        p.error("--img_size must be at least 32 for Keras's EfficientNetB0")
    if args.warmup < 1:
        p.error("--warmup must be at least 1 (the first step traces)")
    return args


# --------------------------------------------------------------------------- imports

def load_tensorflow() -> None:
    """Import TensorFlow and step_time with tf.keras pinned to Keras 3."""
    global tf, st, np
    os.environ.pop("TF_USE_LEGACY_KERAS", None)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import numpy
    import step_time  # noqa: E402  (puts the repository root on sys.path, imports TF)
    import tensorflow

    tf, st, np = tensorflow, step_time, numpy
    # Resolve the lazy tf.keras now: step_time.make_step's Adam must be Keras 3's.
    if not tf.keras.optimizers.Adam.__module__.startswith("keras."):
        raise RuntimeError(f"tf.keras is not Keras 3 ({tf.keras.optimizers.Adam.__module__})")


def import_peers(models=PEER_MODELS) -> dict | None:
    """The modules the peer ``models`` need, by name, or None when one is not installed.

    The main process checks the whole ``bench`` extra; an RSS child imports only its own.
    """
    names = sorted({m for model in models for m in PEER_MODULES.get(model, ())})
    try:
        return {name: importlib.import_module(name) for name in names}
    except ImportError:
        return None
    finally:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)  # set by tfmot's import


# --------------------------------------------------------------------------- models

def build_model(name: str, args, peers):
    """``(model, info)``: the model ``name`` built from scratch, and notes about it."""
    if name == "adjq_float":
        return st.build_models(args, ["float"])["float"], {}
    if name == "adjq_quant":
        return st.build_models(args, ["quant"])["quant"], {}
    if name == "keras_float":
        return keras_efficientnet(peers["keras"], args), {}
    if name == "tf_keras_float":
        return keras_efficientnet(peers["tf_keras"], args), {}
    if name == "tfmot_qat":
        return tfmot_efficientnet(peers, args)
    raise ValueError(name)


def keras_efficientnet(keras_module, args):
    """EfficientNetB0 of ``keras_module`` (Keras 3 or tf-keras), random weights, logits out."""
    return keras_module.applications.EfficientNetB0(
        weights=None, classes=args.num_classes, classifier_activation=None,
        input_shape=(args.img_size, args.img_size, 3))


def tfmot_efficientnet(peers, args):
    """tfmot default 8-bit QAT of tf-keras's EfficientNetB0; refused layers stay float."""
    tf_keras = peers["tf_keras"]
    qk = peers["tensorflow_model_optimization"].quantization.keras
    float_model = keras_efficientnet(tf_keras, args)

    def annotate(layer):
        if type(layer).__name__ in TFMOT_FLOAT_CLASSES:
            return layer
        return qk.quantize_annotate_layer(layer)

    annotated = tf_keras.models.clone_model(float_model, clone_function=annotate)
    model = qk.quantize_apply(annotated)
    wrappers = ("QuantizeWrapper", "QuantizeWrapperV2", "QuantizeLayer", "InputLayer")
    left_float = {}
    for layer in model.layers:
        kind = type(layer).__name__
        if kind not in wrappers:
            left_float[kind] = left_float.get(kind, 0) + 1
    quantized = sum(type(layer).__name__.startswith("QuantizeWrapper") for layer in model.layers)
    return model, {"tfmot_float_layers": left_float, "tfmot_quantized_layers": quantized}


def make_infer(model, jit: bool):
    @tf.function(jit_compile=jit, reduce_retracing=True)
    def infer(images):
        return model(images, training=False)
    return infer


def seed_everything(seed: int, peers) -> None:
    """Global seeds (Python, NumPy, TF, Keras), set once before any model is built.

    Not per model: ``tf.random.set_seed`` after a step was traced makes that step's next call
    take seconds (measured: 0.1 s -> 3.8 s at 32x32), which would spoil a warm-up.
    """
    random.seed(seed)
    np.random.seed(seed)
    tf.random.set_seed(seed)
    for name in ("keras", "tf_keras"):  # their own seed generators too
        if name in (peers or {}):
            peers[name].utils.set_random_seed(seed)


def make_data(args, batch: int, salt: int):
    images = tf.random.stateless_uniform([batch, args.img_size, args.img_size, 3],
                                         seed=[args.seed, salt])
    labels = tf.random.stateless_uniform([batch], seed=[args.seed, salt + 1],
                                         maxval=args.num_classes, dtype=tf.int32)
    return images, labels


def warm_up_runtime() -> None:
    """Run a few tiny ops once, so the first model's first step does not pay TF's start-up."""
    x = tf.random.uniform([1, 8, 8, 3])
    w = tf.Variable(tf.random.uniform([3, 3, 3, 4]))
    opt = tf.keras.optimizers.Adam(1e-5)

    @tf.function
    def f():
        with tf.GradientTape() as tape:
            y = tf.nn.conv2d(x, w, 1, "SAME")
            y = tf.nn.depthwise_conv2d(y, tf.ones([3, 3, 4, 1]), [1, 1, 1, 1], "SAME")
            loss = tf.reduce_mean(tf.nn.swish(y))
        opt.apply_gradients([(tape.gradient(loss, w), w)])
        return loss

    f().numpy()


# --------------------------------------------------------------------------- measurement

def cpu_snapshot():
    """``(wall s, busy CPU s of the machine, steal s, this process's CPU s)``."""
    hz = os.sysconf("SC_CLK_TCK")
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy, stolen = (user + nice + system + irq + softirq) / hz, steal / hz
    except (OSError, ValueError):
        busy = stolen = None
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), busy, stolen, own.ru_utime + own.ru_stime


def other_load(start, end) -> dict:
    """CPUs used by other processes (and stolen by the hypervisor) between two snapshots."""
    wall = end[0] - start[0]
    if start[1] is None or end[1] is None or wall <= 0:
        return {"other_cpus": None, "own_cpus": None, "steal_cpus": None}
    own = (end[3] - start[3]) / wall
    other = max(0.0, (end[1] - start[1]) / wall - own)
    return {"other_cpus": round(other, 3), "own_cpus": round(own, 3),
            "steal_cpus": round((end[2] - start[2]) / wall, 3)}


def load_avg():
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


class Entry:
    """One model under test: its functions, timings and errors."""

    def __init__(self, name: str):
        self.name, self.info, self.error = name, {}, None
        self.model = self.step = self.infer = None
        self.vars = None
        self.build_s = self.first_step_s = self.loss = None
        self.train_ms: list = []   # per round; None where the step failed
        self.infer_ms: list = []

    def fail(self, err: BaseException) -> None:
        self.error = st.short_error(err)
        st.log(f"  {self.name}: FAILED {self.error}")


def train_call(e: Entry, data) -> float:
    """One timed training step of ``e`` in ms; keeps its loss."""
    t0 = time.perf_counter()
    e.loss = float(e.step(*data).numpy())  # .numpy() waits for the step
    return (time.perf_counter() - t0) * 1e3


def infer_call(e: Entry, images) -> float:
    """One timed inference call of ``e`` in ms."""
    t0 = time.perf_counter()
    e.infer(images).numpy()
    return (time.perf_counter() - t0) * 1e3


def optimizer_of(name: str) -> str:
    """Each framework trains with its own Adam: adjq's recipe optimizer, Keras 3's for the rest."""
    return "adjq" if name.startswith("adjq") else "keras"


def uses_autograph(name: str) -> bool:
    """Each framework traces its step as it trains: adjq's trainer without AutoGraph, Keras
    (``fit``) with it."""
    return not name.startswith("adjq")


def uses_lean_grappler(name: str) -> bool:
    """adjq's trainer calls its steps with a leaner grappler (:mod:`adj_quant.graph_options`);
    Keras and tfmot keep TensorFlow's defaults."""
    return name.startswith("adjq")


def first_step(entry: Entry, args, peers, data) -> None:
    """Build + make the step + first (tracing) step of ``entry``, timed."""
    try:
        t0 = time.perf_counter()
        entry.model, entry.info = build_model(entry.name, args, peers)
        entry.build_s = time.perf_counter() - t0
        entry.step, entry.vars = st.make_step(entry.model, args.jit_compile,
                                              optimizer_of(entry.name),
                                              autograph=uses_autograph(entry.name),
                                              lean_grappler=uses_lean_grappler(entry.name))
        entry.loss = float(entry.step(*data).numpy())
        entry.first_step_s = time.perf_counter() - t0
        st.log(f"  {entry.name}: build {entry.build_s:.1f} s, build + trace + first step "
               f"{entry.first_step_s:.1f} s")
    except Exception as err:  # report the model as failed, keep the others
        entry.fail(err)


def attempt(e: Entry, call):
    """``call(e)`` (ms), or None when ``e`` failed now or before; a failure marks ``e``."""
    if e.error is not None:
        return None
    try:
        return call(e)
    except Exception as err:  # report the model as failed, keep the others
        e.fail(err)
        return None


def run_phase(entries, call, record: str, warmup: int, rounds: int, label: str) -> dict:
    """``warmup`` untimed rounds, then ``rounds`` timed ones of ``call`` over ``entries`` in
    turn, appended to ``entry.<record>``; returns the other processes' load meanwhile."""
    def one_round(what: str) -> dict:
        times = {e.name: attempt(e, call) for e in entries}
        st.log(f"  {label} {what}: " + ", ".join(
            f"{name} {ms:.0f} ms" for name, ms in times.items() if ms is not None))
        return times

    for w in range(warmup):
        one_round(f"warm-up {w + 1}")
    start, per_round = cpu_snapshot(), []
    for r in range(rounds):
        before = cpu_snapshot()
        times = one_round(f"{r + 1}/{rounds}")
        per_round.append(other_load(before, cpu_snapshot())["other_cpus"])
        for e in entries:
            getattr(e, record).append(times[e.name])
    phase = other_load(start, cpu_snapshot())
    known = [v for v in per_round if v is not None]
    phase["other_cpus_worst_round"] = max(known) if known else None
    return phase


def measure_rss(name: str, args) -> dict:
    """Peak RSS of a fresh process that builds ``name`` and trains it a few steps."""
    cmd = [sys.executable, os.path.abspath(__file__), "--_rss_child", name,
           "--img_size", str(args.img_size), "--batch_size", str(args.batch_size),
           "--num_classes", str(args.num_classes), "--seed", str(args.seed)]
    if args.jit_compile:
        cmd.append("--jit_compile")
    st.log(f"  peak RSS: {name} in a child process ...")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ))
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"child exited {proc.returncode}: {tail[:160]}"}
    return json.loads(lines[-1])


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM``, else ``ru_maxrss``.

    ``ru_maxrss`` of a child started by a big parent is at least the parent's RSS (Linux
    keeps the pre-exec high-water mark, and the forked copy has the parent's pages), so it
    would report the parent; ``VmHWM`` belongs to the memory map created by ``exec``.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_child(args) -> int:
    """Hidden mode: build one model, train it, print its memory and start-up time as JSON."""
    name = args._rss_child
    load_tensorflow()
    peers = import_peers([name]) if name in PEER_MODELS else None
    if name in PEER_MODELS and peers is None:
        print(PEERS_MISSING, file=sys.stderr)
        return 1
    after_import = peak_rss_mb()
    seed_everything(args.seed, peers)
    data = make_data(args, args.batch_size, 2)
    t0 = time.perf_counter()
    model, _ = build_model(name, args, peers)
    step, _ = st.make_step(model, args.jit_compile, optimizer_of(name),
                           autograph=uses_autograph(name),
                           lean_grappler=uses_lean_grappler(name))
    step(*data).numpy()
    first = time.perf_counter() - t0
    for _ in range(RSS_CHILD_STEPS - 1):
        step(*data).numpy()
    print(json.dumps({"model": name, "peak_rss_mb": round(peak_rss_mb(), 1),
                      "rss_after_import_mb": round(after_import, 1),
                      "first_step_fresh_s": round(first, 2)}))
    return 0


# --------------------------------------------------------------------------- summary

def spread(values) -> dict | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "n": len(values)}


def ratio(entries: dict, num: str, den: str, record: str = "train_ms") -> dict | None:
    """Median and spread of the per-round ratios ``num/den``, and the ratio of medians."""
    a, b = entries.get(num), entries.get(den)
    if a is None or b is None or a.error or b.error:
        return None
    pairs = [x / y for x, y in zip(getattr(a, record), getattr(b, record))
             if x is not None and y is not None]
    out = spread(pairs)
    if out is not None:
        out["of_medians"] = (statistics.median(x for x in getattr(a, record) if x is not None)
                             / statistics.median(y for y in getattr(b, record) if y is not None))
    return out


def rounded(obj, digits: int = 4):
    if isinstance(obj, float):
        return round(obj, digits)
    if isinstance(obj, dict):
        return {k: rounded(v, digits) for k, v in obj.items()}
    if isinstance(obj, list):
        return [rounded(v, digits) for v in obj]
    return obj


def summarize(args, entries: dict, peers_available, load: dict, rss: dict) -> dict:
    models = {}
    for name, e in entries.items():
        train, infer = spread(e.train_ms), spread(e.infer_ms)
        models[name] = {
            "train_ms": train, "train_ms_per_round": e.train_ms,
            "infer_ms": infer,
            "infer_img_per_s": (args.infer_batch_size / infer["median"] * 1e3) if infer else None,
            "build_s": e.build_s, "first_step_s": e.first_step_s,
            "trainable_variables": e.vars, "final_loss": e.loss, "error": e.error,
            **e.info, **rss.get(name, {})}
    ratios = {key: ratio(entries, *pair) for key, pair in RATIOS.items()}
    infer_ratios = {key: ratio(entries, *pair, record="infer_ms") for key, pair in RATIOS.items()}
    report = {key: (r["median"] if r else None) for key, r in ratios.items()}
    for name, key in FIRST_STEP_KEYS.items():
        report[key] = models.get(name, {}).get("first_step_s")
    for key, (num, den) in RSS_RATIOS.items():
        a, b = rss.get(num, {}).get("peak_rss_mb"), rss.get(den, {}).get("peak_rss_mb")
        report[key] = a / b if a and b else None
    report.update({
        "ratios": ratios, "infer_ratios": infer_ratios,
        "infer_img_per_s": {n: m["infer_img_per_s"] for n, m in models.items()},
        "peak_rss_mb": {n: m.get("peak_rss_mb") for n, m in models.items()},
        "tfmot_float_layers": models.get("tfmot_qat", {}).get("tfmot_float_layers"),
        "models": models, "peers_available": peers_available, "arrangement": ARRANGEMENT,
        "load": load, "machine": st.machine_info(),
        "settings": {"img_size": args.img_size, "batch_size": args.batch_size,
                     "infer_batch_size": args.infer_batch_size, "rounds": args.rounds,
                     "warmup": args.warmup, "num_classes": args.num_classes,
                     "models": list(entries), "jit_compile": args.jit_compile,
                     "seed": args.seed, "skip_rss": args.skip_rss,
                     "optimizer": "Adam(lr=1e-5), all trainable variables: adjq's own "
                                  "(training_rules.Adam) for adjq models, Keras 3's for the others",
                     "loss": "sparse softmax cross-entropy, fixed random labels",
                     "adjq_quant_config": "weight_bits=8 act_bits=8 swish_bits=0 bias_bits=8 "
                                          "bits_trainable=True"}})
    return rounded(report)


def fmt(value, pattern: str = "{:.0f}", none: str = "-") -> str:
    return none if value is None else pattern.format(value)


def format_table(rep: dict) -> str:
    m, s, load = rep["machine"], rep["settings"], rep["load"]
    lines = [
        f"machine: {m['cpu_model']}, {m['cpus_usable']} usable CPUs (os.cpu_count()="
        f"{m['cpu_count']}); TensorFlow {m['tensorflow']}, Python {m['python']}",
        f"batch {s['batch_size']}, {s['img_size']}x{s['img_size']}, {s['num_classes']} classes, "
        f"jit_compile {'on' if s['jit_compile'] else 'off'}, {s['rounds']} interleaved rounds "
        f"after {s['warmup']} warm-up steps, seed {s['seed']}",
        f"arrangement: {rep['arrangement']}",
        f"other processes' CPU load: training {fmt(load['train']['other_cpus'], '{:.2f}')} "
        f"CPUs on average (worst round {fmt(load['train']['other_cpus_worst_round'], '{:.2f}')}),"
        f" inference {fmt(load['infer']['other_cpus'], '{:.2f}')}; steal "
        f"{fmt(load['train']['steal_cpus'], '{:.2f}')}; load average "
        f"{load['load_avg_start']} at start, {load['load_avg_end']} at end",
    ]
    tfmot = rep["models"].get("tfmot_qat", {})
    if tfmot.get("tfmot_float_layers") is not None:
        left = tfmot["tfmot_float_layers"]
        lines.append(f"tfmot_qat: {sum(left.values())} layers left float ("
                     + ", ".join(f"{n} {k}" for k, n in sorted(left.items())) + "), "
                     f"{tfmot['tfmot_quantized_layers']} layers quantized")
    lines += ["",
              f"| model | train median ms | min | max | time to first step s (build) | "
              f"infer img/s (batch {s['infer_batch_size']}) | peak RSS MB | "
              f"fresh process first step s (again) |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in rep["models"].items():
        if r["error"]:
            lines.append(f"| {name} | FAILED: {r['error']} | | | | | | |")
            continue
        t = r["train_ms"] or {}
        lines.append(
            f"| {name} | {fmt(t.get('median'))} | {fmt(t.get('min'))} | {fmt(t.get('max'))} | "
            f"{fmt(r['first_step_s'], '{:.1f}')} ({fmt(r['build_s'], '{:.1f}')}) | "
            f"{fmt(r['infer_img_per_s'], '{:.1f}')} | "
            f"{r['rss_error'] if r.get('rss_error') else fmt(r.get('peak_rss_mb'))} | "
            f"{fmt(r.get('first_step_fresh_s'), '{:.1f}')}"
            + (f" ({fmt(r['first_step_fresh_warm_s'], '{:.1f}')})"
               if r.get("first_step_fresh_warm_s") is not None else "") + " |")
    if any(rep["ratios"].values()):
        lines += ["", "ratios: median of the per-round ratios [min-max over rounds] "
                      "(ratio of the medians)"]
    for key, (num, den) in RATIOS.items():
        for kind, table in (("train", rep["ratios"]), ("infer", rep["infer_ratios"])):
            r = table.get(key)
            if r:
                lines.append(f"  {kind} {key:18s} {num}/{den}: {r['median']:.2f}x "
                             f"[{r['min']:.2f}-{r['max']:.2f}] ({r['of_medians']:.2f}x)")
    for key in RSS_RATIOS:
        if rep[key] is not None:
            lines.append(f"  {key}: {rep[key]:.2f}x")
    bad = [n for n, r in rep["models"].items()
           if r["final_loss"] is not None and not math.isfinite(r["final_loss"])]
    if bad:
        lines.append("warning: non-finite loss in " + ", ".join(bad))
    if rep["peers_available"] is False:
        lines.append("peers not installed: only the adjq models ran")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main

def run(args, names: list, peers):
    """Build, time and measure the models ``names``: ``(entries, load, rss)``."""
    seed_everything(args.seed, peers)
    train_data = make_data(args, args.batch_size, 2)
    infer_images, _ = make_data(args, args.infer_batch_size, 4)
    warm_up_runtime()
    load = {"load_avg_start": load_avg()}
    entries = {name: Entry(name) for name in names}
    st.log(f"building and tracing ({', '.join(names)}) ...")
    for e in entries.values():
        first_step(e, args, peers, train_data)
    live = list(entries.values())  # in the order A, B, C, D of every round
    st.log("training steps ...")
    load["train"] = run_phase(live, lambda e: train_call(e, train_data), "train_ms",
                              args.warmup - 1, args.rounds, "round")  # 1st step was warm-up 1
    st.log("inference ...")
    for e in live:
        if e.error is None:
            e.infer = make_infer(e.model, args.jit_compile)
    load["infer"] = run_phase(live, lambda e: infer_call(e, infer_images), "infer_ms",
                              args.warmup, args.rounds, "inference round")
    load["load_avg_end"] = load_avg()
    rss = {}
    if not args.skip_rss:
        for name in names:
            child = measure_rss(name, args)
            rss[name] = ({"rss_error": child["error"]} if "error" in child else
                         {k: v for k, v in child.items() if k != "model"})
            if name.startswith("adjq") and "error" not in child:
                # The same child again finds the kernels the first one compiled.
                again = measure_rss(name, args)
                rss[name]["first_step_fresh_warm_s"] = again.get("first_step_fresh_s")
    return entries, load, rss


def main(argv=None) -> int:
    args = parse_args(argv)
    if args._rss_child:
        load_tensorflow()
        return rss_child(args)
    if args.warm_cache:
        return main_run(args)
    # A cold start in this process, a warm one in the children (they inherit the variable).
    with tempfile.TemporaryDirectory(prefix="adjq-xla-cache-") as cache:
        os.environ["ADJQ_XLA_CACHE"] = cache
        return main_run(args)


def main_run(args) -> int:
    load_tensorflow()
    names = args.models
    peers = peers_available = None  # None: no peer model was asked for
    if any(n in PEER_MODELS for n in names):
        peers = import_peers()
        peers_available = peers is not None
        if peers is None:
            print(PEERS_MISSING, file=sys.stderr, flush=True)
            names = [n for n in names if n in ADJQ_MODELS]
            if not names:
                return 1
    entries, load, rss = run(args, names, peers)
    report = summarize(args, entries, peers_available, load, rss)
    print(format_table(report))
    if args.json:
        print(json.dumps(report))
    return 1 if all(e.error for e in entries.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
