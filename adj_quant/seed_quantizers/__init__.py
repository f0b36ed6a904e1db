"""The seeds' checkpoint quantizers: bin, fixed-point and 8-bit weight storage of a TF
checkpoint (``checkpoint_quantizer``), their command line (``cli``: ``adjq-quantize-checkpoint``,
``python -m adj_quant.seed_quantizers``) and the old ``quantizer.py`` form in the checkout."""
