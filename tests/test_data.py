"""Input pipelines (adj_quant.recipe.data) and the TFRecord builder (tools/build_tfrecords.py)."""

import os
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import build_tool

from adj_quant.errors import UserError
from adj_quant.recipe import data
from adj_quant.recipe.data import digits as digits_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


bt = build_tool()

NUM_CLASSES = 3
PER_CLASS = 5  # -> 4 train + 1 validation image per class with the default 0.2 fraction


def collect(ds, what="test data"):
    xs, ys = [], []
    for x, y in data.iterate(ds, what):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def class_of(images):
    """Class of a flat-grey test image from its mean level (see write_synthetic_class_folders)."""
    levels = np.array([bt.class_level(k, NUM_CLASSES) for k in range(NUM_CLASSES)])
    means = images.mean(axis=(1, 2, 3))
    return (np.abs(means[:, None] - levels[None, :]).argmin(axis=1),
            np.abs(means[:, None] - levels).min(axis=1))


# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_and_stratification():
    from sklearn.datasets import load_digits

    info = data.dataset_info("digits")
    assert (info.name, info.num_classes) == ("digits", 10)
    assert info.num_train + info.num_val == 1797
    assert abs(info.num_val - 0.2 * 1797) <= 1
    _, y_val = collect(data.make_dataset("digits", "validation", batch_size=128, img_size=8,
                                         training=False))
    _, y_train = collect(data.make_dataset("digits", "train", batch_size=128, img_size=8,
                                           training=False))
    assert (len(y_train), len(y_val)) == (info.num_train, info.num_val)
    totals = np.bincount(load_digits().target, minlength=10)
    share = np.bincount(y_val, minlength=10) / totals
    assert np.all(np.abs(share - 0.2) < 0.02), share


def test_digits_values_disjoint_and_deterministic():
    from sklearn.datasets import load_digits

    kw = dict(batch_size=100, img_size=8, training=False)
    x_train, y_train = collect(data.make_dataset("digits", "train", **kw))
    x_val, _ = collect(data.make_dataset("digits", "validation", **kw))
    # the split ignores the seed
    again, y_again = collect(data.make_dataset("digits", "train", seed=5, **kw))
    np.testing.assert_array_equal(x_train, again)
    np.testing.assert_array_equal(y_train, y_again)
    # At 8x8 the images are the raw digits / 16, replicated to three channels.
    np.testing.assert_allclose(x_train[..., 0], x_train[..., 2])
    raw = {np.round(r, 5).tobytes() for r in (load_digits().images / 16.0).astype(np.float32)}
    train = {np.round(r[..., 0], 5).tobytes() for r in x_train}
    val = {np.round(r[..., 0], 5).tobytes() for r in x_val}
    assert len(train) == len(x_train) and len(val) == len(x_val)
    assert not train & val
    assert train | val == raw


