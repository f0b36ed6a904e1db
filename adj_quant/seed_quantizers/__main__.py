"""``python -m adj_quant.seed_quantizers``: the same as ``adjq-quantize-checkpoint``."""

import sys

from adj_quant.cli.quantize_checkpoint import main

sys.exit(main())
