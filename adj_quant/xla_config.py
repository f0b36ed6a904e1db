"""XLA settings for the quantizer kernels: faster compilation and an on-disk cache.

Every activation quantizer runs as an XLA-compiled kernel, one per distinct tensor shape
(:mod:`adj_quant.quantizers.kernels`); EfficientNet-B0 at one image size and batch has
about 35 such shapes, each compiled once forward and once backward. Two settings make that
cheap; :func:`configure` applies them, unless the user's own ``XLA_FLAGS`` /
``TF_XLA_FLAGS`` already set them:

* ``--xla_cpu_use_fusion_emitters=false`` (``XLA_FLAGS``): XLA's older CPU loop emitter
  compiles these small elementwise kernels faster, and the kernels run as fast;
* ``--tf_xla_persistent_cache_directory=DIR`` (``TF_XLA_FLAGS``): compiled kernels are kept
  on disk, so running the same command again (a sweep's next point, a rerun with other
  numbers) loads them instead of compiling again. The cache's keys contain TensorFlow's
  function names, which count up through everything a process traced before, so a process
  that traces other things first (another stage as its first stage, another network)
  compiles its own; within one process the stages share their kernels anyway. ``DIR`` is
  ``$ADJQ_XLA_CACHE`` if set, else
  ``$XDG_CACHE_HOME/adjq/xla/<TF version>-<CPU>`` (``~/.cache`` by default); the CPU
  fingerprint keeps machines with other instruction sets (a shared home directory) apart.
  ``ADJQ_XLA_CACHE=off`` turns the cache off.

Importing this module (or any of adjq) changes nothing; :func:`configure` is called:

* by the quantizer kernels themselves (:mod:`adj_quant.quantizers.kernels`), once, when the
  first one is traced: before XLA compiles it;
* by a program, before its first TensorFlow op, for the kernel cache.

TensorFlow reads ``XLA_FLAGS`` when it first compiles with XLA, so the emitter setting
applied by the first kernel takes effect. ``TF_XLA_FLAGS`` is read earlier, when TensorFlow's
runtime starts (its first op, e.g. creating a variable, long before the first kernel): set
after that it has no effect, so the cache is only used by a program that calls
:func:`configure` first (after ``import tensorflow`` is fine). A kernel from the cache is
the same executable that compiling would produce.
"""

from __future__ import annotations

import hashlib
import os
import platform

CACHE_ENV = "ADJQ_XLA_CACHE"
_OFF = ("off", "0", "false", "no", "")


def _cpu_fingerprint() -> str:
    """A short hash of the CPU model and its instruction-set flags."""
    text = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags", "Features"))]
        text += "".join(sorted(set(lines)))
    except OSError:
        text += platform.processor()
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def cache_directory() -> str | None:
    """Where compiled kernels are kept, or None when the cache is turned off."""
    chosen = os.environ.get(CACHE_ENV)
    if chosen is not None:
        return None if chosen.strip().lower() in _OFF else os.path.expanduser(chosen)
    import tensorflow as tf

    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "adjq", "xla", f"tf{tf.__version__}-{_cpu_fingerprint()}")


def _add_flag(variable: str, name: str, value: str) -> None:
    current = os.environ.get(variable, "")
    if f"--{name}" not in current:
        os.environ[variable] = f"{current} --{name}={value}".strip()


def configure() -> None:
    """Set the XLA flags above (idempotent; the user's own settings win)."""
    _add_flag("XLA_FLAGS", "xla_cpu_use_fusion_emitters", "false")
    directory = cache_directory()
    if directory is None:
        return
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError:
        return  # an unwritable cache location: compile every time, as without the cache
    _add_flag("TF_XLA_FLAGS", "tf_xla_persistent_cache_directory", directory)
