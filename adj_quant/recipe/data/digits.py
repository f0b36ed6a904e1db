"""``digits``: the 1,797 8x8 digits bundled with scikit-learn, a fixed stratified 80/20
split, resized (bilinear) to the image size."""

from __future__ import annotations

import functools

import numpy as np
import tensorflow as tf

from adj_quant.recipe.data.augment import _augment_float, _seed_stream
from adj_quant.recipe.data.common import (
    _DIGITS_CACHE_BYTES,
    DIGITS_VALIDATION_FRACTION,
    in_memory_pipeline,
)


@functools.lru_cache(maxsize=1)
def _digits_split() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """8x8 digits in [0, 1] and labels for each split (fixed stratified 80/20 split)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (bunch.images / 16.0).astype(np.float32)
    labels = bunch.target.astype(np.int32)
    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=DIGITS_VALIDATION_FRACTION, stratify=labels,
        random_state=0,
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


def _digits_dataset(split, *, batch_size, img_size, training, seed, repeat, drop_remainder,
                    augment):
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
        ds = tf.data.Dataset.zip(ds, _seed_stream(seed)).map(
            augmented, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(plain, num_parallel_calls=tf.data.AUTOTUNE)
    return in_memory_pipeline(
        ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))

