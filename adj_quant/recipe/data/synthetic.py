"""``synthetic``: uniform noise images with uniform labels; each split's content is fixed,
``seed`` only changes the order (and augmentation) when training."""

from __future__ import annotations

import tensorflow as tf

from adj_quant.recipe.data.augment import _augment_float, _seed_stream
from adj_quant.recipe.data.common import in_memory_pipeline

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

        ds = tf.data.Dataset.zip(ds, _seed_stream(seed)).map(
            augmented, num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = ds.map(make, num_parallel_calls=tf.data.AUTOTUNE)
    return in_memory_pipeline(
        ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE))

