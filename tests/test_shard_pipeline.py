"""End to end: the digits written as class folders and built into shards with
tools/build_tfrecords.py give, read as TFRecords, the built-in digits' images, accuracy and
training (the ImageNet centre crop and Inception augmentation destroyed 32x32 digits).

The digits are written as lossless PNG files at the size the built-in pipeline produces
(32x32, after its bilinear resize), so that the shards' bicubic resize to the same size is
the identity and both pipelines see the same pixels up to the uint8 rounding (0.5/255).
Written at 8x8 instead, the shards' bicubic upsampling differs from the built-in bilinear
one by up to 0.2 (about 1.4 points of top-1 for the same model).
"""

import contextlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from conftest import build_tool, train_stage

from adj_quant.cli import evaluate as eval_cli
from adj_quant.recipe import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "digits.toml")  # what --dataset digits loads by default
IMG_SIZE = 32
# The pretraining of conftest's digits_run (built-in digits, augment shift by default).
PRETRAIN = ["--max_epoch", "6", "--lr", "3e-3", "--lr_fixed", "--bn_momentum", "0.9"]


bt = build_tool()


def collect(ds):
    xs, ys = zip(*((x.numpy(), y.numpy()) for x, y in data.iterate(ds, "test data")))
    return np.concatenate(xs), np.concatenate(ys)


def builtin_images(split):
    """The built-in pipeline's evaluation images of ``split`` (float32 [N, S, S, 3]) and labels."""
    return collect(data.make_dataset("digits", split, batch_size=512, img_size=IMG_SIZE,
                                     training=False))


def shard_images(shards, split, **kw):
    return collect(data.make_dataset("imagenet", split, batch_size=512, img_size=IMG_SIZE,
                                     training=False, dataset_dir=shards, num_classes=10, **kw))


def to_uint8(images):
    return np.round(images[..., 0] * 255).astype(np.uint8)


def examples(images, labels):
    """Sorted (label, uint8 pixels) pairs: a dataset's content, whatever its order."""
    return sorted(zip(labels.tolist(), (pixels.tobytes() for pixels in to_uint8(images))))


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    """Shards of the fixed digits train / validation split, built from PNG class folders."""
    root = tmp_path_factory.mktemp("digit_shards")
    out = root / "shards"
    for split in data.SPLITS:
        folders = root / "images" / split
        images, labels = builtin_images(split)
        for i, (pixels, label) in enumerate(zip(to_uint8(images), labels)):
            folder = folders / f"digit_{label}"  # sorted folder names give labels 0..9
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i:04d}.png").write_bytes(tf.io.encode_png(pixels[..., None]).numpy())
        bt.main(["--input_dir", str(folders), "--output_dir", str(out), "--split", split,
                 "--quiet"])
    return str(out)


def _top1(run_dir):
    with open(os.path.join(run_dir, "pretrain", "result.json")) as fh:
        return json.load(fh)["top1"]


@pytest.fixture(scope="module")
def shard_run(digit_shards, tmp_path_factory):
    """Run directory of digits_run's float pretraining, on the shards."""
    run = tmp_path_factory.mktemp("shard_run")
    train_stage(run, "pretrain", *PRETRAIN, "--config", CONFIG, "--dataset", digit_shards,
                "--num_classes", "10", "--augment", "shift", "--eval_crop", "1.0")
    return run


def evaluate(run_dir, tmp_path, *flags):
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        eval_cli.main(["--ckpt_path", str(run_dir / "pretrain"), "--float", "--json",
                       "--no-progress", "--output", str(tmp_path), *flags])
    return json.loads(out.getvalue())["top1"]


def test_shards_hold_the_builtin_images(digit_shards):
    for split in data.SPLITS:
        builtin, labels = builtin_images(split)
        shards, shard_labels = shard_images(digit_shards, split, eval_crop=1.0)
        assert shards.shape == builtin.shape and shards.dtype == np.float32
        assert shards.min() >= 0 and shards.max() <= 1
        # the digits are distinct
        index = {pixels.tobytes(): i for i, pixels in enumerate(to_uint8(builtin))}
        match = np.array([index.get(pixels.tobytes(), -1) for pixels in to_uint8(shards)])
        # the builder shuffles them
        np.testing.assert_array_equal(np.sort(match), np.arange(len(builtin)))
        np.testing.assert_array_equal(shard_labels, labels[match])
        diff = np.abs(shards - builtin[match]).max()
        assert diff <= 0.5 / 255 + 1e-6, diff  # only the PNG's uint8 rounding
        # The default crop (7/8 of the side, EfficientNet's at 224) zooms in on the digit.
        cropped, _ = shard_images(digit_shards, split)
        assert np.abs(cropped - builtin[match]).max() > 0.2


def test_shard_training_data_is_the_builtin_training_data(digit_shards):
    """augment="none" and "shift" stream the same images as the built-in digits' training."""
    kw = dict(batch_size=512, img_size=IMG_SIZE, training=True, seed=7, dataset_dir=digit_shards,
              num_classes=10, eval_crop=1.0)
    plain, labels = collect(data.make_dataset("imagenet", "train", augment="none", **kw))
    shifted, shifted_labels = collect(data.make_dataset("imagenet", "train", augment="shift", **kw))
    # same order: only the augmentation differs
    np.testing.assert_array_equal(labels, shifted_labels)
    builtin, builtin_labels = builtin_images("train")
    assert examples(plain, labels) == examples(builtin, builtin_labels)
    pad = max(1, IMG_SIZE // 10)  # the digits' shift
    padded = np.pad(plain[..., 0], [(0, 0), (pad, pad), (pad, pad)])
    moves = []
    for image, source in zip(shifted[..., 0], padded):
        found = [(y, x) for y in range(2 * pad + 1) for x in range(2 * pad + 1)
                 if np.allclose(source[y:y + IMG_SIZE, x:x + IMG_SIZE], image, atol=1e-6)]
        assert found, "a shifted training image is not a translation of its source"
        moves.append(found[0])
    assert len(set(moves)) > (2 * pad + 1) ** 2 // 2  # many different shifts


def test_float_model_has_the_same_accuracy_on_the_shards(digits_run, digit_shards, tmp_path):
    builtin = evaluate(digits_run, tmp_path, "--dataset", "digits")
    shards = evaluate(digits_run, tmp_path, "--dataset", digit_shards, "--num_classes", "10",
                      "--eval_crop", "1.0")
    print(f"float model: top-1 {100 * builtin:.2f}% on the built-in digits, "
          f"{100 * shards:.2f}% on the shards")
    assert builtin > 0.8
    assert abs(shards - builtin) <= 0.02


def test_pretraining_on_the_shards_reaches_the_builtin_accuracy(digits_run, shard_run):
    """Both runs see the same images and augmentation, in another order (and other shifts).

    With this short fixed-rate schedule the best top-1 of one run depends on that order:
    measured over six shard runs (trainer seeds 0-3, builder seeds 0-2) it was 95.6 +- 2.1 %,
    and over four digits runs 96.1 +- 0.7 %, the worst pair 3.6 points apart (hence 5 points,
    not 2). The old preprocessing is far below: 49 % (Inception crop and flip, centre crop of
    half the side), 62 % (Inception crop and flip, no centre crop)."""
    builtin, shards = _top1(digits_run), _top1(shard_run)
    print(f"pretraining: best top-1 {100 * builtin:.2f}% on the built-in digits, "
          f"{100 * shards:.2f}% on the shards")
    assert builtin > 0.8
    assert shards >= builtin - 0.05
