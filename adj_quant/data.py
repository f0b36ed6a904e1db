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

Bad input raises :class:`~adj_quant.errors.UserError`. TensorFlow errors that only show up
while iterating (a corrupt record, an undecodable image, a label out of range) are turned
into :class:`UserError` by :func:`iterate`; use it instead of a bare ``for`` loop.
"""

from __future__ import annotations

import collections
import functools
import logging
import os
import re
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError

__all__ = [
    "DATASET_NAMES",
    "AUGMENTATIONS",
    "DatasetInfo",
    "dataset_info",
    "default_augment",
    "iterate",
    "make_dataset",
    "representative_images",
    "shard_files",
]

log = logging.getLogger(__name__)

DATASET_NAMES = ("digits", "imagenet", "synthetic")
SPLITS = ("train", "validation")
#: Training augmentations (``make_dataset(augment=...)``), see the module docstring.
AUGMENTATIONS = ("inception", "shift", "none")
_DEFAULT_AUGMENT = {"digits": "shift", "imagenet": "inception", "synthetic": "none"}
#: Fraction of the shorter side kept by the evaluation centre crop of TFRecord images;
#: 0.875 = 224 / (224 + 32), EfficientNet's crop at its native resolution.
DEFAULT_EVAL_CROP = 0.875

DIGITS_NUM_CLASSES = 10
DIGITS_VALIDATION_FRACTION = 0.2
IMAGENET_NUM_CLASSES = 1000
SYNTHETIC_NUM_CLASSES = 1000
SYNTHETIC_SIZE = 256

# EfficientNet preprocessing constants.
_AREA_RANGE = (0.08, 1.0)
_ASPECT_RANGE = (3.0 / 4.0, 4.0 / 3.0)
_MIN_OBJECT_COVERED = 0.1
_MAX_ATTEMPTS = 10

# Example shuffle buffer for TFRecord training (encoded ImageNet JPEGs are ~110 kB each).
SHUFFLE_BUFFER = 4096
_READ_BUFFER_BYTES = 8 << 20
_MAX_PARALLEL_SHARDS = 16
# Resized digits are kept in memory when they fit in this many bytes (one channel).
_DIGITS_CACHE_BYTES = 128 << 20
# After a corrupt-record error, re-read at most this much data to name the bad shard.
_SCAN_LIMIT_BYTES = 2 << 30

# Record counts of the standard slim ImageNet layout (1024 train / 128 validation shards),
# so that sizing an epoch does not need a pass over 140 GB.
_KNOWN_COUNTS = {("train", 1024): 1_281_167, ("validation", 128): 50_000}

_LABEL_KEY = "image/class/label"
_IMAGE_KEY = "image/encoded"
_FEATURES = {
    _IMAGE_KEY: tf.io.FixedLenFeature([], tf.string),
    _LABEL_KEY: tf.io.FixedLenFeature([], tf.int64),
}
_SHARD_HINT = "pass --dataset DIR containing train-*-of-* shards"
_BUILD_HINT = "create them with: python tools/build_tfrecords.py --input_dir CLASS_FOLDERS --output_dir DIR"

# Markers that tie in-graph assertions to the messages made by :func:`iterate`.
_LABEL_MARK = "ADJQ_BAD_LABEL"
_IMAGE_MARK = "ADJQ_BAD_IMAGE"


@dataclass(frozen=True)
class DatasetInfo:
    name: str  # "digits" | "imagenet" | "synthetic"
    num_classes: int
    num_train: int  # training examples (synthetic: the configured size)
    num_val: int


# --------------------------------------------------------------------------- checks


def _check_name(name: str) -> None:
    if name not in DATASET_NAMES:
        raise UserError(f"unknown dataset name {name!r}; use one of: {', '.join(DATASET_NAMES)}")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r}; use one of: {', '.join(SPLITS)}")


def _check_positive(what: str, value: int) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise UserError(f"{what} must be a positive integer, got {value!r}")


def _check_augment(augment: str | None) -> None:
    if augment is not None and augment not in AUGMENTATIONS:
        raise UserError(f"unknown augment {augment!r}; use one of: {', '.join(AUGMENTATIONS)}")


def _check_eval_crop(eval_crop: float) -> None:
    ok = isinstance(eval_crop, (int, float, np.integer, np.floating)) and not isinstance(eval_crop, bool)
    if not ok or not 0.0 < eval_crop <= 1.0:
        raise UserError(f"eval_crop {eval_crop!r} must be a fraction in (0, 1]; 1.0 keeps the whole image")


def default_augment(name: str) -> str:
    """Training augmentation of dataset ``name`` when none is asked for: ``shift`` for
    ``digits`` (an Inception crop of an 8x8 digit destroys it), ``inception`` for the
    ``imagenet`` TFRecords and ``none`` for ``synthetic``."""
    _check_name(name)
    return _DEFAULT_AUGMENT[name]


def _resolve_num_classes(name: str, num_classes: int | None, labels_offset: int) -> int:
    if num_classes is not None:
        _check_positive("--num_classes", num_classes)
    if name == "imagenet":
        return int(num_classes) if num_classes is not None else IMAGENET_NUM_CLASSES
    if labels_offset:
        raise UserError(
            f"--labels_offset {labels_offset} only applies to the imagenet TFRecords; "
            f"dataset {name!r} has labels starting at 0, drop --labels_offset"
        )
    if name == "digits":
        if num_classes is not None and num_classes < DIGITS_NUM_CLASSES:
            raise UserError(
                f"--num_classes {num_classes} is too small for dataset 'digits' "
                f"(labels 0..9); use --num_classes {DIGITS_NUM_CLASSES}"
            )
        return int(num_classes) if num_classes is not None else DIGITS_NUM_CLASSES
    return int(num_classes) if num_classes is not None else SYNTHETIC_NUM_CLASSES


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """8x8 digits in [0, 1] and labels for each split (fixed stratified 80/20 split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VALIDATION_FRACTION, stratify=labels, random_state=0
    )
    out = {}
    for split, idx in (("train", np.sort(train_idx)), ("validation", np.sort(val_idx))):
        x, y = images[idx], labels[idx]
        x.flags.writeable = False
        y.flags.writeable = False
        out[split] = (x, y)
    return out


