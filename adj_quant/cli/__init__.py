"""Command-line entry points (``adjq-train``, ``adjq-eval``; the checkout's ``train.py`` and
``eval.py`` are thin wrappers around them)."""
