"""How a command starts: a quiet TensorFlow and, for the commands that train or run quantized
models, the XLA settings of the quantizer kernels.

Importing a command's module changes nothing; its ``main()`` calls :func:`start` first:

* ``TF_CPP_MIN_LOG_LEVEL=3`` (unless the user set it) and TensorFlow imported with its C++
  start-up chatter (oneDNN, CUDA probing) silenced, so that a command's errors stay one line;
* with ``xla=True``, :func:`adj_quant.xla_config.configure`: the compile flags and the
  on-disk kernel cache, which TensorFlow reads when its runtime starts, so before the
  command creates its first tensor.

A program of your own that wants the kernel cache calls ``adj_quant.xla_config.configure()``
the same way, before it creates a tensor.
"""

import contextlib
import os
import sys


@contextlib.contextmanager
def quiet_stderr():
    """Silence whatever native code writes to file descriptor 2 inside the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def start(xla: bool = False) -> None:
    """Quiet TensorFlow start-up; ``xla``: also the quantizer kernels' XLA settings."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if "tensorflow" not in sys.modules:
        with quiet_stderr():
            import tensorflow  # noqa: F401
    if xla:
        from adj_quant import xla_config

        xla_config.configure()