def _resize_gray(images: tf.Tensor, img_size: int) -> tf.Tensor:
    """[..., 8, 8] digits -> [..., S, S, 1] float32 (bilinear), clipped to [0, 1]."""
    resized = tf.image.resize(images[..., tf.newaxis], [img_size, img_size], method="bilinear")
    return tf.clip_by_value(resized, 0.0, 1.0)


@functools.lru_cache(maxsize=4)
def _digits_resized(split: str, img_size: int) -> np.ndarray:
    x, _ = _digits_split()[split]
    out = _resize_gray(tf.constant(x), img_size).numpy()
    out.flags.writeable = False
    return out


def _digits_cacheable(split: str, img_size: int) -> bool:
    n = len(_digits_split()[split][1])
    return n * img_size * img_size * 4 <= _DIGITS_CACHE_BYTES


def _shift_pixels(img_size: int) -> int:
    """Largest random translation (pixels) of ``augment="shift"``: ~1/10 of the image."""
    return max(1, img_size // 10)


def _shift(image, img_size, seed):
    """``[S, S, C]`` image translated by up to :func:`_shift_pixels` in x and y (zero fill)."""
    pad = _shift_pixels(img_size)
    channels = image.shape[-1]
    image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
    return tf.image.stateless_random_crop(image, [img_size, img_size, channels], seed=seed)


def _sample_crop(height, width, seed):
    """Inception-style random window ``(y, x, h, w)``: 8-100 % of the area, aspect 3/4..4/3.

    When no window is found within ``_MAX_ATTEMPTS`` the whole image is returned."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.stack([height, width, 3]),
        bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
        seed=seed,
        min_object_covered=_MIN_OBJECT_COVERED,
        aspect_ratio_range=_ASPECT_RANGE,
        area_range=_AREA_RANGE,
        max_attempts=_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    return begin[0], begin[1], size[0], size[1]


def _inception_float(image, img_size, seed):
    """Inception crop + horizontal flip of a float ``[h, w, C]`` image, resized (bilinear)
    to ``[S, S, C]`` in [0, 1]: the ``inception`` augmentation of digits and synthetic."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    shape = tf.shape(image)
    y, x, h, w = _sample_crop(shape[0], shape[1], crop_seed)
    image = tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, shape[2]]))
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    image = tf.image.resize(image, [img_size, img_size], method="bilinear")
    return tf.clip_by_value(image, 0.0, 1.0)


