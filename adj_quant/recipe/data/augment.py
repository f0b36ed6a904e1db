"""Training augmentation of float images in [0, 1]: ``shift`` and ``inception`` (see the
package docstring), with per-element seeds for stateless random ops."""

from __future__ import annotations

import tensorflow as tf

from adj_quant.recipe.data.common import (
    _AREA_RANGE,
    _ASPECT_RANGE,
    _MAX_ATTEMPTS,
    _MIN_OBJECT_COVERED,
)


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


def _seed_stream(seed: int) -> tf.data.Dataset:
    """Per-element seeds ``int64 [2]`` for stateless random ops; new ones every epoch."""
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(
        2, drop_remainder=True)

