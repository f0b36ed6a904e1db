"""Input pipelines: ``digits`` (bundled), ``imagenet`` (slim TFRecords) and ``synthetic``.

Every pipeline yields ``(images, labels)`` batches: images ``float32 [B, S, S, 3]`` in
``[0, 1]`` (the model does its own normalisation) and labels ``int32 [B]``.

* ``digits``: the 1,797 8x8 digits bundled with scikit-learn, split once and for all
  (independent of ``seed``) into a stratified 80 % train / 20 % validation set, resized
  (bilinear) to the image size.
* ``imagenet``: slim-format shards ``train-*-of-*`` / ``validation-*-of-*`` in a directory
  (``tools/build_tfrecords.py`` writes them from class folders) with EfficientNet
  preprocessing: a central crop keeping ``eval_crop`` of the shorter side, resized
  (bicubic) to the image size.
* ``synthetic``: uniform noise images with uniform labels; the content of each split is
  fixed, ``seed`` only changes the shuffling order (and augmentation) when ``training``.

Training augmentation (``augment``, see :data:`AUGMENTATIONS`; the default per dataset is
:func:`default_augment`):

* ``inception``: a random crop covering 8-100 % of the area with aspect 3/4..4/3 and a
  random horizontal flip, resized to the image size (the EfficientNet ImageNet recipe).
  TFRecord images are cropped at their own size (bicubic resize); digits and synthetic
  images at the image size (bilinear resize back to it).
* ``shift``: the evaluation image translated by up to ``max(1, img_size // 10)`` pixels in
  each direction (zero padding, then a random crop back to the image size).
* ``none``: the evaluation image (still shuffled).

The pipelines live in ``digits``, ``tfrecords`` and ``synthetic``; ``augment`` holds
the augmentations and ``common`` the names and checks.

Bad input raises :class:`~adj_quant.errors.UserError`. TensorFlow errors that only show up
while iterating (a corrupt record, an undecodable image, a label out of range) are turned
into :class:`UserError` by :func:`iterate`; use it instead of a bare ``for`` loop.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError
from adj_quant.recipe.data.common import (
    _BUILD_HINT,
    AUGMENTATIONS,
    DATASET_NAMES,
    DEFAULT_EVAL_CROP,
    SPLITS,
    SYNTHETIC_NUM_CLASSES,
    SYNTHETIC_SIZE,
    DatasetInfo,
    _check_augment,
    _check_eval_crop,
    _check_name,
    _check_positive,
    _check_split,
    _resolve_num_classes,
    default_augment,
)
from adj_quant.recipe.data.digits import (
    _digits_cacheable,
    _digits_dataset,
    _digits_resized,
    _digits_split,
    _resize_gray,
)
from adj_quant.recipe.data.synthetic import _synthetic_dataset, _synthetic_example
from adj_quant.recipe.data.tfrecords import (
    _check_dataset_dir,
    _count_records,
    _imagenet_dataset,
    _parse_checked,
    _preprocess_eval,
    _read_records,
    _remember_shards,
    _validate_shards,
    files_of_shard,
    iterate,
    shard_files,
)

__all__ = [
    "DATASET_NAMES",
    "AUGMENTATIONS",
    "DatasetInfo",
    "dataset_info",
    "default_augment",
    "files_of_shard",
    "iterate",
    "make_dataset",
    "representative_images",
    "shard_files",
]


def dataset_info(name: str, dataset_dir: str | None = None, num_classes: int | None = None,
                 labels_offset: int = 0, *, synthetic_size: int = SYNTHETIC_SIZE) -> DatasetInfo:
    """Number of classes and examples per split.

    For ``imagenet`` the records are counted once per process (the standard 1024/128-shard
    ImageNet layout uses the known counts). A split without shards counts as 0 examples;
    :func:`make_dataset` on it raises :class:`UserError`. ``synthetic`` reports
    ``synthetic_size`` for both splits."""
    _check_name(name)
    classes = _resolve_num_classes(name, num_classes, labels_offset)
    if name == "digits":
        split = _digits_split()
        return DatasetInfo(name, classes, len(split["train"][1]), len(split["validation"][1]))
    if name == "synthetic":
        _check_positive("synthetic_size", synthetic_size)
        return DatasetInfo(name, classes, int(synthetic_size), int(synthetic_size))
    counts = {}
    missing = []
    for split in SPLITS:
        try:
            files = shard_files(dataset_dir, split)
        except UserError:
            _check_dataset_dir(dataset_dir)  # a missing directory is reported as such
            missing.append(f"{split}-*-of-*")
            counts[split] = 0
            continue
        counts[split] = _count_records(files, split)
    if len(missing) == len(SPLITS):
        raise UserError(f"no TFRecord shards matching {' or '.join(missing)} in {dataset_dir}; "
                        f"{_BUILD_HINT}")
    return DatasetInfo(name, classes, counts["train"], counts["validation"])


def make_dataset(name: str, split: str, *, batch_size: int, img_size: int, training: bool,
                 seed: int = 0, dataset_dir: str | None = None, labels_offset: int = 0,
                 num_classes: int | None = None,
                 repeat: bool = False, drop_remainder: bool = False,
                 synthetic_size: int = SYNTHETIC_SIZE, augment: str | None = None,
                 eval_crop: float = DEFAULT_EVAL_CROP,
                 shard: tuple[int, int] | None = None) -> tf.data.Dataset:
    """Batches of ``(images float32 [B, S, S, 3] in [0, 1], labels int32 [B])``.

    ``training`` turns on seeded shuffling and the ``augment`` augmentation: ``inception``,
    ``shift`` or ``none`` (see the module docstring); ``None`` picks the dataset's own,
    :func:`default_augment` (digits: shift, imagenet: inception, synthetic: none). All three
    apply to every dataset; ``augment`` is ignored when not ``training``.

    ``eval_crop`` is the fraction of the shorter side of a TFRecord image kept by the
    central square crop before resizing (evaluation, ``shift`` and ``none``; 1.0 keeps the
    whole shorter side, i.e. no crop for square images). The default 0.875 is EfficientNet's
    224 / (224 + 32); images much smaller than ImageNet's (e.g. 32x32 digits) want 1.0. It
    has no effect on ``digits`` and ``synthetic``, whose images are never cropped.

    ``shard = (count, index)`` reads only the shards ``index, index + count, ...`` of the
    sorted TFRecord files (one input pipeline per worker process: file sharding); only
    ``imagenet`` (TFRecords) can be sharded, and it needs at least ``count`` files.

    Iterate with :func:`iterate` to get :class:`UserError` for data problems that show up
    while reading."""
    _check_name(name)
    _check_split(split)
    if shard is not None and name != "imagenet":
        raise ValueError(f"only TFRecord data can be sharded by file, not {name!r}")
    _check_positive("batch_size", batch_size)
    _check_positive("img_size", img_size)
    _check_augment(augment)
    _check_eval_crop(eval_crop)
    classes = _resolve_num_classes(name, num_classes, labels_offset)
    augment = augment or default_augment(name)
    common = dict(batch_size=int(batch_size), img_size=int(img_size), training=bool(training),
                  seed=int(seed), repeat=repeat, drop_remainder=drop_remainder, augment=augment)
    if name == "digits":
        return _digits_dataset(split, **common)
    if name == "synthetic":
        _check_positive("synthetic_size", synthetic_size)
        return _synthetic_dataset(split, num_classes=classes, synthetic_size=int(synthetic_size),
                                  **common)
    return _imagenet_dataset(split, dataset_dir=dataset_dir, labels_offset=int(labels_offset),
                             num_classes=classes, eval_crop=float(eval_crop), shard=shard,
                             **common)


def representative_images(name: str, *, img_size: int, count: int = 100, seed: int = 0,
                          dataset_dir: str | None = None, labels_offset: int = 0,
                          synthetic_size: int = SYNTHETIC_SIZE,
                          eval_crop: float = DEFAULT_EVAL_CROP) -> np.ndarray:
    """``count`` training images with evaluation preprocessing: float32 [count, S, S, 3] in [0, 1].

    A seeded random sample of the train split (for calibration / TFLite conversion). If the
    split holds fewer than ``count`` images, they are repeated to fill ``count``.
    ``eval_crop`` is the centre crop of TFRecord images as in :func:`make_dataset` (no
    effect on ``digits`` and ``synthetic``)."""
    _check_name(name)
    _check_positive("img_size", img_size)
    _check_positive("count", count)
    _check_eval_crop(eval_crop)
    if name == "digits":
        _resolve_num_classes(name, None, labels_offset)
        n = len(_digits_split()["train"][1])
        idx = _sample_indices(n, count, seed)
        if _digits_cacheable("train", img_size):
            gray = _digits_resized("train", img_size)[idx]
        else:
            gray = _resize_gray(tf.constant(_digits_split()["train"][0][idx]), img_size).numpy()
        return np.repeat(gray, 3, axis=-1).astype(np.float32)
    if name == "synthetic":
        _check_positive("synthetic_size", synthetic_size)
        make = _synthetic_example("train", img_size, SYNTHETIC_NUM_CLASSES)
        idx = _sample_indices(synthetic_size, count, seed)
        return np.stack([make(i)[0].numpy() for i in idx]).astype(np.float32)

    files = shard_files(dataset_dir, "train")
    _validate_shards(files, labels_offset, None)
    ds = _read_records(files, training=True, seed=seed, repeat=True)
    crop = float(eval_crop)
    ds = ds.map(lambda r, f: _preprocess_eval(_parse_checked(r, f, labels_offset, None)[0],
                                              img_size, crop),
                num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.take(count).batch(count)
    _remember_shards(ds, files)
    batches = [b.numpy() for b in iterate(ds, f"train shards in {dataset_dir}")]
    if not batches:
        raise UserError(f"the train shards in {dataset_dir} hold no records; {_BUILD_HINT}")
    return batches[0].astype(np.float32)


def _sample_indices(n: int, count: int, seed: int) -> np.ndarray:
    order = np.random.default_rng(seed).permutation(n)
    return np.resize(order, count)  # repeats the permutation when count > n


# --------------------------------------------------------------------------- from options


def data_args(o) -> tuple:
    """``(name, dataset_dir, num_classes, labels_offset)`` from ``--dataset``."""
    if o.dataset in DATASET_NAMES:
        return o.dataset, None, o.num_classes, o.labels_offset
    return "imagenet", o.dataset, o.num_classes, o.labels_offset


#: A validation batch holds about as many pixels as 64 images at 224x224, and at most
#: :data:`MAX_EVAL_BATCH` images: 64 ImageNet images, or all 360 digits at 32x32 in one
#: batch. A network as deep as EfficientNet-B0 at 32 pixels spends most of a small batch
#: in per-op overhead; one batch of 360 instead of six of 64 halves a validation pass.
EVAL_PIXELS = 64 * 224 * 224
MAX_EVAL_BATCH = 1024


def eval_batch_size(batch_size: int, img_size: int, max_images: int | None = None) -> int:
    """The batch of a validation pass: :data:`EVAL_PIXELS` worth of images (no more than
    ``max_images``, the images the pass reads), and never fewer than ``batch_size`` or 64."""
    fits = min(MAX_EVAL_BATCH, EVAL_PIXELS // (img_size * img_size), max_images or MAX_EVAL_BATCH)
    return max(batch_size, 64, fits)


def validation_data(o, classes: int) -> tf.data.Dataset:
    name, dataset_dir = data_args(o)[:2]
    batch = eval_batch_size(o.batch_size, o.img_size, o.max_val_images)
    return make_dataset(name, "validation", batch_size=batch,
                        img_size=o.img_size, training=False, dataset_dir=dataset_dir,
                        labels_offset=o.labels_offset, num_classes=classes,
                        eval_crop=o.eval_crop)


def num_classes(o) -> int:
    return dataset_info(*data_args(o)).num_classes