def _augment_float(image, augment, img_size, seed):
    """Apply ``augment`` ("inception" or "shift") to an evaluation image ``[S, S, C]``."""
    if augment == "shift":
        return _shift(image, img_size, seed)
    return _inception_float(image, img_size, seed)


def _digits_dataset(split, *, batch_size, img_size, training, seed, repeat, drop_remainder, augment):
    x8, labels = _digits_split()[split]
    cached = _digits_cacheable(split, img_size)
    images = _digits_resized(split, img_size) if cached else x8
    ds = tf.data.Dataset.from_tensor_slices((images, labels))
    if training:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()

    def to_image(image):
        return image if cached else _resize_gray(image, img_size)

    def augmented(example, op_seed):
        image, label = example
        image = _augment_float(to_image(image), augment, img_size, op_seed)  # background is 0
        return tf.image.grayscale_to_rgb(image), label

    def plain(image, label):
        return tf.image.grayscale_to_rgb(to_image(image)), label

    if training and augment != "none":
        ds = tf.data.Dataset.zip(ds, _seed_stream(seed)).map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(plain, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def _seed_stream(seed: int) -> tf.data.Dataset:
    """Per-element seeds ``int64 [2]`` for stateless random ops; new ones every epoch."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2, drop_remainder=True)


# --------------------------------------------------------------------------- synthetic

_SYNTHETIC_SPLIT_SEED = {"train": 11, "validation": 22}


def _synthetic_example(split: str, img_size: int, num_classes: int):
    base = _SYNTHETIC_SPLIT_SEED[split]

    def make(index):
        index = tf.cast(index, tf.int64)
        image = tf.random.stateless_uniform([img_size, img_size, 3], seed=tf.stack([base, index]))
        label = tf.random.stateless_uniform(
            [], seed=tf.stack([base + 1000, index]), maxval=num_classes, dtype=tf.int32
        )
        return image, label

    return make


def _synthetic_dataset(split, *, batch_size, img_size, training, seed, repeat, drop_remainder,
                       num_classes, synthetic_size, augment):
    ds = tf.data.Dataset.range(synthetic_size)
    if training:
        ds = ds.shuffle(synthetic_size, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    make = _synthetic_example(split, img_size, num_classes)
    if training and augment != "none":
        def augmented(index, op_seed):
            image, label = make(index)
            return _augment_float(image, augment, img_size, op_seed), label

        ds = tf.data.Dataset.zip(ds, _seed_stream(seed)).map(augmented, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


# --------------------------------------------------------------------------- TFRecord shards


def shard_files(dataset_dir: str | None, split: str) -> list[str]:
    """Sorted ``{split}-*-of-*`` shard paths in ``dataset_dir``; :class:`UserError` if none."""
    _check_split(split)
    _check_dataset_dir(dataset_dir)
    pattern = f"{split}-*-of-*"
    files = sorted(tf.io.gfile.glob(os.path.join(dataset_dir, pattern)))
    files = [f for f in files if not os.path.basename(f).startswith(".")]
    if not files:
        raise UserError(f"no TFRecord shards matching {pattern} in {dataset_dir}; {_BUILD_HINT}")
    _warn_missing_shards(files, split)
    return files


def _check_dataset_dir(dataset_dir: str | None) -> None:
    if not dataset_dir:
        raise UserError(f"dataset 'imagenet' needs a directory of TFRecord shards; {_SHARD_HINT}")
    if not tf.io.gfile.exists(dataset_dir):
        raise UserError(f"dataset directory {dataset_dir} does not exist; {_SHARD_HINT}")
    if not tf.io.gfile.isdir(dataset_dir):
        raise UserError(f"dataset path {dataset_dir} is not a directory; {_SHARD_HINT}")


_SHARD_RE = re.compile(r"-(\d+)-of-(\d+)$")


def _expected_total(files: list[str]) -> int | None:
    totals = set()
    for f in files:
        match = _SHARD_RE.search(os.path.basename(f))
        if not match:
            return None
        totals.add(int(match.group(2)))
    return totals.pop() if len(totals) == 1 else None


def _warn_missing_shards(files: list[str], split: str) -> None:
    total = _expected_total(files)
    if total is not None and total != len(files):
        log.warning("using %d of %d %s shards in %s", len(files), total, split, os.path.dirname(files[0]))


def _stat_key(files: list[str]) -> tuple:
    key = []
    for f in files:
        st = tf.io.gfile.stat(f)
        key.append((f, st.length, st.mtime_nsec))
    return tuple(key)


_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",  # PNG
    b"GIF8",  # GIF
    b"BM",  # BMP
    b"RIFF",  # WebP
    b"\xff\x0a",  # JPEG XL codestream
    b"\x00\x00\x00\x0cJXL ",  # JPEG XL container
)


def _looks_like_image_py(data: bytes) -> bool:
    return any(data.startswith(m) for m in _IMAGE_MAGIC)


def _looks_like_image(encoded: tf.Tensor) -> tf.Tensor:
    ok = tf.constant(False)
    for magic in _IMAGE_MAGIC:
        ok = ok | tf.equal(tf.strings.substr(encoded, 0, len(magic)), magic)
    return ok


def _short_tf_message(err: Exception) -> str:
    """The useful part of a TF runtime error message, on one line."""
    msg = getattr(err, "message", None) or str(err)
    msg = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", msg)
    msg = re.sub(r"Error in user-defined function passed to \S+ transformation with iterator: \S+:\s*", "", msg)
    msg = msg.split("\n")[0]
    msg = re.sub(r"\s*\[Op:[^\]]*\].*$", "", msg)
    return msg.strip()


def _first_records(files: list[str]) -> list[tuple[str, bytes]]:
    """The first record of every non-empty shard, read in parallel."""
    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        lambda f: tf.data.TFRecordDataset(f).take(1).map(lambda r: (f, r)),
        cycle_length=min(len(files), _MAX_PARALLEL_SHARDS),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=False,
    )
    try:
        return [(f.decode(), r) for f, r in ds.as_numpy_iterator()]
    except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as err:
        # Find which shard it was; slow path, only taken on error.
        for f in files:
            try:
                next(iter(tf.data.TFRecordDataset(f).take(1)), None)
            except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as shard_err:
                raise _corrupt_shard_error(f, shard_err) from shard_err
        raise UserError(f"corrupt TFRecord data in {os.path.dirname(files[0])}: {_short_tf_message(err)}") from err


def _corrupt_shard_error(path: str, err: Exception) -> UserError:
    return UserError(
        f"corrupt TFRecord shard {path} ({_short_tf_message(err)}); delete it and re-create the "
        "shards with tools/build_tfrecords.py"
    )


def _label_error(label: int, labels_offset: int, num_classes: int, where: str) -> UserError:
    return UserError(
        f"label {label} in {where} is outside [0, {num_classes}) after --labels_offset {labels_offset}; "
        f"set --labels_offset (1 for slim 1001-class shards) or --num_classes to match the data"
    )


_VALIDATED: set = set()


def _validate_shards(files: list[str], labels_offset: int, num_classes: int | None) -> None:
    """Cheap up-front check: each shard's first record parses and has an image and a label."""
    key = (_stat_key(files), labels_offset, num_classes)
    if key in _VALIDATED:
        return
    records = _first_records(files)
    if not records:
        raise UserError(f"all {len(files)} shards like {files[0]} are empty; {_BUILD_HINT}")
    for path, record in records:
        try:
            example = tf.train.Example.FromString(record)
        except Exception as err:  # protobuf DecodeError
            raise UserError(f"corrupt TFRecord shard {path}: a record is not a tf.train.Example ({err})") from err
        feature = example.features.feature
        image = feature[_IMAGE_KEY].bytes_list.value if _IMAGE_KEY in feature else []
        label = feature[_LABEL_KEY].int64_list.value if _LABEL_KEY in feature else []
        if len(image) != 1 or len(label) != 1:
            missing = [k for k, v in ((_IMAGE_KEY, image), (_LABEL_KEY, label)) if len(v) != 1]
            raise UserError(
                f"shard {path} is not in slim format: missing {', '.join(missing)}; re-create it with "
                "tools/build_tfrecords.py"
            )
        if not _looks_like_image_py(image[0]):
            raise UserError(f"shard {path} holds an image that is neither JPEG nor PNG; re-create it with "
                            "tools/build_tfrecords.py")
        if num_classes is not None and not 0 <= label[0] - labels_offset < num_classes:
            raise _label_error(label[0], labels_offset, num_classes, f"shard {path}")
    path, record = records[0]  # decode one image fully, to catch a wrong encoding early
    encoded = tf.io.parse_single_example(record, _FEATURES)[_IMAGE_KEY]
    try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        raise UserError(f"cannot decode the first image in shard {path}: {_short_tf_message(err)}") from err
    _VALIDATED.add(key)


_COUNTS: dict = {}


def _count_records(files: list[str], split: str) -> int:
    total = _expected_total(files)
    if total is not None and total == len(files) and (split, total) in _KNOWN_COUNTS:
        return _KNOWN_COUNTS[(split, total)]
    key = _stat_key(files)
    if key not in _COUNTS:
        ds = tf.data.Dataset.from_tensor_slices(files).interleave(
            lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES),
            cycle_length=min(len(files), _MAX_PARALLEL_SHARDS),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=False,
        )
        try:
            count = ds.batch(4096).reduce(np.int64(0), lambda n, batch: n + tf.shape(batch, out_type=tf.int64)[0])
        except tf.errors.DataLossError as err:
            raise _locate_corruption(files, err, f"{split} shards") from err
        _COUNTS[key] = int(count)
    return _COUNTS[key]


