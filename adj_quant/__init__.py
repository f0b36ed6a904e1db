"""adjq: Adjustable Quantization for TensorFlow."""

import os as _os

# Keep TensorFlow's C++ start-up chatter out of the user's terminal.
_os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
