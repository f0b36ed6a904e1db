"""Every convolutional keras.applications constructor of the installed Keras, imported.

The list of constructors is whatever ``keras.applications`` holds, not a list kept here.
Each is built at a small input (weights=None, 10 classes), given random batch-norm and
layer-norm scales and moving statistics from a real batch (as tests/test_keras_import.py
does), and then either

* imports with logits equal to the Keras model's within 1e-4 of their largest value, and
  runs through ``quantize``, ``calibrate`` and ``micronet_cost``; or
* is refused with one line, and docs/networks.md names the constructor among the refused.

By default one constructor per family runs (its smallest member, :data:`DEFAULT`); the
other members are collected but skipped. ``pytest --every-keras-application`` runs every
constructor. A family is a constructor's name without its size (:func:`family`), and
``test_every_family_has_a_default_member`` fails when the installed Keras brings a family
with no default member, so that no family is skipped unnoticed. Of the default members,
those in :data:`FAST` run in the fast suite (``-m 'not slow'``); the rest are slow.
"""

import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import api
from adj_quant.errors import UserError
from adj_quant.keras_import import from_keras, load_weights
from adj_quant.network import FloatNetwork

keras = pytest.importorskip("keras")

CLASSES = 10
#: The smallest input some constructors accept (the rest take 32).
MIN_SIZE = {"InceptionV3": 75, "InceptionResNetV2": 75, "Xception": 71}
#: Run in the fast suite: small members of families that tests/test_keras_import.py does
#: not cover already.
FAST = ("MobileNet", "MobileNetV3Small", "DenseNet121", "ResNet50V2", "VGG16", "ConvNeXtTiny",
        "InceptionV3", "Xception")
#: Run by default: the smallest member of each family (one per family).
DEFAULT = FAST + ("EfficientNetB0", "EfficientNetV2B0", "ResNet50", "MobileNetV2",
                  "NASNetMobile", "InceptionResNetV2")
#: The size part of a constructor's name: B0-B7, an EfficientNetV2 size (S, M, L after the
#: version), a word size, or a depth (121, 50, 16) that is not a version's number (V2, V3).
SIZE = re.compile(r"B\d$|(?<=V\d)[SML]$|(?:Tiny|Small|Base|XLarge|Large|Mobile)$|(?<![V\d])\d+")
#: Run every constructor, not only the default member of each family.
OPTION = "--every-keras-application"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "networks.md"


def constructors() -> list[str]:
    """The model constructors of keras.applications (capitalised callables)."""
    return sorted(name for name in dir(keras.applications)
                  if name[:1].isupper() and callable(getattr(keras.applications, name)))


def family(name: str) -> str:
    """The constructor's name without its size: ``ResNet152V2`` -> ``ResNetV2``."""
    return SIZE.sub("", name)


def _layers(model):
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
        else:
            yield layer


def _prepare(model, lo, hi, size, rng, count=8):
    """Normalisation statistics where the model has none, random scales, moving statistics
    of one batch."""
    for layer in _layers(model):
        if isinstance(layer, keras.layers.Normalization) and layer.mean is None:
            layer.set_weights([np.array(IMAGENET_MEAN, np.float32),
                               np.array(IMAGENET_STD, np.float32) ** 2, np.array(0)])
            layer.finalize_state()
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # the moving statistics become this batch's
            if layer.gamma is not None:
                layer.gamma.assign(rng.uniform(0.8, 1.2, layer.gamma.shape))
            if layer.beta is not None:
                layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape))
        if isinstance(layer, keras.layers.LayerNormalization):
            layer.gamma.assign(rng.uniform(0.8, 1.2, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape))
        if type(layer).__name__ == "LayerScale":  # initialised at 1e-6: the branch counts
            layer.gamma.assign(rng.uniform(0.3, 0.6, layer.gamma.shape))
        if isinstance(layer, keras.layers.Dense) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
    calib = rng.uniform(0, 1, (count, size, size, 3)).astype(np.float32)
    model(lo + (hi - lo) * calib, training=True)


def _refused_in_docs() -> str:
    text = DOC.read_text()
    start = text.index("## Refused keras.applications constructors")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def _size(name: str) -> int:
    """At 32 pixels EfficientNet's last stages see 1x1 maps, where batch-norm statistics of
    a few single values amplify float32 rounding past 1e-4 of the logits: 64 for them."""
    return MIN_SIZE.get(name, 64 if name.startswith("EfficientNet") else 32)


