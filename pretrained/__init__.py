"""Published float ImageNet weights as adjq float checkpoints.

    adjq-convert SOURCE --output DIR [--model NAME] [--labels_offset 1]

    from pretrained.convert import convert, describe

``convert`` turns a Keras applications weights file, the official TPU EfficientNet-B0
checkpoint or slim's MobileNetV2 / ResNet-V1-50 checkpoints into a float checkpoint
directory (the command ``adjq-convert``, in :mod:`adj_quant.cli.convert`, makes it a
finished ``pretrain`` stage); ``describe`` says what a source holds without converting it.
``pretrained.sources`` reads the three layouts. See ``pretrained/README.md``.

Nothing is imported here: TensorFlow loads only when something is converted.
"""