def _find_corrupt_shard(files: list[str]) -> tuple[str, Exception] | None:
    """Re-read ``files`` (if not too large) and return the first one that fails to read."""
    try:
        if sum(tf.io.gfile.stat(f).length for f in files) > _SCAN_LIMIT_BYTES:
            return None
    except tf.errors.OpError:
        return None
    for f in files:
        try:
            for _ in tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES).batch(4096):
                pass
        except (tf.errors.DataLossError, tf.errors.OutOfRangeError) as err:
            return f, err
    return None


def _locate_corruption(files: list[str], err: Exception, what: str) -> UserError:
    found = _find_corrupt_shard(files)
    if found is not None:
        return _corrupt_shard_error(*found)
    where = os.path.dirname(files[0]) if files else "?"
    return UserError(
        f"corrupt TFRecord data while reading {what} from {where} ({_short_tf_message(err)}); re-create the "
        "shards with tools/build_tfrecords.py"
    )


def _crop_window_eval(height, width, eval_crop):
    """Centre square crop: side = floor(eval_crop * min(h, w)), at least 1 pixel.

    EfficientNet uses 224 / (224 + 32) = 0.875 at its native resolution."""
    shorter = tf.cast(tf.minimum(height, width), tf.float64)
    side = tf.cast(tf.floor(eval_crop * shorter + 1e-6), tf.int32)  # 0.7 * 40 is 28, not 27
    side = tf.maximum(side, 1)
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