def _calibration_images(name: str) -> int:
    """Batch-norm statistics from 8 images; 32 for EfficientNet, whose small final maps
    give ill-conditioned statistics (logits in the hundreds) from fewer."""
    return 32 if name.startswith("EfficientNet") else 8


def _case(name):
    marks = () if name in FAST else (pytest.mark.slow,)
    return pytest.param(name, marks=marks, id=name)


def test_family_names():
    expected = {"ConvNeXtXLarge": "ConvNeXt", "ConvNeXtTiny": "ConvNeXt",
                "DenseNet201": "DenseNet", "EfficientNetB7": "EfficientNet",
                "EfficientNetV2B3": "EfficientNetV2", "EfficientNetV2S": "EfficientNetV2",
                "EfficientNetV2L": "EfficientNetV2", "InceptionResNetV2": "InceptionResNetV2",
                "InceptionV3": "InceptionV3", "MobileNet": "MobileNet",
                "MobileNetV2": "MobileNetV2", "MobileNetV3Large": "MobileNetV3",
                "NASNetMobile": "NASNet", "NASNetLarge": "NASNet", "ResNet101": "ResNet",
                "ResNet152V2": "ResNetV2", "VGG19": "VGG", "Xception": "Xception"}
    assert {name: family(name) for name in expected} == expected


def test_every_family_has_a_default_member():
    """A family of the installed Keras with no member in DEFAULT would only run under
    --every-keras-application: add its smallest member to DEFAULT."""
    names = constructors()
    defaults = {}
    for name in DEFAULT:
        assert name in names, f"{name} is not in keras.applications"
        assert family(name) not in defaults, f"{name} and {defaults[family(name)]}: one family"
        defaults[family(name)] = name
    missing = sorted({family(name) for name in names} - set(defaults))
    assert not missing, f"families without a default member: {missing}"


@pytest.mark.parametrize("name", [_case(n) for n in constructors()])
def test_keras_application_imports_or_is_refused(name, request):
    if name not in DEFAULT and not request.config.getoption(OPTION):
        pytest.skip(f"{family(name)} family: only its default member runs; "
                    f"pass {OPTION} to run every constructor")
    size = _size(name)
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classes=CLASSES, classifier_activation=None)
    # Models with their own preprocessing see pixels; so do those without any normalising
    # layer (VGG), whose signal would drown in the random logits bias at [-1, 1]
    normalising = (keras.layers.Rescaling, keras.layers.Normalization,
                   keras.layers.BatchNormalization)
    kinds = {type(layer) for layer in _layers(model) if isinstance(layer, normalising)}
    pixels = kinds != {keras.layers.BatchNormalization}
    lo, hi = (0.0, 255.0) if pixels else (-1.0, 1.0)
    rng = np.random.default_rng(0)
    _prepare(model, lo, hi, size, rng, _calibration_images(name))
    try:
        net, weights = from_keras(model, name=name, input_range=(lo, hi))
    except UserError as err:
        assert "\n" not in str(err)
        assert f"| {name} |" in _refused_in_docs(), f"{name} refused, not in the docs: {err}"
        return
    float_model = FloatNetwork(net)
    load_weights(float_model, weights)
    images = rng.uniform(0, 1, (3, size, size, 3)).astype(np.float32)
    ours = float_model(images).numpy()  # a NumPy batch, as the README feeds it
    theirs = np.asarray(model(lo + (hi - lo) * images, training=False))
    scale = float(np.abs(theirs).max())
    assert scale > 1e-3  # the logits neither vanish ...
    assert np.abs(theirs - theirs.mean(axis=0)).max() > 1e-3 * scale  # ... nor ignore the image
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale)
    np.testing.assert_allclose(float_model(images.astype(np.float64)).numpy(), ours,
                               rtol=1e-6, atol=1e-6 * scale)

    qnet = api.quantize(float_model)
    api.calibrate(qnet, images, progress=False)
    out = qnet(tf.constant(images)).numpy()
    assert out.shape == (3, CLASSES) and np.isfinite(out).all()
    counts = api.micronet_cost(qnet, img_size=size).as_floats()
    assert all(np.isfinite(v) and v > 0 for v in counts.values())
