"""``imagenet``: slim-format TFRecord shards (``train-*-of-*``, ``validation-*-of-*``) with
EfficientNet preprocessing, checks that name the bad shard, and :func:`iterate`, which
turns data errors raised while reading into one-line :class:`UserError`."""

from __future__ import annotations

import collections
import logging
import os
import re
import weakref
from typing import Iterator

import numpy as np
import tensorflow as tf

from adj_quant.errors import UserError
from adj_quant.recipe.data.augment import _sample_crop, _seed_stream, _shift
from adj_quant.recipe.data.common import (
    _BUILD_HINT,
    _FEATURES,
    _IMAGE_KEY,
    _IMAGE_MARK,
    _KNOWN_COUNTS,
    _LABEL_KEY,
    _LABEL_MARK,
    _MAX_PARALLEL_SHARDS,
    _READ_BUFFER_BYTES,
    _SCAN_LIMIT_BYTES,
    _SHARD_HINT,
    SHUFFLE_BUFFER,
    _check_split,
)

log = logging.getLogger('adj_quant.recipe.data')


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


def files_of_shard(files: list[str], count: int, index: int) -> list[str]:
    """The files input pipeline ``index`` of ``count`` reads: every ``count``-th one,
    starting at ``index`` (so the pipelines share no file and together read all)."""
    if not 0 <= index < count:
        raise ValueError(f"shard index {index} is not in 0..{count - 1}")
    if len(files) < count:
        raise UserError(f"{len(files)} TFRecord file(s) in {os.path.dirname(files[0])} cannot be "
                        f"shared out by file among {count} input pipelines; write at least "
                        f"{count} shards (tools/build_tfrecords.py --num_shards)")
    return files[index::count]


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
        log.warning("using %d of %d %s shards in %s", len(files), total, split,
                    os.path.dirname(files[0]))


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
    msg = re.sub(r"Error in user-defined function passed to \S+ transformation with iterator: "
                 r"\S+:\s*", "", msg)
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
        raise UserError(f"corrupt TFRecord data in {os.path.dirname(files[0])}: "
                        f"{_short_tf_message(err)}") from err


def _corrupt_shard_error(path: str, err: Exception) -> UserError:
    return UserError(
        f"corrupt TFRecord shard {path} ({_short_tf_message(err)}); delete it and re-create the "
        "shards with tools/build_tfrecords.py"
    )


def _label_error(label: int, labels_offset: int, num_classes: int, where: str) -> UserError:
    return UserError(
        f"label {label} in {where} is outside [0, {num_classes}) "
        f"after --labels_offset {labels_offset}; "
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
            raise UserError(f"corrupt TFRecord shard {path}: a record is not a tf.train.Example "
                            f"({err})") from err
        feature = example.features.feature
        image = feature[_IMAGE_KEY].bytes_list.value if _IMAGE_KEY in feature else []
        label = feature[_LABEL_KEY].int64_list.value if _LABEL_KEY in feature else []
        if len(image) != 1 or len(label) != 1:
            missing = [k for k, v in ((_IMAGE_KEY, image), (_LABEL_KEY, label)) if len(v) != 1]
            raise UserError(
                f"shard {path} is not in slim format: missing {', '.join(missing)}; "
                "re-create it with tools/build_tfrecords.py"
            )
        if not _looks_like_image_py(image[0]):
            raise UserError(f"shard {path} holds an image that is neither JPEG nor PNG; "
                            "re-create it with tools/build_tfrecords.py")
        if num_classes is not None and not 0 <= label[0] - labels_offset < num_classes:
            raise _label_error(label[0], labels_offset, num_classes, f"shard {path}")
    path, record = records[0]  # decode one image fully, to catch a wrong encoding early
    encoded = tf.io.parse_single_example(record, _FEATURES)[_IMAGE_KEY]
    try:
        tf.io.decode_image(encoded, channels=3, expand_animations=False)
    except tf.errors.InvalidArgumentError as err:
        raise UserError(f"cannot decode the first image in shard {path}: "
                        f"{_short_tf_message(err)}") from err
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
            count = ds.batch(4096).reduce(
                np.int64(0), lambda n, batch: n + tf.shape(batch, out_type=tf.int64)[0])
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
        f"corrupt TFRecord data while reading {what} from {where} ({_short_tf_message(err)}); "
        "re-create the shards with tools/build_tfrecords.py"
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
        in_range = tf.logical_and(raw_label - labels_offset >= 0,
                                  raw_label - labels_offset < num_classes)
        checks.append(
            tf.debugging.Assert(in_range,
                                [_LABEL_MARK, raw_label, labels_offset, num_classes, filename])
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
_DATASET_SHARDS: "weakref.WeakKeyDictionary[tf.data.Dataset, list[str]]" = (
    weakref.WeakKeyDictionary())
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
                      num_classes, repeat, drop_remainder, augment, eval_crop, shard=None):
    files = shard_files(dataset_dir, split)
    _validate_shards(files, labels_offset, num_classes)
    if shard is not None:
        files = files_of_shard(files, *shard)
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
        return UserError(f"{what}: shard {match.group(1)} holds a record whose image is neither "
                         "JPEG nor PNG; re-create it with tools/build_tfrecords.py")
    short = _short_tf_message(err)
    if isinstance(err, (tf.errors.DataLossError, tf.errors.OutOfRangeError)):
        try:
            files = _DATASET_SHARDS.get(dataset)
        except TypeError:
            files = None
        return _locate_corruption(files or list(_RECENT_SHARDS), err, what)
    if isinstance(err, tf.errors.NotFoundError):
        return UserError(f"{what}: a file disappeared while reading ({short}); "
                         "check the --dataset directory")
    return UserError(f"{what}: cannot read a record ({short}); "
                     "re-create the shards with tools/build_tfrecords.py")
