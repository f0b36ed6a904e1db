"""``pretrained.convert``: published float weights -> adjq float checkpoints.

The oracle is the publisher's own network: each test writes a source in the publisher's
layout from a Keras model (or, for slim's ResNet-V1-50, from our own ``resnet_v1_50``) with
known random weights and data-dependent batch-norm statistics, converts it, restores our
float network from the output directory and compares the logits.
"""

import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow as tf

from adj_quant import nets
from adj_quant.checkpoints import load_spec, resolve_checkpoint, restore_model
from adj_quant.cli import convert as convert_cli
from adj_quant.errors import UserError
from adj_quant.network import FloatNetwork
from adj_quant.recipe.stages import converted_pretrain_files
from pretrained.convert import convert, describe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
TOLERANCE = 1e-4


def _rel(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.linalg.norm(ours - theirs) / np.linalg.norm(theirs))


def _images(size, n=2, seed=1):
    return np.random.default_rng(seed).uniform(0, 1, (n, size, size, 3)).astype(np.float32)


def _restored(directory):
    """Our float network, rebuilt from the directory's model spec and restored."""
    prefix = resolve_checkpoint(directory)
    spec = load_spec(prefix)
    assert spec is not None and spec.kind == "float"
    model = spec.build()
    restore_model(model, prefix, allow_missing=())
    return model


def _our_logits(directory, images):
    return _restored(directory)(tf.constant(images), training=False).numpy()


def _randomize(keras_model, preprocess, size, seed=0, small_gamma=()):
    """Random BN scales/offsets and conv/dense biases, then batch-norm statistics measured on
    random images (momentum 0), so that the signal survives every layer. BN layers whose
    names end with one of ``small_gamma`` get scales 0.1..0.3 (ResNet's last BN of each
    residual branch: with scales near 1 the random ResNet-50 turns a 1e-7 relative change of
    its input into ~6e-5 of its logits, too close to the tolerance; with them, ~2e-6)."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in keras_model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
            low, high = (0.1, 0.3) if small_gamma and layer.name.endswith(small_gamma) else (
                0.8, 1.2)
            layer.gamma.assign(rng.uniform(low, high, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.1, layer.beta.shape))
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.05, layer.bias.shape))
    calib = rng.uniform(0, 1, (8, size, size, 3)).astype(np.float32)
    keras_model(preprocess(calib), training=True)
    return keras_model


def _set_normalization(keras_model, variance):
    import keras

    layer = next(lyr for lyr in keras_model.layers if isinstance(lyr, keras.layers.Normalization))
    layer.set_weights([IMAGENET_MEAN, np.asarray(variance, np.float32), np.array(0)])
    layer.finalize_state()


def _keras_efficientnet(classes, size, variance):
    import keras

    km = keras.applications.EfficientNetB0(weights=None, classes=classes,
                                           input_shape=(size, size, 3),
                                           classifier_activation=None)
    _set_normalization(km, variance)
    return _randomize(km, lambda x: x * 255.0, size)


def _save_legacy_h5(keras_model, path):
    """The legacy (Keras 2) HDF5 layout of the files keras.applications downloads."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, keras_model)


def _save_checkpoint(prefix, values: dict):
    """A TF1 name-based checkpoint (the TPU / slim layout), written without sessions."""
    names = sorted(values)
    tf.raw_ops.SaveV2(prefix=prefix, tensor_names=names, shape_and_slices=[""] * len(names),
                      tensors=[tf.constant(values[n]) for n in names])


def _resnet_input(images):
    """What keras.applications.ResNet50 expects for our resnet_v1_50_keras's input: BGR,
    the same per-channel mean subtracted (slim's VGG means) -- the weights are compared,
    Keras' caffe means differ by 0.001 (see pretrained/README.md)."""
    from slim_nets import resnet_v1_50 as r50

    return (images * 255.0 - np.array(r50.VGG_MEAN, np.float32))[..., ::-1]


# --------------------------------------------------------------------------- Keras sources


@pytest.fixture(scope="module")
def keras_b0():
    """EfficientNetB0, 10 classes, 64x64, normalised as efficientnet_b0 (variance std^2)."""
    return _keras_efficientnet(10, 64, IMAGENET_STD ** 2)


