"""Ways to compute the activation quantizer's backward pass with XLA on the CPU.

The backward of one activation quantizer (adj_quant/quantizers/formula.py, ``_make_core``)
produces the input gradient ``g_in = g * inside`` and three per-channel sums over the whole
tensor: the gradients of the scale, the zero point and the levels. This script times
several ways of writing that computation on random data of one activation's shape, each
compiled with ``jit_compile=True`` (``--xla_cpu_use_fusion_emitters=false``, as adjq sets
it, unless ``XLA_FLAGS`` says otherwise), and prints each one's median time and how far its
sums are from the first way's (the one adjq uses):

* ``separate``: three ``reduce_sum`` (adjq's);
* ``stacked``: the three terms stacked on a new axis, one ``reduce_sum``;
* ``concat_rows``: the terms side by side along the channels, one reduction over rows;
* ``row_blocks``: that, reduced in blocks of rows, then over the blocks;
* ``ones_matmul``: the row sums as a product with a row of ones;
* ``variadic``: XLA's variadic reduce (one reduction, three outputs);
* ``outside``: the terms from XLA, the sums by TensorFlow's own kernel;
* ``plain``: no XLA at all;
* ``input_grad_only`` / ``one_sum_only``: the parts alone, for scale.

    python bench/quantizer_backward.py                       # 16x112x112x96
    python bench/quantizer_backward.py --shape 16,56,56,144 --repeats 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def activation_shape(text: str) -> list[int]:
    """``N,H,W,C`` as a list of positive integers (argparse type)."""
    try:
        shape = [int(d) for d in text.split(",")]
    except ValueError:
        shape = []
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an activation shape; pass four positive integers N,H,W,C, "
            "e.g. 16,112,112,96")
    return shape


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return value


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", type=activation_shape, default=[16, 112, 112, 96],
                   help="activation shape N,H,W,C (default: 16,112,112,96, EfficientNet-B0's "
                        "largest at 224x224, batch 16)")
    p.add_argument("--repeats", type=positive_int, default=8,
                   help="timed calls per way; the median is reported (default: 8)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    sys.path.insert(0, ROOT)
    from adj_quant import xla_config

    xla_config.configure()  # the XLA flags adjq runs its kernels with
    import numpy as np
    import tensorflow as tf

    scalar = tf.TensorSpec([], tf.float32)
    add3 = tf.function(lambda a0, a1, a2, b0, b1, b2: (a0 + b0, a1 + b1, a2 + b2),
                       autograph=False).get_concrete_function(*[scalar] * 6)
    shape = args.shape
    channels = shape[-1]
    rows = int(np.prod(shape[:-1]))
    axes = list(range(len(shape) - 1))
    x = tf.random.stateless_normal(shape, seed=[0, 1])
    g = tf.random.stateless_normal(shape, seed=[0, 2])
    per_channel = [1] * (len(shape) - 1) + [channels]
    scale = tf.fill(per_channel, 40.0)     # 255 levels over a width of about 6.4
    zero = tf.fill(per_channel, -80.0)
    levels = tf.fill(per_channel, 255.0)

    def terms(x, g):
        r = tf.round(x * scale)
        c = tf.minimum(tf.maximum(r, zero), zero + levels)
        out = c / scale
        g_in = tf.where(tf.equal(r, c), g, tf.zeros_like(g))
        d_scale = g_in * x - g * out
        d_zero = g - g_in
        d_levels = tf.where(r > zero + levels, g, tf.zeros_like(g)) / scale
        return g_in, d_scale, d_zero, d_levels

    def split(s):
        return s[:channels], s[channels:2 * channels], s[2 * channels:]

    def separate(x, g):
        g_in, *parts = terms(x, g)
        return (g_in, *[tf.reduce_sum(t, axes) for t in parts])

    def stacked(x, g):
        g_in, *parts = terms(x, g)
        s = tf.reduce_sum(tf.stack(parts, -2), axes)
        return g_in, s[0], s[1], s[2]

    def concat_rows(x, g):
        g_in, *parts = terms(x, g)
        return (g_in, *split(tf.reduce_sum(tf.reshape(tf.concat(parts, -1), [rows, -1]), 0)))

    def row_blocks(x, g, block=256):
        g_in, *parts = terms(x, g)
        t = tf.concat(parts, -1)
        t = (tf.reshape(t, [rows // block, block, -1]) if rows % block == 0
             else tf.reshape(t, [1, rows, -1]))
        return (g_in, *split(tf.reduce_sum(tf.reduce_sum(t, 1), 0)))

    def ones_matmul(x, g):
        g_in, *parts = terms(x, g)
        t = tf.reshape(tf.concat(parts, -1), [rows, -1])
        return (g_in, *split(tf.matmul(tf.ones([1, rows]), t)[0]))

    def variadic(x, g):
        from tensorflow.compiler.tf2xla.python import xla  # TensorFlow's XLA op wrappers

        g_in, *parts = terms(x, g)
        zero_ = tf.constant(0.0)
        return (g_in, *xla.variadic_reduce(parts, [zero_] * 3, axes, add3))

    terms_xla = tf.function(lambda x, g: tf.concat(terms(x, g)[1:], -1), jit_compile=True)
    g_in_xla = tf.function(lambda x, g: terms(x, g)[0], jit_compile=True)

    def outside(x, g):
        return (g_in_xla(x, g), *split(tf.reduce_sum(terms_xla(x, g), axes)))

    ways = {name: tf.function(fn, jit_compile=True) for name, fn in (
        ("separate", separate), ("stacked", stacked), ("concat_rows", concat_rows),
        ("row_blocks", row_blocks), ("ones_matmul", ones_matmul), ("variadic", variadic))}
    ways["outside"] = tf.function(outside)
    ways["plain"] = tf.function(separate)
    ways["input_grad_only"] = tf.function(lambda x, g: (terms(x, g)[0],), jit_compile=True)
    ways["one_sum_only"] = tf.function(lambda x, g: (tf.reduce_sum(terms(x, g)[1], axes),),
                                       jit_compile=True)

    print(f"shape {shape}, {args.repeats} timed calls each after one untimed; "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| way | median ms | sums vs separate (max relative difference) |")
    print("| --- | ---: | ---: |")
    reference = None
    for name, fn in ways.items():
        try:
            result = [t.numpy() for t in fn(x, g)]
        except Exception as e:  # noqa: BLE001  (a way XLA cannot compile is reported, not fatal)
            print(f"| {name} | FAILED: {type(e).__name__} | |")
            continue
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn(x, g)
            _ = [float(tf.reduce_sum(t[..., :1])) for t in out]  # wait for the results
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = result
        if len(result) == 4:
            diff = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                       for a, b in zip(result[1:], reference[1:]))
            diff = "0 (identical)" if diff == 0 else f"{diff:.1e}"
        else:
            diff = "(part only)"
        print(f"| {name} | {1e3 * statistics.median(times):.1f} | {diff} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