@pytest.mark.parametrize("training", [False, True])
def test_digits_shapes_and_range(training):
    ds = data.make_dataset("digits", "train", batch_size=64, img_size=32, training=training, seed=1)
    x, y = next(data.iterate(ds, "digits"))
    assert x.shape == (64, 32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    x = x.numpy()
    assert x.min() >= 0.0 and x.max() <= 1.0 and x.max() > 0.5
    np.testing.assert_array_equal(x[..., 0], x[..., 1])
    np.testing.assert_array_equal(x[..., 0], x[..., 2])
    assert set(y.numpy()) <= set(range(10))


def test_digits_training_is_seeded_and_augmented():
    def first(seed, training=True):
        ds = data.make_dataset("digits", "train", batch_size=32, img_size=32, training=training,
                               seed=seed, drop_remainder=True, repeat=True)
        return next(iter(ds))[0].numpy()

    a, b, c = first(0), first(0), first(1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Augmentation only translates: every augmented image keeps most of its ink.
    ds = data.make_dataset("digits", "train", batch_size=len(a), img_size=32, training=False)
    plain_ink = next(iter(ds))[0].numpy().sum(axis=(1, 2, 3)).mean()
    assert abs(a.sum(axis=(1, 2, 3)).mean() / plain_ink - 1) < 0.2


def test_digits_uncached_resize_matches_cached(monkeypatch):
    cached = next(iter(data.make_dataset("digits", "validation", batch_size=16, img_size=24,
                                         training=False)))
    monkeypatch.setattr(digits_pipeline, "_DIGITS_CACHE_BYTES", 0)
    fresh = next(iter(data.make_dataset("digits", "validation", batch_size=16, img_size=24,
                                        training=False)))
    np.testing.assert_allclose(cached[0].numpy(), fresh[0].numpy(), atol=1e-6)


def test_representative_images_digits():
    a = data.representative_images("digits", img_size=32, count=20, seed=3)
    b = data.representative_images("digits", img_size=32, count=20, seed=3)
    assert a.shape == (20, 32, 32, 3) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0 and a.max() <= 1
    assert not np.array_equal(
        a, data.representative_images("digits", img_size=32, count=20, seed=4))


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_seeded_and_deterministic():
    info = data.dataset_info("synthetic", num_classes=7, synthetic_size=40)
    assert (info.num_classes, info.num_train, info.num_val) == (7, 40, 40)
    kw = dict(batch_size=8, img_size=16, num_classes=7, synthetic_size=40)
    x1, y1 = collect(data.make_dataset("synthetic", "validation", training=False, **kw))
    x2, y2 = collect(data.make_dataset("synthetic", "validation", training=False, **kw))
    assert x1.shape == (40, 16, 16, 3) and y1.dtype == np.int32
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    assert x1.min() >= 0 and x1.max() < 1 and set(y1) <= set(range(7)) and len(set(y1)) > 1
    xt, _ = collect(data.make_dataset("synthetic", "train", training=False, **kw))
    assert not np.array_equal(xt, x1)  # the splits differ
    s0, _ = collect(data.make_dataset("synthetic", "train", training=True, seed=0, **kw))
    s0b, _ = collect(data.make_dataset("synthetic", "train", training=True, seed=0, **kw))
    s1, _ = collect(data.make_dataset("synthetic", "train", training=True, seed=1, **kw))
    np.testing.assert_array_equal(s0, s0b)
    assert not np.array_equal(s0, s1)  # the seed shuffles ...
    np.testing.assert_allclose(np.sort(s0.ravel()), np.sort(s1.ravel()))  # ... the same examples


# --------------------------------------------------------------------------- TFRecords


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfrecords")
    images = root / "images"
    bt.write_synthetic_class_folders(str(images), num_classes=NUM_CLASSES, per_class=PER_CLASS,
                                     size=(40, 50))
    out = root / "shards"
    written = bt.write_class_folder_tfrecords(str(images), str(out), num_shards=2, progress=False)
    return {"images": str(images), "dir": str(out), "written": written, "root": root}


def test_builder_writes_slim_shards(shards):
    names = sorted(os.listdir(shards["dir"]))
    assert names == ["labels.txt", "train-00000-of-00002", "train-00001-of-00002",
                     "validation-00000-of-00002", "validation-00001-of-00002"]
    with open(os.path.join(shards["dir"], "labels.txt")) as fh:
        assert fh.read() == "0:class_0\n1:class_1\n2:class_2\n"
    record = next(iter(tf.data.TFRecordDataset(shards["written"]["train"][0])))
    example = tf.train.Example.FromString(record.numpy()).features.feature
    assert example["image/format"].bytes_list.value[0] in (b"PNG", b"JPEG")
    assert (example["image/height"].int64_list.value[0],
            example["image/width"].int64_list.value[0]) == (40, 50)
    label = example["image/class/label"].int64_list.value[0]
    assert example["image/class/text"].bytes_list.value[0] == f"class_{label}".encode()


def test_tfrecord_round_trip(shards):
    info = data.dataset_info("imagenet", shards["dir"], num_classes=NUM_CLASSES)
    assert (info.num_classes, info.num_train, info.num_val) == (NUM_CLASSES, 12, 3)
    kw = dict(batch_size=4, img_size=32, dataset_dir=shards["dir"], num_classes=NUM_CLASSES)
    for split, per_class in (("train", 4), ("validation", 1)):
        x, y = collect(data.make_dataset("imagenet", split, training=False, **kw))
        assert x.shape == (NUM_CLASSES * per_class, 32, 32, 3) and x.dtype == np.float32
        assert x.min() >= 0 and x.max() <= 1
        np.testing.assert_array_equal(np.bincount(y, minlength=NUM_CLASSES),
                                      [per_class] * NUM_CLASSES)
        predicted, error = class_of(x)
        np.testing.assert_array_equal(predicted, y)  # labels agree with the folders' grey levels
        assert error.max() < 0.03
        x2, y2 = collect(data.make_dataset("imagenet", split, training=False, **kw))
        np.testing.assert_array_equal(x, x2)  # evaluation preprocessing is deterministic
        np.testing.assert_array_equal(y, y2)


def test_tfrecord_training_pipeline(shards):
    kw = dict(batch_size=5, img_size=24, dataset_dir=shards["dir"], num_classes=NUM_CLASSES,
              training=True, repeat=True, drop_remainder=True)
    first = [next(iter(data.make_dataset("imagenet", "train", seed=s, **kw))) for s in (0, 0, 1)]
    x, y = (t.numpy() for t in first[0])
    assert x.shape == (5, 24, 24, 3) and x.min() >= 0 and x.max() <= 1
    np.testing.assert_array_equal(class_of(x)[0], y)
    np.testing.assert_array_equal(x, first[1][0].numpy())  # same seed, same batch
    assert not np.array_equal(x, first[2][0].numpy())
    reps = data.representative_images("imagenet", img_size=16, count=20, dataset_dir=shards["dir"])
    assert reps.shape == (20, 16, 16, 3) and reps.dtype == np.float32  # 12 train images, repeated


def test_file_shards_split_the_records_between_pipelines(shards):
    """Two input pipelines (workers) read disjoint files that together hold every record."""
    files = data.shard_files(shards["dir"], "train")
    assert data.files_of_shard(files, 2, 0) == files[0::2]
    assert data.files_of_shard(files, 2, 1) == files[1::2]
    kw = dict(batch_size=4, img_size=32, dataset_dir=shards["dir"], num_classes=NUM_CLASSES,
              training=False)
    whole = collect(data.make_dataset("imagenet", "train", **kw))[0]
    parts = [collect(data.make_dataset("imagenet", "train", shard=(2, i), **kw))[0]
             for i in range(2)]
    assert min(len(p) for p in parts) > 0 and sum(len(p) for p in parts) == len(whole)
    def rows(x):  # noqa: E306
        return sorted(map(bytes, x.reshape(len(x), -1)))
    assert rows(np.concatenate(parts)) == rows(whole)
    assert not set(rows(parts[0])) & set(rows(parts[1]))
    with pytest.raises(UserError,
                       match=r"2 TFRecord file\(s\) .* among 3 input pipelines.*--num_shards"):
        data.make_dataset("imagenet", "train", shard=(3, 0), **kw)
    with pytest.raises(ValueError, match="only TFRecord data"):
        data.make_dataset("digits", "train", batch_size=4, img_size=8, training=False,
                          shard=(2, 0))


def test_labels_offset(shards):
    out = str(shards["root"] / "offset")
    bt.write_class_folder_tfrecords(shards["images"], out, labels_offset=1, progress=False)
    with open(os.path.join(out, "labels.txt")) as fh:
        assert fh.read().splitlines() == ["1:class_0", "2:class_1", "3:class_2"]
    x, y = collect(data.make_dataset("imagenet", "validation", batch_size=8, img_size=16,
                                     training=False, dataset_dir=out, labels_offset=1,
                                     num_classes=NUM_CLASSES))
    np.testing.assert_array_equal(class_of(x)[0], y)
    with pytest.raises(UserError, match=r"label 3 .*--labels_offset"):
        data.make_dataset("imagenet", "validation", batch_size=8, img_size=16, training=False,
                          dataset_dir=out, num_classes=NUM_CLASSES)


def test_builder_split_only_and_existing_output(shards, tmp_path):
    out = str(tmp_path / "val_only")
    written = bt.write_class_folder_tfrecords(shards["images"], out, split="validation",
                                              progress=False)
    assert list(written) == ["validation"]
    info = data.dataset_info("imagenet", out, num_classes=NUM_CLASSES)
    assert (info.num_train, info.num_val) == (0, NUM_CLASSES * PER_CLASS)
    with pytest.raises(UserError, match="no TFRecord shards matching train-"):
        data.make_dataset("imagenet", "train", batch_size=2, img_size=8, training=True,
                          dataset_dir=out)
    with pytest.raises(UserError, match="--overwrite"):
        bt.write_class_folder_tfrecords(shards["images"], out, split="validation", progress=False)
    bt.write_class_folder_tfrecords(shards["images"], out, split="validation", num_shards=3,
                                    overwrite=True, progress=False)
    assert sorted(f for f in os.listdir(out) if f.startswith("validation")) == [
        f"validation-0000{i}-of-00003" for i in range(3)]  # the old single shard is gone


# --------------------------------------------------------------------------- errors


def _example(label, image=None):
    image = image if image is not None else tf.io.encode_png(np.zeros((6, 6, 3), np.uint8)).numpy()
    return bt.make_example(image, "PNG", 6, 6, label, "c", "f.png")


def _write_shard(path, records):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for r in records:
            writer.write(r)


def test_error_missing_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(UserError, match=r"nope.*--dataset DIR containing train-\*-of-\*"):
        data.make_dataset("imagenet", "train", batch_size=2, img_size=8, training=True,
                          dataset_dir=missing)
    with pytest.raises(UserError, match="nope"):
        data.dataset_info("imagenet", missing)
    with pytest.raises(UserError, match="--dataset"):
        data.dataset_info("imagenet", None)


def test_error_no_shards(tmp_path):
    with pytest.raises(UserError,
                       match=r"validation-\*-of-\*.*" + str(tmp_path) + ".*build_tfrecords"):
        data.make_dataset("imagenet", "validation", batch_size=2, img_size=8, training=False,
                          dataset_dir=str(tmp_path))
    with pytest.raises(UserError, match=str(tmp_path)):
        data.dataset_info("imagenet", str(tmp_path))


def test_error_garbage_shard(tmp_path):
    _write_shard(tmp_path / "train-00000-of-00002", [_example(0)] * 3)
    bad = tmp_path / "train-00001-of-00002"
    bad.write_bytes(os.urandom(64) + b"not a tfrecord at all" * 10)
    with pytest.raises(UserError, match="corrupt.*" + str(bad)):
        data.make_dataset("imagenet", "train", batch_size=2, img_size=8, training=True,
                          dataset_dir=str(tmp_path))
    with pytest.raises(UserError, match="corrupt.*" + str(bad)):
        data.dataset_info("imagenet", str(tmp_path))


def test_error_corruption_inside_shard_surfaces_in_iterate(tmp_path):
    path = tmp_path / "validation-00000-of-00001"
    _write_shard(path, [_example(0)] * 20)
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2:len(raw) // 2 + 8] = b"\xde\xad\xbe\xef" * 2  # first record stays intact
    path.write_bytes(bytes(raw))
    ds = data.make_dataset("imagenet", "validation", batch_size=4, img_size=8, training=False,
                           dataset_dir=str(tmp_path), num_classes=2)  # the up-front check passes
    with pytest.raises(UserError, match="corrupt.*" + str(path)):
        for _ in data.iterate(ds, "validation data"):
            pass


def test_error_bad_label_and_image_inside_shard(tmp_path):
    path = tmp_path / "validation-00000-of-00001"
    _write_shard(path, [_example(0), _example(1), _example(7), _example(1)])
    ds = data.make_dataset("imagenet", "validation", batch_size=1, img_size=8, training=False,
                           dataset_dir=str(tmp_path), num_classes=2)
    with pytest.raises(UserError, match=r"label 7 in validation data \(shard .*" + str(path)
                       + r".*--labels_offset.*--num_classes"):
        for _ in data.iterate(ds, "validation data"):
            pass
    path.unlink()
    path = tmp_path / "validation-00000-of-00001"
    _write_shard(path, [_example(0), _example(1, image=b"garbage, not an image")])
    ds = data.make_dataset("imagenet", "validation", batch_size=1, img_size=8, training=False,
                           dataset_dir=str(tmp_path), num_classes=2)
    with pytest.raises(UserError,
                       match="validation data: shard .*" + str(path) + ".*neither JPEG nor PNG"):
        for _ in data.iterate(ds, "validation data"):
            pass


def test_error_bad_arguments():
    with pytest.raises(UserError, match="unknown dataset name 'mnist'"):
        data.dataset_info("mnist")
    with pytest.raises(UserError, match="unknown split 'test'"):
        data.make_dataset("digits", "test", batch_size=2, img_size=8, training=False)
    with pytest.raises(UserError, match="--labels_offset"):
        data.make_dataset("digits", "train", batch_size=2, img_size=8, training=False,
                          labels_offset=1)
    with pytest.raises(UserError, match="batch_size"):
        data.make_dataset("digits", "train", batch_size=0, img_size=8, training=False)


def test_builder_errors(tmp_path, capsys):
    with pytest.raises(UserError, match="--input_dir .*nope.* does not exist"):
        bt.write_class_folder_tfrecords(str(tmp_path / "nope"), str(tmp_path / "out"),
                                        progress=False)
    (tmp_path / "in" / "cat").mkdir(parents=True)
    (tmp_path / "in" / "cat" / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="no .jpg/.jpeg/.png images"):
        bt.write_class_folder_tfrecords(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    (tmp_path / "in" / "cat" / "fake.jpg").write_bytes(b"not really a jpeg")
    with pytest.raises(UserError, match="fake.jpg is not a readable JPEG or PNG"):
        bt.write_class_folder_tfrecords(str(tmp_path / "in"), str(tmp_path / "out"), progress=False)
    with pytest.raises(SystemExit) as exit_info:
        bt.main(["--input_dir", str(tmp_path / "nope"), "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --input_dir") and "\n" not in err


def test_training_flips_horizontally_only(tmp_path):
    h, w = 40, 48
    yy, xx = np.mgrid[0:h, 0:w]
    pixels = (150 * yy / h + 100 * xx / w).astype(np.uint8)  # brighter downwards and to the right
    png = tf.io.encode_png(np.repeat(pixels[..., None], 3, axis=-1)).numpy()
    _write_shard(tmp_path / "train-00000-of-00001",
                 [bt.make_example(png, "PNG", h, w, 0, "c", "g.png")] * 4)
    ds = data.make_dataset("imagenet", "train", batch_size=32, img_size=16, training=True,
                           repeat=True, dataset_dir=str(tmp_path), num_classes=1)
    x = next(iter(ds))[0].numpy()[..., 0]
    down = x[:, -4:, :].mean(axis=(1, 2)) - x[:, :4, :].mean(axis=(1, 2))
    right = x[:, :, -4:].mean(axis=(1, 2)) - x[:, :, :4].mean(axis=(1, 2))
    assert np.all(down > 0)  # never flipped upside down
    assert np.sum(right > 0) >= 4 and np.sum(right < 0) >= 4  # mirrored about half of the time
    assert len({np.round(r, 3).tobytes() for r in x}) > 8  # random crops differ


def test_build_tfrecords_cli(shards, tmp_path):
    import subprocess

    script = os.path.join(ROOT, "tools", "build_tfrecords.py")
    env = dict(os.environ, PYTHONPATH="")  # the script must find adj_quant on its own
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, script, "--input_dir", shards["images"],
                           "--output_dir", str(out), "--validation_fraction", "0.4",
                           "--num_shards", "1", "--quiet"],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(os.listdir(out)) == ["labels.txt", "train-00000-of-00001",
                                       "validation-00000-of-00001"]
    info = data.dataset_info("imagenet", str(out), num_classes=NUM_CLASSES)
    assert (info.num_train, info.num_val) == (9, 6)  # 2 of the 5 images per class in validation
    bad = subprocess.run([sys.executable, script, "--input_dir", str(tmp_path / "nope"),
                          "--output_dir", str(out)],
                         capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=60)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "nope" in bad.stderr


# --------------------------------------------------------------------------- augment / eval_crop


def translation_of(image, source, pad):
    """``(dy, dx)`` with ``|dy|, |dx| <= pad`` such that ``image`` is ``source`` moved by it
    (zero fill), or None. ``image`` and ``source`` are ``[S, S, C]``."""
    size = source.shape[0]
    padded = np.pad(source, [(pad, pad), (pad, pad), (0, 0)])
    for y in range(2 * pad + 1):
        for x in range(2 * pad + 1):
            if np.allclose(padded[y:y + size, x:x + size], image, atol=1e-6):
                return pad - y, pad - x
    return None


def sorted_rows(images):
    return np.sort(np.round(images.reshape(len(images), -1), 5), axis=0)


def test_default_augment_and_choices():
    assert data.AUGMENTATIONS == ("inception", "shift", "none")
    assert [data.default_augment(n) for n in data.DATASET_NAMES] == ["shift", "inception", "none"]
    with pytest.raises(UserError, match="unknown dataset name 'mnist'"):
        data.default_augment("mnist")


def _digits_train(augment, seed=0, batch_size=64, img_size=32):
    ds = data.make_dataset("digits", "train", batch_size=batch_size, img_size=img_size,
                           training=True, seed=seed, augment=augment)
    x, y = next(iter(ds))
    return x.numpy(), y.numpy()


def test_digits_augment_none_is_the_eval_data_shuffled():
    x, y = collect(data.make_dataset("digits", "train", batch_size=500, img_size=16, training=True,
                                     seed=3, augment="none"))
    x_eval, y_eval = collect(data.make_dataset("digits", "train", batch_size=500, img_size=16,
                                               training=False))
    assert not np.array_equal(y, y_eval)  # shuffled ...
    np.testing.assert_array_equal(np.sort(y), np.sort(y_eval))
    np.testing.assert_array_equal(sorted_rows(x), sorted_rows(x_eval))  # ... but not augmented


def test_digits_augment_shift_translates_and_is_the_default():
    none, labels = _digits_train("none")
    shifted, labels_shift = _digits_train("shift")
    np.testing.assert_array_equal(labels, labels_shift)  # the shuffle does not depend on augment
    np.testing.assert_array_equal(shifted, _digits_train(None)[0])  # digits' default
    pad = max(1, 32 // 10)
    moves = [translation_of(a, b, pad) for a, b in zip(shifted, none)]
    assert None not in moves
    assert sum(m != (0, 0) for m in moves) > len(moves) // 2


def test_digits_augment_inception_crops_and_flips():
    none, labels = _digits_train("none")
    crop, labels_crop = _digits_train("inception")
    np.testing.assert_array_equal(labels, labels_crop)
    np.testing.assert_array_equal(crop, _digits_train("inception")[0])  # seeded
    assert not np.array_equal(crop, _digits_train("inception", seed=1)[0])
    assert crop.shape == none.shape and crop.min() >= 0 and crop.max() <= 1
    np.testing.assert_array_equal(crop[..., 0], crop[..., 2])
    pad = max(1, 32 // 10)
    moves = [translation_of(a, b, pad) for a, b in zip(crop, none)]
    assert sum(m is None for m in moves) > len(moves) // 2  # zoomed in / mirrored, not shifted
    # Zooming in on a crop makes the strokes thicker: on average more ink per image.
    assert crop.sum() > 1.1 * none.sum()


@pytest.mark.parametrize("augment", ["shift", "inception"])
def test_digits_uncached_augment_matches_cached(monkeypatch, augment):
    cached = _digits_train(augment, batch_size=16, img_size=24)[0]
    monkeypatch.setattr(digits_pipeline, "_DIGITS_CACHE_BYTES", 0)
    fresh = _digits_train(augment, batch_size=16, img_size=24)[0]
    np.testing.assert_allclose(cached, fresh, atol=1e-5)


def test_synthetic_augment_choices():
    kw = dict(batch_size=16, img_size=20, num_classes=5, synthetic_size=16, training=True, seed=2)
    none, y = next(iter(data.make_dataset("synthetic", "train", augment="none", **kw)))
    default, _ = next(iter(data.make_dataset("synthetic", "train", **kw)))
    np.testing.assert_array_equal(none, default)  # synthetic's default: no augmentation
    shifted, y_shift = next(iter(data.make_dataset("synthetic", "train", augment="shift", **kw)))
    np.testing.assert_array_equal(y, y_shift)
    assert all(translation_of(a, b, 2) is not None for a, b in zip(shifted.numpy(), none.numpy()))
    crop, _ = next(iter(data.make_dataset("synthetic", "train", augment="inception", **kw)))
    assert crop.shape == none.shape and not np.allclose(crop, none)
    assert 0 <= crop.numpy().min() and crop.numpy().max() <= 1


def test_eval_crop_has_no_effect_on_digits_and_synthetic():
    for name in ("digits", "synthetic"):
        kw = dict(batch_size=8, img_size=16, training=False, synthetic_size=8)
        a = next(iter(data.make_dataset(name, "validation", **kw)))[0]
        b = next(iter(data.make_dataset(name, "validation", eval_crop=0.5, **kw)))[0]
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(
        data.representative_images("digits", img_size=16, count=4),
        data.representative_images("digits", img_size=16, count=4, eval_crop=0.3))


@pytest.fixture(scope="module")
def known_shards(tmp_path_factory):
    """Shards of random RGB images whose label is their index: 6 square 20x20 PNGs in
    ``square`` (train and validation), and 40x50 PNG + JPEG images in ``wide``."""
    root = tmp_path_factory.mktemp("known")
    rng = np.random.default_rng(0)
    out = {}
    for name, shape, count in (("square", (20, 20), 6), ("wide", (40, 50), 4)):
        images = rng.integers(0, 256, size=(count, *shape, 3), dtype=np.uint8)
        records, decoded = [], []
        for i, pixels in enumerate(images):
            if name == "wide" and i % 2:
                encoded, fmt = tf.io.encode_jpeg(pixels, quality=95).numpy(), "JPEG"
            else:
                encoded, fmt = tf.io.encode_png(pixels).numpy(), "PNG"
            decoded.append(tf.io.decode_image(encoded, channels=3).numpy())  # what a reader sees
            records.append(bt.make_example(encoded, fmt, shape[0], shape[1], i, f"c{i}",
                                           f"{i}.png"))
        folder = root / name
        folder.mkdir()
        for split in data.SPLITS:
            _write_shard(folder / f"{split}-00000-of-00001", records)
        out[name] = (str(folder), np.stack(decoded))
    return out


def _shard_images(folder, img_size, count, **kw):
    ds = data.make_dataset("imagenet", "validation", batch_size=count, img_size=img_size,
                           dataset_dir=folder, num_classes=count, training=False, **kw)
    x, y = collect(ds)
    return x[np.argsort(y)], np.sort(y)


def test_eval_crop_one_keeps_the_whole_image(known_shards):
    folder, pixels = known_shards["square"]
    x, y = _shard_images(folder, 20, 6, eval_crop=1.0)
    np.testing.assert_array_equal(y, np.arange(6))
    np.testing.assert_allclose(x, pixels / 255.0, atol=1e-5)  # same size: the image itself
    x, _ = _shard_images(folder, 32, 6, eval_crop=1.0)  # another size: the image resized
    expected = tf.clip_by_value(tf.image.resize(pixels, [32, 32], method="bicubic") / 255.0, 0, 1)
    np.testing.assert_allclose(x, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("eval_crop, side, offset", [(1.0, 40, (0, 5)), (0.5, 20, (10, 15)),
                                                     (0.3, 12, (14, 19)), (0.7, 28, (6, 11))])
def test_eval_crop_keeps_the_centre(known_shards, eval_crop, side, offset):
    folder, pixels = known_shards["wide"]  # 40x50: the crop is a centred square of the shorter side
    # crop size = image size: no resampling
    x, _ = _shard_images(folder, side, 4, eval_crop=eval_crop)
    y0, x0 = offset
    expected = pixels[:, y0:y0 + side, x0:x0 + side] / 255.0
    np.testing.assert_allclose(x[0::2], expected[0::2], atol=1e-5)  # PNG
    # JPEG, decoded inside the window
    np.testing.assert_allclose(x[1::2], expected[1::2], atol=3 / 255)


def test_eval_crop_default_is_0875_at_any_size(known_shards):
    """The default central crop keeps 7/8 of the shorter side (224/(224+32) at 224), also for
    small images: 35 of 40 pixels, not 32/(32+32) = half."""
    folder, pixels = known_shards["wide"]
    x, _ = _shard_images(folder, 35, 4)
    np.testing.assert_allclose(x[0::2], pixels[0::2, 3:38, 8:43] / 255.0, atol=1e-5)
    reps = data.representative_images("imagenet", img_size=20, count=6, dataset_dir=folder,
                                      eval_crop=0.5)
    centres = pixels[:, 10:30, 15:35] / 255.0
    errors = np.abs(reps[:, None] - centres[None]).max(axis=(2, 3, 4))  # [rep, centre]
    assert np.all(errors.min(axis=1) < 3 / 255)  # every one is the centre half of a train image


def test_tfrecord_augment_choices(known_shards):
    folder, pixels = known_shards["square"]
    kw = dict(batch_size=6, img_size=20, dataset_dir=folder, num_classes=6, training=True, seed=4,
              eval_crop=1.0)
    source = pixels / 255.0

    def train(augment):
        x, y = collect(data.make_dataset("imagenet", "train", augment=augment, **kw))
        return x, y

    x, y = train("none")
    np.testing.assert_allclose(x, source[y], atol=1e-5)  # the eval images, shuffled
    assert not np.array_equal(y, np.arange(6))
    x, y = train("shift")
    moves = [translation_of(a, s, 2) for a, s in zip(x, source[y])]
    assert None not in moves and any(m != (0, 0) for m in moves)
    x, y = train("inception")
    np.testing.assert_array_equal(x, train(None)[0])  # the TFRecords' default
    moves = [translation_of(a, s, 2) for a, s in zip(x, source[y])]
    assert sum(m is None for m in moves) >= len(moves) // 2  # mostly zoomed in / mirrored


@pytest.mark.parametrize("kw, pattern", [
    (dict(augment="flip"), r"unknown augment 'flip'; use one of: inception, shift, none"),
    (dict(augment=""), r"unknown augment ''"),
    (dict(eval_crop=0.0), r"eval_crop 0.0 must be a fraction in \(0, 1\]"),
    (dict(eval_crop=1.5), r"eval_crop 1.5 must be"),
    (dict(eval_crop=-0.5), r"eval_crop -0.5 must be"),
    (dict(eval_crop=float("nan")), r"eval_crop nan must be"),
    (dict(eval_crop="0.5"), r"eval_crop '0.5' must be"),
    (dict(eval_crop=True), r"eval_crop True must be"),
])
def test_error_bad_augment_and_eval_crop(kw, pattern):
    for name in data.DATASET_NAMES:
        with pytest.raises(UserError, match=pattern) as err:
            data.make_dataset(name, "train", batch_size=2, img_size=8, training=True,
                              dataset_dir="/nonexistent", **kw)
        assert "\n" not in str(err.value)
    if "eval_crop" in kw:
        with pytest.raises(UserError, match=pattern) as err:
            data.representative_images("digits", img_size=8, count=2, **kw)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("name", ["digits", "synthetic"])
def test_in_memory_pipelines_run_untuned_and_give_the_tuned_elements(name):
    """Digits and synthetic data run without tf.data's autotuning (dropping a half-read
    iterator waited for the tuner for seconds); oracle: the same pipeline with autotuning
    back on yields the same batches in the same order."""
    def pipeline():
        return data.make_dataset(name, "train", batch_size=16, img_size=24, training=True,
                                 seed=3, drop_remainder=True)

    ds = pipeline()
    assert ds.options().autotune.enabled is False
    options = tf.data.Options()
    options.autotune.enabled = True
    tuned = pipeline().with_options(options)  # a new pipeline: its first shuffle order
    assert tuned.options().autotune.enabled is True
    for (a, la), (b, lb) in zip(ds.take(6), tuned.take(6)):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_array_equal(la.numpy(), lb.numpy())


@pytest.mark.parametrize("batch, img, max_images, expected", [
    (32, 32, 360, 360),     # the digits recipe: every validation image in one batch
    (32, 32, None, 1024),   # 64 * 224^2 / 32^2 = 3136 pixels' worth, capped at 1024
    (32, 224, None, 64),    # ImageNet at 224: 64 images, as before
    (128, 224, None, 128),  # never fewer than the training batch
    (32, 299, None, 64),    # nor fewer than 64 (299 px: 35 images' worth of pixels)
    (64, 32, 64, 64),       # no more than the images read
    (32, 64, 10_000, 784),  # 64 * (224 / 64)^2
])
def test_eval_batch_size_by_hand(batch, img, max_images, expected):
    assert data.eval_batch_size(batch, img, max_images) == expected


def test_validation_data_is_the_same_images_in_one_batch():
    """The recipe's validation pass reads the 360 digits in one batch: the same images and
    labels, in the same order, as batches of 64."""
    from types import SimpleNamespace

    o = SimpleNamespace(dataset="digits", num_classes=None, labels_offset=0, batch_size=32,
                        img_size=32, max_val_images=360, eval_crop=1.0)
    batches = list(data.validation_data(o, 10))
    assert [int(b[0].shape[0]) for b in batches] == [360]
    small = list(data.make_dataset("digits", "validation", batch_size=64, img_size=32,
                                   training=False))
    np.testing.assert_array_equal(batches[0][0].numpy(),
                                  np.concatenate([b[0].numpy() for b in small]))
    np.testing.assert_array_equal(batches[0][1].numpy(),
                                  np.concatenate([b[1].numpy() for b in small]))