def _crop_window_train(height, width, eval_crop, seed):
    """Random crop covering 8-100 % of the area with aspect 3/4..4/3 (Inception style)."""
    train_window = _sample_crop(height, width, seed)
    # When no crop was found the op returns the whole image: use the centre crop instead.
    failed = tf.logical_and(tf.equal(train_window[2], height), tf.equal(train_window[3], width))
    eval_window = _crop_window_eval(height, width, eval_crop)
    return tuple(tf.where(failed, e, t) for e, t in zip(eval_window, train_window))


def _decode_cropped(encoded, window_fn):
    """Decode to uint8 [h, w, 3], cropping to ``window_fn(height, width)``.

    JPEGs are decoded only inside the crop window (``decode_and_crop_jpeg``)."""

    def jpeg():
        shape = tf.image.extract_jpeg_shape(encoded)
        window = tf.stack(window_fn(shape[0], shape[1]))
        return tf.image.decode_and_crop_jpeg(encoded, window, channels=3)

    def other():
        image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        shape = tf.shape(image)
        y, x, h, w = window_fn(shape[0], shape[1])
        return tf.slice(image, tf.stack([y, x, 0]), tf.stack([h, w, 3]))

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    image.set_shape([None, None, 3])
    return image


def _to_unit_float(image, img_size):
    image = tf.image.resize(image, [img_size, img_size], method="bicubic")
    return tf.clip_by_value(image / 255.0, 0.0, 1.0)