@pytest.fixture(scope="module")
def keras_mnv2_140():
    import keras

    km = keras.applications.MobileNetV2(weights=None, alpha=1.4, classes=1000,
                                        input_shape=(64, 64, 3), classifier_activation=None)
    return _randomize(km, lambda x: x * 2.0 - 1.0, 64)


def test_keras_efficientnet_b0_weights_h5(keras_b0, tmp_path, capsys):
    path = str(tmp_path / "b0.weights.h5")
    keras_b0.save_weights(path)
    out = convert(path, None, str(tmp_path / "out"))
    assert describe(path) == {"format": "keras", "model": "efficientnet_b0", "num_classes": 10,
                              "source_num_classes": 10,
                              "description": "Keras EfficientNetB0 weights"}
    images = _images(64)
    expected = keras_b0(images * 255.0, training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nKeras EfficientNetB0 .weights.h5: rel logit diff {_rel(ours, expected):.2e}",
          file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE
    assert _rel(keras_b0(images[::-1] * 255.0, training=False).numpy(), expected) > 1e-2
    assert "49930" not in capsys.readouterr().err  # variance std^2: nothing to say


def test_keras_efficientnet_published_h5_normalisation(tmp_path, monkeypatch, capsys):
    """The published efficientnetb0.h5 stores the ImageNet *std* as the Normalization
    variance; EfficientNetB0(weights="imagenet") corrects that with an extra Rescaling.
    The oracle is that very graph (get_file patched to return our file)."""
    import keras
    from keras.src.utils import file_utils

    path = str(tmp_path / "efficientnetb0.h5")
    # BN statistics measured under the published graph's normalisation, (x - mean) / std;
    # then the Normalization weights as the published file stores them (variance = std).
    source = _keras_efficientnet(1000, 224, IMAGENET_STD ** 2)
    _set_normalization(source, IMAGENET_STD)
    _save_legacy_h5(source, path)
    monkeypatch.setattr(file_utils, "get_file", lambda *args, **kwargs: path)
    published = keras.applications.EfficientNetB0(weights="imagenet", classifier_activation=None)
    plain = keras.applications.EfficientNetB0(weights=None, classifier_activation=None)
    plain.load_weights(path)

    images = _images(224)
    ours_norm = (images - IMAGENET_MEAN) / IMAGENET_STD
    stem_input = {name: keras.Model(m.input, m.get_layer("stem_conv_pad").input)(
        images * 255.0).numpy() for name, m in (("published", published), ("plain", plain))}
    # weights="imagenet": (x - mean) / std, our normalisation and the original EfficientNet's.
    assert np.abs(stem_input["published"] - ours_norm).max() < 1e-5
    # weights=None + load_weights(file): (x - mean) / sqrt(std), the quirk.
    quirk = (images - IMAGENET_MEAN) / np.sqrt(IMAGENET_STD)
    assert np.abs(stem_input["plain"] - quirk).max() < 1e-5
    print(f"\nnormalisation: weights='imagenet' graph vs ours max |diff| "
          f"{np.abs(stem_input['published'] - ours_norm).max():.1e}; weights=None+load_weights "
          f"vs ours {np.abs(stem_input['plain'] - ours_norm).max():.2f}", file=sys.__stdout__)

    out = convert(path, "efficientnet_b0", str(tmp_path / "out"))
    assert "tensorflow/tensorflow#49930" in capsys.readouterr().err
    expected = published(images * 255.0, training=False).numpy()
    ours = _our_logits(out, images)
    print(f"Keras EfficientNetB0 legacy .h5 (published layout): rel logit diff "
          f"{_rel(ours, expected):.2e}", file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE


def test_keras_mobilenet_v2_140_weights_h5(keras_mnv2_140, tmp_path):
    path = str(tmp_path / "mnv2.weights.h5")
    keras_mnv2_140.save_weights(path)
    out = convert(path, None, str(tmp_path / "out"))
    assert load_spec(resolve_checkpoint(out)).arch == nets.build("mobilenet_v2_140",
                                                                 num_classes=1000)
    images = _images(64)
    expected = keras_mnv2_140(images * 2.0 - 1.0, training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nKeras MobileNetV2 1.4 .weights.h5: rel logit diff {_rel(ours, expected):.2e}",
          file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE
    assert _rel(keras_mnv2_140(images[::-1] * 2.0 - 1.0, training=False).numpy(), expected) > 1e-2


def test_keras_mobilenet_v2_140_keras_file(keras_mnv2_140, tmp_path):
    path = str(tmp_path / "mnv2.keras")
    keras_mnv2_140.save(path)
    out = convert(path, "mobilenet_v2_140", str(tmp_path / "out"))
    images = _images(64, seed=3)
    expected = keras_mnv2_140(images * 2.0 - 1.0, training=False).numpy()
    assert _rel(_our_logits(out, images), expected) <= TOLERANCE


def test_keras_resnet50_weights_h5(tmp_path):
    import keras

    km = keras.applications.ResNet50(weights=None, classes=10, input_shape=(64, 64, 3),
                                     classifier_activation=None)
    _randomize(km, _resnet_input, 64, small_gamma=("_3_bn",))
    path = str(tmp_path / "resnet50.weights.h5")
    km.save_weights(path)
    out = convert(path, None, str(tmp_path / "out"))
    assert load_spec(resolve_checkpoint(out)).arch.name == "resnet_v1_50_keras"
    images = _images(64)
    expected = km(_resnet_input(images), training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nKeras ResNet50 .weights.h5: rel logit diff {_rel(ours, expected):.2e}",
          file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE
    assert _rel(km(_resnet_input(images[::-1]), training=False).numpy(), expected) > 1e-2
    with pytest.raises(UserError, match="resnet_v1_50_keras"):  # slim's arrangement: refused
        convert(path, "resnet_v1_50", str(tmp_path / "slim"))


# --------------------------------------------------------------------------- TPU EfficientNet


def _tpu_values(km) -> dict:
    """The Keras EfficientNetB0's values under the TPU checkpoint names: layers are named in
    call order inside each ``blocks_N`` scope; block 0 (no expand conv) shifts the numbers."""
    p = "efficientnet-b0"
    values = {}

    def kernel(name, layer, attr="kernel"):
        values[f"{p}/{name}"] = np.asarray(getattr(km.get_layer(layer), attr), np.float32)

    def bn(scope, layer):
        for v in ("gamma", "beta", "moving_mean", "moving_variance"):
            kernel(f"{scope}/{v}", layer, v)

    kernel("stem/conv2d/kernel", "stem_conv")
    bn("stem/tpu_batch_normalization", "stem_bn")
    blocks = sorted({lyr.name.split("_")[0] for lyr in km.layers
                     if lyr.name.startswith("block")})
    assert len(blocks) == 16
    for i, k in enumerate(blocks):
        t, first = f"blocks_{i}", k.startswith("block1")
        bns = iter([f"{t}/tpu_batch_normalization", f"{t}/tpu_batch_normalization_1",
                    f"{t}/tpu_batch_normalization_2"])
        if not first:
            kernel(f"{t}/conv2d/kernel", f"{k}_expand_conv")
            bn(next(bns), f"{k}_expand_bn")
        kernel(f"{t}/depthwise_conv2d/depthwise_kernel", f"{k}_dwconv")
        bn(next(bns), f"{k}_bn")
        for tpu, keras_name in (("se/conv2d", "se_reduce"), ("se/conv2d_1", "se_expand")):
            kernel(f"{t}/{tpu}/kernel", f"{k}_{keras_name}")
            kernel(f"{t}/{tpu}/bias", f"{k}_{keras_name}", "bias")
        kernel(f"{t}/conv2d{'' if first else '_1'}/kernel", f"{k}_project_conv")
        bn(next(bns), f"{k}_project_bn")
    kernel("head/conv2d/kernel", "top_conv")
    bn("head/tpu_batch_normalization", "top_bn")
    kernel("head/dense/kernel", "predictions")
    kernel("head/dense/bias", "predictions", "bias")
    return values


def test_tpu_efficientnet_b0_uses_ema(keras_b0, tmp_path, capsys):
    true = _tpu_values(keras_b0)
    rng = np.random.default_rng(5)
    values = {}
    for name, value in true.items():  # raw values off; the EMA shadows hold the model
        values[name] = (value * rng.uniform(0.5, 1.5, value.shape)).astype(np.float32)
        values[f"{name}/ExponentialMovingAverage"] = value
        values[f"{name}/RMSProp"] = np.zeros_like(value)  # optimizer slots are ignored
    values["global_step"] = np.array(1000, np.int64)
    directory = tmp_path / "efficientnet-b0"
    directory.mkdir()
    _save_checkpoint(str(directory / "model.ckpt"), values)
    (directory / "checkpoint").write_text('model_checkpoint_path: "model.ckpt"\n')

    out = convert(str(directory), None, str(tmp_path / "out"),
                  stage_files=converted_pretrain_files)
    err = capsys.readouterr().err
    assert f"ExponentialMovingAverage values of {len(true)} of {len(true)} variables" in err
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["format"] == "tpu" and result["ema_variables"] == len(true)
    images = _images(64)
    expected = keras_b0(images * 255.0, training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nTPU EfficientNet-B0 (EMA): rel logit diff {_rel(ours, expected):.2e}",
          file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE

    # Without the shadows, the raw (perturbed) values are converted: far from the oracle.
    raw = tmp_path / "raw"
    raw.mkdir()
    _save_checkpoint(str(raw / "model.ckpt"), {k: v for k, v in values.items()
                                              if "ExponentialMovingAverage" not in k})
    convert(str(raw / "model.ckpt.index"), "efficientnet_b0", str(tmp_path / "out_raw"))
    assert "ExponentialMovingAverage" not in capsys.readouterr().err
    assert _rel(_our_logits(str(tmp_path / "out_raw"), images), expected) > 1e-2


def test_tpu_other_sizes_refused(tmp_path):
    _save_checkpoint(str(tmp_path / "model.ckpt"),
                     {"efficientnet-b3/stem/conv2d/kernel": np.zeros([3, 3, 3, 40], np.float32)})
    with pytest.raises(UserError, match="efficientnet-b3 checkpoint; only EfficientNet-B0"):
        convert(str(tmp_path / "model.ckpt"), None, str(tmp_path / "out"))


# --------------------------------------------------------------------------- slim checkpoints


def test_slim_mobilenet_v2_140_labels_offset(keras_mnv2_140, tmp_path, capsys):
    """slim's layout: our names, a 1001-class logits layer whose class 0 is background, EMA
    shadows beside the raw values; published as a .tgz with other files."""
    path = str(tmp_path / "mnv2.weights.h5")
    keras_mnv2_140.save_weights(path)
    values = {k: v.numpy() for k, v in
              _restored(convert(path, None, str(tmp_path / "k"))).slim_variables().items()}
    rng = np.random.default_rng(7)
    w, b = "MobilenetV2/Logits/Conv2d_1c_1x1/weights", "MobilenetV2/Logits/Conv2d_1c_1x1/biases"
    values[w] = np.concatenate([rng.normal(0, 1, values[w].shape[:3] + (1,)), values[w]],
                               axis=-1).astype(np.float32)
    values[b] = np.concatenate([[5.0], values[b]]).astype(np.float32)
    ckpt = {f"{k}/ExponentialMovingAverage": v for k, v in values.items()}
    ckpt.update({k: np.zeros_like(v) for k, v in values.items()})
    ckpt["global_step"] = np.array(7, np.int64)
    folder = tmp_path / "tgz"
    folder.mkdir()
    _save_checkpoint(str(folder / "mobilenet_v2_1.4_224.ckpt"), ckpt)
    (folder / "mobilenet_v2_1.4_224_frozen.pb").write_bytes(b"not used")
    tgz = str(tmp_path / "mobilenet_v2_1.4_224.tgz")
    with tarfile.open(tgz, "w:gz") as tar:
        for name in sorted(os.listdir(folder)):
            tar.add(str(folder / name), arcname=f"./{name}")

    with pytest.raises(UserError, match="1001 classes.*pass --labels_offset 1"):
        convert(tgz, None, str(tmp_path / "out"))
    out = convert(tgz, None, str(tmp_path / "out"), labels_offset=1)
    assert "ExponentialMovingAverage values of" in capsys.readouterr().err
    assert load_spec(resolve_checkpoint(out)).arch == nets.build("mobilenet_v2_140",
                                                                 num_classes=1000)
    images = _images(64)
    expected = keras_mnv2_140(images * 2.0 - 1.0, training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nslim MobileNetV2 1.4 (1001 classes, --labels_offset 1): rel logit diff "
          f"{_rel(ours, expected):.2e}", file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE


def test_slim_resnet_v1_50(tmp_path):
    """slim's resnet_v1_50.ckpt (the 2016 V1 checkpoint format, 1000 classes, no background:
    no --labels_offset) against our own resnet_v1_50 holding the same values."""
    net = nets.build("resnet_v1_50", num_classes=1000)
    reference = FloatNetwork(net, bn_momentum=0.0)
    rng = np.random.default_rng(3)
    for layer in reference.layers.values():
        if layer.bn is not None:
            layer.bn.gamma.assign(rng.uniform(0.8, 1.2, layer.bn.gamma.shape))
            layer.bn.beta.assign(rng.normal(0, 0.1, layer.bn.beta.shape))
        else:
            layer.biases.assign(rng.normal(0, 0.05, layer.biases.shape))
    reference(tf.constant(_images(64, n=8, seed=9)), training=True)  # BN statistics
    values = {k: v.numpy() for k, v in reference.slim_variables().items()}
    names = sorted(values) + ["global_step", "resnet_v1_50/conv1/weights/Momentum"]
    data = [values[n] for n in sorted(values)] + [np.array(3, np.int64), values[
        "resnet_v1_50/conv1/weights"] * 0]
    path = str(tmp_path / "resnet_v1_50.ckpt")
    tf.raw_ops.Save(filename=path, tensor_names=names, data=data)  # V1: one file
    assert describe(path)["model"] == "resnet_v1_50"

    out = convert(path, None, str(tmp_path / "out"))
    images = _images(64)
    expected = reference(tf.constant(images), training=False).numpy()
    ours = _our_logits(out, images)
    print(f"\nslim ResNet-V1-50 (V1 checkpoint): rel logit diff {_rel(ours, expected):.2e}",
          file=sys.__stdout__)
    assert _rel(ours, expected) <= TOLERANCE
    with pytest.raises(UserError, match="1000 classes, without a background class"):
        convert(path, None, str(tmp_path / "offset"), labels_offset=1)  # ResNet-V1: 1000
    with pytest.raises(UserError, match="--model resnet_v1_50 "):
        convert(path, "resnet_v1_50_keras", str(tmp_path / "keras"))


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def slim_mnv2(tmp_path_factory):
    """A small valid source: slim MobilenetV2 (1.0) names, 1001 classes."""
    folder = tmp_path_factory.mktemp("slim_mnv2")
    values = {k: v.numpy() for k, v in FloatNetwork(
        nets.build("mobilenet_v2", num_classes=1001)).slim_variables().items()}
    _save_checkpoint(str(folder / "mobilenet_v2_1.0_224.ckpt"), values)
    return str(folder / "mobilenet_v2_1.0_224.ckpt"), values


def _cli(args, capsys):
    """Run the command line in-process: (exit status, stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main(args)
    return exit_info.value.code, capsys.readouterr().err


def test_converts_a_small_slim_checkpoint_and_writes_a_stage_directory(slim_mnv2, tmp_path):
    bare = str(tmp_path / "bare")  # the library alone: the checkpoint and its spec
    assert convert(slim_mnv2[0], None, bare, labels_offset=1) == bare
    assert sorted(os.listdir(bare)) == sorted([
        "checkpoint", "checkpoints.json", "converted.data-00000-of-00001",
        "converted.index", "model_spec.json"])
    out = str(tmp_path / "run" / "pretrain")  # with the recipe's stage files
    assert convert(slim_mnv2[0], None, out, labels_offset=1,
                   stage_files=converted_pretrain_files) == out
    assert sorted(os.listdir(out)) == sorted([
        "checkpoint", "checkpoints.json", "config.json", "converted.data-00000-of-00001",
        "converted.index", "model_spec.json", "result.json"])
    state = json.loads(open(os.path.join(out, "checkpoints.json")).read())
    assert state["finished"] and state["best"] == "converted"
    assert json.loads(open(os.path.join(out, "config.json")).read())["model"] == "mobilenet_v2"
    model = _restored(os.path.join(tmp_path, "run"))  # the run directory resolves to it too
    assert model.net == nets.build("mobilenet_v2", num_classes=1000)
    np.testing.assert_array_equal(model.layers["Logits/Conv2d_1c_1x1"].biases.numpy(),
                                  slim_mnv2[1]["MobilenetV2/Logits/Conv2d_1c_1x1/biases"][1:])


def test_another_network_names_the_first_mismatching_variable(slim_mnv2, tmp_path, capsys):
    code, err = _cli([slim_mnv2[0], "--model", "mobilenet_v2_140", "--labels_offset", "1",
                      "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert ("MobilenetV2/Conv/weights has shape [3, 3, 3, 32] but MobilenetV2/Conv/weights "
            "needs [3, 3, 3, 48]") in err
    code, err = _cli([slim_mnv2[0], "--model", "efficientnet_b0", "--labels_offset", "1",
                      "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no variable for efficientnet_b0/Conv/weights: it holds a slim MobilenetV2" in err
    assert not os.path.exists(tmp_path / "out")


def test_class_count_and_labels_offset(slim_mnv2, tmp_path, capsys):
    code, err = _cli([slim_mnv2[0], "--output", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has 1001 classes: class 0 is slim's background class; pass --labels_offset 1" in err
    values = dict(slim_mnv2[1])  # 1000 classes (no background): the offset would drop one
    for name in ("MobilenetV2/Logits/Conv2d_1c_1x1/weights",
                 "MobilenetV2/Logits/Conv2d_1c_1x1/biases"):
        values[name] = values[name][..., 1:]
    _save_checkpoint(str(tmp_path / "c1000.ckpt"), values)
    code, err = _cli([str(tmp_path / "c1000.ckpt"), "--labels_offset", "1", "--output",
                      str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has 1000 classes, without a background class; leave --labels_offset out" in err
    assert describe(str(tmp_path / "c1000.ckpt"))["num_classes"] == 1000
    assert describe(slim_mnv2[0], labels_offset=1)["num_classes"] == 1000


def test_missing_variable(slim_mnv2, tmp_path, capsys):
    values = {k: v for k, v in slim_mnv2[1].items()
              if k != "MobilenetV2/expanded_conv_5/expand/BatchNorm/gamma"}
    _save_checkpoint(str(tmp_path / "partial.ckpt"), values)
    code, err = _cli([str(tmp_path / "partial.ckpt"), "--labels_offset", "1", "--output",
                      str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "has no variable for MobilenetV2/expanded_conv_5/expand/BatchNorm/gamma" in err


def test_unknown_model_lists_the_known_networks(slim_mnv2, tmp_path, capsys):
    code, err = _cli([slim_mnv2[0], "--model", "resnet_v9", "--output", str(tmp_path / "o")],
                     capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "'resnet_v9' is not a known network; known networks: " + ", ".join(nets.names()) in err


def test_unreadable_sources(tmp_path, capsys):
    text = tmp_path / "model.ckpt"
    text.write_text("not a checkpoint\n")
    (tmp_path / "bad.weights.h5").write_text("garbage")
    (tmp_path / "bad.tgz").write_text("garbage")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "notes.txt").write_text("no checkpoint here")
    for source, expected in (
            (text, "is not a readable Keras weights file or TensorFlow checkpoint"),
            (tmp_path / "absent.h5", "does not exist"),
            (tmp_path / "bad.weights.h5", "is not a readable HDF5 weights file"),
            (tmp_path / "bad.tgz", "is not a readable tarball"),
            (tmp_path / "folder", "no checkpoint (.index or .ckpt) or Keras weights file")):
        code, err = _cli([str(source), "--output", str(tmp_path / "out")], capsys)
        assert code == 2 and expected in err and len(err.strip().splitlines()) == 1, err
    assert not os.path.exists(tmp_path / "out")


def test_output_exists(slim_mnv2, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = [slim_mnv2[0], "--labels_offset", "1", "--output", str(out)]
    code, err = _cli(args, capsys)
    assert code == 2 and "already exists; pass --overwrite" in err
    code, err = _cli(args + ["--overwrite"], capsys)  # not a checkpoint directory: kept
    assert code == 2 and "holds files but no adjq checkpoints" in err
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    convert_cli.main(args + ["--overwrite"])  # an empty directory is replaced
    convert_cli.main(args + ["--overwrite"])  # and so is a checkpoint directory
    assert "converted.index" in os.listdir(out)


def test_command_line_help_and_one_line_errors(tmp_path):
    """The real entry point: help with examples, exit 2 with one line and no traceback."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    run = [sys.executable, "-m", "adj_quant.cli.convert"]
    helped = subprocess.run(run + ["--help"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert helped.returncode == 0 and "examples:" in helped.stdout
    for flag in ("--model", "--output", "--labels_offset", "--overwrite"):
        assert flag in helped.stdout
    bad = subprocess.run(run + [str(tmp_path / "absent.ckpt"), "--output", str(tmp_path / "o")],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    missing = subprocess.run(run + ["x"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert missing.returncode == 2 and "--output" in missing.stderr
    assert missing.stderr.count("\n") == 1


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_train_pretrained_converts_into_the_run_and_starts_at_calibrate(tmp_path, capsys):
    """``train.py --pretrained SOURCE``: the source's network becomes the run's, the
    pretrain stage is the converted checkpoint (no training) and calibrate takes it."""
    from adj_quant.cli import train as train_cli
    from pretrained.sources import _tpu_names
    from slim_nets import efficientnet_b0 as eb0

    values = {k: v.numpy() for k, v in FloatNetwork(
        nets.build("efficientnet_b0", num_classes=10)).slim_variables().items()}
    _save_checkpoint(str(tmp_path / "model.ckpt"),
                     {t: values[s] for s, t in _tpu_names(eb0, "efficientnet-b0").items()})
    run = tmp_path / "run"
    common = ["--dataset", "synthetic", "--img_size", "32", "--batch_size", "25",
              "--calib_images", "50", "--max_val_images", "50", "--no-progress",
              "--pretrained", str(tmp_path / "model.ckpt"), "--run_dir", str(run)]
    with pytest.raises(SystemExit) as exit_info:  # 10 classes in the source, 12 in the data
        train_cli.main(["--stage", "pretrain", "--num_classes", "12", *common])
    assert exit_info.value.code == 2 and not (run / "pretrain").exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "10 classes" in err[0] and "12" in err[0], err
    train_cli.main(["--stage", "pretrain", "--num_classes", "10", *common])
    assert "no float training" in capsys.readouterr().err
    assert json.loads((run / "pretrain" / "model_spec.json").read_text())["network"][
        "name"] == "efficientnet_b0"
    train_cli.main(["--stage", "calibrate", "--num_classes", "10", *common])
    result = json.loads((run / "calibrate" / "result.json").read_text())
    assert result["float_checkpoint"] == str(run / "pretrain" / "converted")
    # Run again: the converted stage is kept, not converted twice.
    train_cli.main(["--stage", "pretrain", "--num_classes", "10", *common])
    assert "already finished" in capsys.readouterr().out
    # eval.py --float takes the converted directory (its config.json gives the defaults).
    from adj_quant.cli import evaluate as eval_cli

    eval_cli.main(["--float", "--ckpt_path", str(run / "pretrain"), "--json", "--dataset",
                   "synthetic", "--num_classes", "10", "--img_size", "32",
                   "--max_val_images", "50", "--no-progress"])
    out = capsys.readouterr().out
    assert 0.0 <= json.loads(out[out.index("{"):])["top1"] <= 1.0
