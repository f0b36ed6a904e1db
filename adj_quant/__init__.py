"""adjq: Adjustable Quantization for TensorFlow.

Importing the package imports TensorFlow with its C++ start-up chatter (oneDNN, CUDA
probing) silenced, so command-line errors stay one line. ``TF_CPP_MIN_LOG_LEVEL`` set by
the user is respected.
"""

import contextlib as _contextlib
import os as _os
import sys as _sys

_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

__version__ = "0.1.0"


@_contextlib.contextmanager
def quiet_stderr():
    """Silence whatever native code writes to file descriptor 2 inside the block."""
    _sys.stderr.flush()
    saved = _os.dup(2)
    devnull = _os.open(_os.devnull, _os.O_WRONLY)
    _os.dup2(devnull, 2)
    try:
        yield
    finally:
        _os.dup2(saved, 2)
        _os.close(saved)
        _os.close(devnull)


if "tensorflow" not in _sys.modules:
    with quiet_stderr():
        import tensorflow  # noqa: F401
