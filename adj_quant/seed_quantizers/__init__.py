"""The seeds' checkpoint quantizers (docs/checkpoint_quantization.md): bin, fixed-point and
8-bit weight storage of a TF checkpoint. ``formulas`` quantizes arrays, ``variables`` decides
which variables of a checkpoint are trainable, ``checkpoint_quantizer`` reads, quantizes and
writes checkpoints. The command is :mod:`adj_quant.cli.quantize_checkpoint`
(``adjq-quantize-checkpoint``); the checkout's
``quantizer.py`` is the seed's old form of it."""
