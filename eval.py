#!/usr/bin/env python
"""Evaluate a checkpoint from a checkout (the installed command is ``adjq-eval``).

    python eval.py --ckpt_path runs/digits/finetune
    python eval.py --help                            # every flag

The code is in ``adj_quant/cli/evaluate.py``.
"""

from adj_quant.cli.evaluate import main, parse  # noqa: F401  (tests call both)

if __name__ == "__main__":
    main()
