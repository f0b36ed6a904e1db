"""Why whole-step XLA is slow on CPU: single layers of EfficientNet-B0, forward and
forward + backward, plain ``tf.function`` against ``jit_compile=True``.

    python bench/xla_layers.py

Each line gives the median of 6 timed calls (after one warm-up) per setting, alternating
the settings, and the XLA/plain ratio.
"""
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # a CPU benchmark
import tensorflow as tf  # noqa: E402

CASES = {
    "conv3x3 [16,56,56,48]->48": (
        lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"), [16, 56, 56, 48], [3, 3, 48, 48]),
    "conv1x1 [16,56,56,144]->24": (
        lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"), [16, 56, 56, 144], [1, 1, 144, 24]),
    "dws3x3 [16,112,112,96] s2": (
        lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 2, 2, 1], "SAME"), [16, 112, 112, 96],
        [3, 3, 96, 1]),
    "dws5x5 [16,28,28,240]": (
        lambda x, w: tf.nn.depthwise_conv2d(x, w, [1, 1, 1, 1], "SAME"), [16, 28, 28, 240],
        [5, 5, 240, 1]),
    "swish+BN-like elementwise [16,112,112,96]": (
        lambda x, w: x * tf.sigmoid(x) * w[0, 0, 0, 0], [16, 112, 112, 96], [1, 1, 1, 1]),
}


def make(f, jit, part):
    """A (jit-)compiled forward or forward + backward of layer ``f``."""
    @tf.function(jit_compile=jit)
    def step(x, w):
        with tf.GradientTape() as t:
            t.watch([x, w])
            y = f(x, w)
        if part == "fwd":
            return tf.reduce_sum(y)
        gx, gw = t.gradient(y, [x, w])
        return tf.reduce_sum(gx) + tf.reduce_sum(gw)
    return step


def ratio_line(m, part):
    plain, jit = m[(False, part)], m[(True, part)]
    return f"{plain:.1f} ms vs jit {jit:.1f} ms ({jit / plain:.1f}x)"


for name, (f, xs, ws) in CASES.items():
    x = tf.random.normal(xs)
    w = tf.random.normal(ws)
    fns = {(jit, part): make(f, jit, part) for jit in (False, True) for part in ("fwd", "fwd+bwd")}
    for fn in fns.values():
        fn(x, w)
    times = {k: [] for k in fns}
    for i in range(7):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn(x, w).numpy()
            times[k].append(time.perf_counter() - t)
    m = {k: statistics.median(v[1:]) * 1e3 for k, v in times.items()}
    print(f"{name}: fwd {ratio_line(m, 'fwd')}; fwd+bwd {ratio_line(m, 'fwd+bwd')}")
