#!/usr/bin/env python
"""Train Adjustable Quantization from a checkout (the installed command is ``adjq-train``).

    python train.py                                  # the whole recipe on digits
    python train.py --help                           # every flag

The code is in ``adj_quant/cli/train.py``.
"""

from adj_quant.cli.train import main, parse  # noqa: F401  (tests call both)

if __name__ == "__main__":
    main()
