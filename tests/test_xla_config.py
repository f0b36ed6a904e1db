"""The XLA settings of the quantizer kernels (adj_quant/xla_config.py)."""

import json
import os
import subprocess
import sys

import pytest
import tensorflow as tf
from conftest import ROOT

from adj_quant import xla_config

SNIPPET = """
from adj_quant import xla_config
xla_config.configure()  # before TensorFlow's first op: TF_XLA_FLAGS is read when it starts
import tensorflow as tf
from adj_quant.quantizers.adjustable import AdjustableQuantizer
q = AdjustableQuantizer("q", 8, bits_trainable=True)
x = tf.random.stateless_normal([4, 64, 64, 8], seed=[1, 2])  # a compiled kernel (large)
@tf.function
def f(x):
    with tf.GradientTape() as tape:
        y = q(x)
    return tape.gradient(y, q.range_scale)
print(float(tf.reduce_sum(f(x))))
"""

#: Without the program's own call, the first quantizer kernel applies the settings: while
#: it is traced, so before XLA compiles it (XLA reads XLA_FLAGS at its first compilation).
LAZY = """
import json, os, sys
import tensorflow as tf
from adj_quant import xla_config
from adj_quant.quantizers import adjustable

calls = []
configure = xla_config.configure
def recording():
    calls.append(tf.inside_function())
    configure()
xla_config.configure = recording

before = dict(os.environ)
q = adjustable.AdjustableQuantizer("q", 8)
x = tf.random.stateless_normal([4, 64, 64, 8], seed=[1, 2])
eager = [q(x), adjustable.fake_quantize(x, -1.0, 2.0, 4)]  # op by op: no kernel
unchanged = dict(os.environ) == before
if sys.argv[1] == "module":
    f = tf.function(lambda x: q(x))
else:
    f = tf.function(lambda x: adjustable.fake_quantize(x, -1.0, 2.0, 4))
f(x)
f(x + 1)
print(json.dumps({"unchanged_before": unchanged, "calls": calls,
                  "xla_flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if k not in ("XLA_FLAGS", "TF_XLA_FLAGS", xla_config.CACHE_ENV)}
    env.update(PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", **extra)
    return env


def test_the_kernel_cache_is_written_and_reused(tmp_path):
    cache = tmp_path / "cache"
    runs = [subprocess.run([sys.executable, "-c", SNIPPET], env=_env(ADJQ_XLA_CACHE=str(cache)),
                           capture_output=True, text=True, timeout=300) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr[-2000:]
    files = sorted(p.name for p in cache.iterdir())
    assert files and all(name.startswith("xla_compile_cache") for name in files)
    # The second process loaded the kernels: same files, same result.
    assert runs[0].stdout == runs[1].stdout


@pytest.mark.parametrize("entry", ["module", "functional"])
def test_the_first_compiled_kernel_applies_the_settings_once(entry, tmp_path):
    run = subprocess.run([sys.executable, "-c", LAZY, entry],
                         env=_env(ADJQ_XLA_CACHE=str(tmp_path / "c")),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["unchanged_before"]
    assert result["calls"] == [True]  # once, while the kernel was traced
    assert "--xla_cpu_use_fusion_emitters=false" in result["xla_flags"]


def test_off_writes_no_cache_and_user_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv(xla_config.CACHE_ENV, "off")
    assert xla_config.cache_directory() is None
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_use_fusion_emitters=true")
    monkeypatch.setenv("TF_XLA_FLAGS", "")
    xla_config.configure()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_use_fusion_emitters=true"
    assert "persistent_cache" not in os.environ["TF_XLA_FLAGS"]
    monkeypatch.setenv(xla_config.CACHE_ENV, str(tmp_path / "c"))
    monkeypatch.setenv("TF_XLA_FLAGS", "--tf_xla_persistent_cache_directory=/elsewhere")
    xla_config.configure()
    assert os.environ["TF_XLA_FLAGS"] == "--tf_xla_persistent_cache_directory=/elsewhere"


def test_default_directory_names_the_tensorflow_version(monkeypatch, tmp_path):
    monkeypatch.delenv(xla_config.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    directory = xla_config.cache_directory()
    assert directory.startswith(str(tmp_path / "adjq" / "xla" / f"tf{tf.__version__}-"))
