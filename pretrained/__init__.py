"""Published float ImageNet weights as adjq float checkpoints.

    python -m pretrained.convert SOURCE --output DIR [--model NAME] [--labels_offset 1]

    from pretrained.convert import convert, describe

``convert`` turns a Keras applications weights file, the official TPU EfficientNet-B0
checkpoint or slim's MobileNetV2 / ResNet-V1-50 checkpoints into a directory written like a
finished ``pretrain`` stage; ``describe`` says what a source holds without converting it.
``pretrained.sources`` reads the three layouts. See ``pretrained/README.md``.

Nothing is imported here: ``python -m pretrained.convert`` imports this package first, and
TensorFlow loads only when something is converted.
"""
