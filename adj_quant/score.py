"""``python -m adj_quant.score``: the MicroNet scorer (``adjq-score``; see
:mod:`adj_quant.cli.score`)."""

from adj_quant.cli.score import main

if __name__ == "__main__":
    main()
