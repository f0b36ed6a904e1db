"""Quiet TensorFlow start-up for the command-line tools.

Importing this module imports TensorFlow with its C++ start-up chatter (oneDNN, CUDA
probing) silenced, so that command-line errors stay one line. ``TF_CPP_MIN_LOG_LEVEL``
set by the user is respected. The library itself (``import adj_quant``) changes nothing.
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


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
if "tensorflow" not in sys.modules:
    with quiet_stderr():
        import tensorflow  # noqa: F401
