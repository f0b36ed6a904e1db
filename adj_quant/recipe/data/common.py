"""Names, defaults and argument checks shared by the input pipelines."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError

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
_BUILD_HINT = ("create them with: python tools/build_tfrecords.py --input_dir CLASS_FOLDERS "
               "--output_dir DIR")


def in_memory_pipeline(ds: tf.data.Dataset) -> tf.data.Dataset:
    """``ds`` (a pipeline over data held in memory: digits, synthetic) without tf.data's
    autotuning, which adapts buffer sizes and parallelism to slow sources while it runs.
    With it, dropping an iterator that was not read to the end (each epoch's training
    iterator) waited up to tens of seconds for the tuner (measured: 18.9 s for an iterator
    read for 22 s); without it, 1 ms. The elements and their order are the same."""
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


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
    ok = (isinstance(eval_crop, (int, float, np.integer, np.floating))
          and not isinstance(eval_crop, bool))
    if not ok or not 0.0 < eval_crop <= 1.0:
        raise UserError(f"eval_crop {eval_crop!r} must be a fraction in (0, 1]; "
                        "1.0 keeps the whole image")


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