def _preprocess_train(encoded, img_size, eval_crop, seed):
    """The ``inception`` augmentation of TFRecord images (EfficientNet training)."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = _decode_cropped(encoded, lambda h, w: _crop_window_train(h, w, eval_crop, crop_seed))
    image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return _to_unit_float(image, img_size)


def _preprocess_eval(encoded, img_size, eval_crop):
    image = _decode_cropped(encoded, lambda h, w: _crop_window_eval(h, w, eval_crop))
    return _to_unit_float(image, img_size)


def _preprocess(encoded, img_size, eval_crop, augment, seed):
    """Training preprocessing of one TFRecord image for ``augment`` != "none"."""
    if augment == "inception":
        return _preprocess_train(encoded, img_size, eval_crop, seed)
    return _shift(_preprocess_eval(encoded, img_size, eval_crop), img_size, seed)


def _parse_checked(record, filename, labels_offset, num_classes):
    """Parse a slim Example; assert (in graph) that the image looks like one and the label fits."""
    parsed = tf.io.parse_single_example(record, _FEATURES)
    encoded, raw_label = parsed[_IMAGE_KEY], parsed[_LABEL_KEY]
    label = tf.cast(raw_label - labels_offset, tf.int32)
    checks = [tf.debugging.Assert(_looks_like_image(encoded), [_IMAGE_MARK, filename])]
    if num_classes is not None:
        in_range = tf.logical_and(raw_label - labels_offset >= 0, raw_label - labels_offset < num_classes)
        checks.append(
            tf.debugging.Assert(in_range, [_LABEL_MARK, raw_label, labels_offset, num_classes, filename])
        )
    with tf.control_dependencies(checks):
        return tf.identity(encoded), tf.identity(label)


def _read_records(files, *, training, seed, repeat):
    """(record, filename) pairs read from ``files`` in parallel."""
    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.interleave(
        lambda f: tf.data.TFRecordDataset(f, buffer_size=_READ_BUFFER_BYTES).map(lambda r: (r, f)),
        cycle_length=min(len(files), _MAX_PARALLEL_SHARDS),
        block_length=1,
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    if training:
        ds = ds.shuffle(SHUFFLE_BUFFER, seed=seed + 1, reshuffle_each_iteration=True)
    return ds


# Shards behind each dataset made here, so that :func:`iterate` can name a corrupt one.
_DATASET_SHARDS: "weakref.WeakKeyDictionary[tf.data.Dataset, list[str]]" = weakref.WeakKeyDictionary()
_RECENT_SHARDS: "collections.OrderedDict[str, None]" = collections.OrderedDict()


def _remember_shards(ds: tf.data.Dataset, files: list[str]) -> None:
    try:
        _DATASET_SHARDS[ds] = list(files)
    except TypeError:
        pass
    for f in files:
        _RECENT_SHARDS[f] = None
        _RECENT_SHARDS.move_to_end(f)
    while len(_RECENT_SHARDS) > 4096:
        _RECENT_SHARDS.popitem(last=False)


def _imagenet_dataset(split, *, batch_size, img_size, training, seed, dataset_dir, labels_offset,
                      num_classes, repeat, drop_remainder, augment, eval_crop):
    files = shard_files(dataset_dir, split)
    _validate_shards(files, labels_offset, num_classes)
    ds = _read_records(files, training=training, seed=seed, repeat=repeat)

    if training and augment != "none":
        def load(example, op_seed):
            encoded, label = _parse_checked(example[0], example[1], labels_offset, num_classes)
            return _preprocess(encoded, img_size, eval_crop, augment, op_seed), label

        ds = tf.data.Dataset.zip(ds, _seed_stream(seed + 2))
    else:
        def load(record, filename):
            encoded, label = _parse_checked(record, filename, labels_offset, num_classes)
            return _preprocess_eval(encoded, img_size, eval_crop), label

    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)
    _remember_shards(ds, files)
    return ds


# --------------------------------------------------------------------------- public API


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
        raise UserError(f"no TFRecord shards matching {' or '.join(missing)} in {dataset_dir}; {_BUILD_HINT}")
    return DatasetInfo(name, classes, counts["train"], counts["validation"])


def make_dataset(name: str, split: str, *, batch_size: int, img_size: int, training: bool, seed: int = 0,
                 dataset_dir: str | None = None, labels_offset: int = 0, num_classes: int | None = None,
                 repeat: bool = False, drop_remainder: bool = False,
                 synthetic_size: int = SYNTHETIC_SIZE, augment: str | None = None,
                 eval_crop: float = DEFAULT_EVAL_CROP) -> tf.data.Dataset:
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

    Iterate with :func:`iterate` to get :class:`UserError` for data problems that show up
    while reading."""
    _check_name(name)
    _check_split(split)
    _check_positive("batch_size", batch_size)
    _check_positive("img_size", img_size)
    _check_augment(augment)
    _check_eval_crop(eval_crop)
    classes = _resolve_num_classes(name, num_classes, labels_offset)
    augment = augment or default_augment(name)
    common = dict(batch_size=int(batch_size), img_size=int(img_size), training=bool(training), seed=int(seed),
                  repeat=repeat, drop_remainder=drop_remainder, augment=augment)
    if name == "digits":
        return _digits_dataset(split, **common)
    if name == "synthetic":
        _check_positive("synthetic_size", synthetic_size)
        return _synthetic_dataset(split, num_classes=classes, synthetic_size=int(synthetic_size), **common)
    return _imagenet_dataset(split, dataset_dir=dataset_dir, labels_offset=int(labels_offset),
                             num_classes=classes, eval_crop=float(eval_crop), **common)


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
    ds = ds.map(lambda r, f: _preprocess_eval(_parse_checked(r, f, labels_offset, None)[0], img_size, crop),
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


def iterate(dataset: tf.data.Dataset, what: str) -> Iterator:
    """Iterate ``dataset``, turning data errors into one-line :class:`UserError`.

    ``what`` names the data in messages (e.g. ``"validation data"``). Catches corrupt
    records (``DataLossError``), undecodable images and out-of-range labels
    (``InvalidArgumentError``) and missing files (``NotFoundError``)."""
    try:
        it = iter(dataset)
    except _DATA_ERRORS as err:
        raise _data_error(err, dataset, what) from err
    while True:
        try:
            element = next(it)
        except StopIteration:
            return
        except _DATA_ERRORS as err:
            raise _data_error(err, dataset, what) from err
        yield element


_DATA_ERRORS = (tf.errors.DataLossError, tf.errors.OutOfRangeError, tf.errors.InvalidArgumentError,
                tf.errors.NotFoundError)


def _data_error(err: Exception, dataset: tf.data.Dataset, what: str) -> UserError:
    text = getattr(err, "message", None) or str(err)
    match = re.search(rf"\[{_LABEL_MARK}\] \[(-?\d+)\] \[(-?\d+)\] \[(\d+)\] \[(.*)\]", text)
    if match:
        label, offset, classes = (int(match.group(i)) for i in (1, 2, 3))
        return _label_error(label, offset, classes, f"{what} (shard {match.group(4)})")
    match = re.search(rf"\[{_IMAGE_MARK}\] \[(.*)\]", text)
    if match:
        return UserError(f"{what}: shard {match.group(1)} holds a record whose image is neither JPEG nor PNG; "
                         "re-create it with tools/build_tfrecords.py")
    short = _short_tf_message(err)
    if isinstance(err, (tf.errors.DataLossError, tf.errors.OutOfRangeError)):
        try:
            files = _DATASET_SHARDS.get(dataset)
        except TypeError:
            files = None
        return _locate_corruption(files or list(_RECENT_SHARDS), err, what)
    if isinstance(err, tf.errors.NotFoundError):
        return UserError(f"{what}: a file disappeared while reading ({short}); check the --dataset directory")
    return UserError(f"{what}: cannot read a record ({short}); re-create the shards with tools/build_tfrecords.py")
