"""The commands (console scripts ``adjq-train``, ``adjq-eval``, ``adjq-score``,
``adjq-export``, ``adjq-quantize-checkpoint``, ``adjq-convert``, ``adjq-sweep`` and
``adjq-pareto``; the checkout's ``train.py``, ``eval.py`` and ``quantizer.py`` are thin
wrappers). Each ``main()`` starts with :func:`adj_quant.cli.start.start`."""
