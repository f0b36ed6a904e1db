"""A stage's checkpoints: damaged files end in one line naming an earlier checkpoint, a
failed save leaves nothing behind, and a forgotten checkpoint moves the pointers."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from adj_quant.checkpoint_paths import CorruptCheckpoint, earlier_checkpoint
from adj_quant.checkpoints import RunCheckpoints, remove_orphans, restore_model
from adj_quant.errors import UserError
from adj_quant.seed_quantizers.checkpoint_quantizer import load_reader

DATA = ".data-00000-of-00001"


class Tiny(tf.Module):
    def __init__(self, value=0.0):
        super().__init__()
        self.w = tf.Variable(np.full((200, 50), value, np.float32), name="w")
        self.b = tf.Variable(np.full((7,), value, np.float32), name="b")


def _stage(tmp_path, values=(1.0, 2.0, 3.0)):
    """A stage directory with one checkpoint per value, as the trainer writes them."""
    ckpts = RunCheckpoints(str(tmp_path / "stage"))
    for i, value in enumerate(values):
        ckpts.save(tf.train.Checkpoint(model=Tiny(value)), f"me{i + 1:04d}", {"top1": value / 10})
    return ckpts


def _truncate(path, size):
    with open(path, "r+b") as f:
        f.truncate(size)


def _flip_middle_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))


DAMAGE = {
    "truncated index": lambda p: _truncate(p + ".index", os.path.getsize(p + ".index") // 2),
    "empty index": lambda p: _truncate(p + ".index", 0),
    "truncated data": lambda p: _truncate(p + DATA, 1000),
    "empty data": lambda p: _truncate(p + DATA, 0),
    "checksum mismatch": lambda p: _flip_middle_byte(p + DATA),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_checkpoint_is_one_line_naming_the_earlier_one(tmp_path, damage):
    ckpts = _stage(tmp_path)
    latest = ckpts.latest()
    DAMAGE[damage](latest)
    model = Tiny()
    with pytest.raises(CorruptCheckpoint) as info:
        restore_model(model, latest)
    message = str(info.value)
    assert message.startswith(f"checkpoint {latest} is corrupt (")
    assert message.endswith(f"restore an earlier one: {ckpts.path('me0002')}")
    assert "\n" not in message
    # The seed quantizers read through the same rule.
    with pytest.raises(CorruptCheckpoint, match="is corrupt"):
        reader = load_reader(latest)
        for name in reader.get_variable_to_shape_map():
            reader.get_tensor(name)
    # The earlier one restores.
    restore_model(model, ckpts.path("me0002"))
    assert float(model.b[0]) == 2.0


def test_a_checkpoint_holding_nan_is_refused(tmp_path):
    ckpts = _stage(tmp_path, values=(1.0,))
    ckpts.save(tf.train.Checkpoint(model=Tiny(float("nan"))), "me0002", {"top1": 0.0})
    with pytest.raises(CorruptCheckpoint, match=r"NaN or Inf.*earlier one: .*me0001"):
        restore_model(Tiny(), ckpts.latest())


def test_earlier_checkpoint_follows_the_listed_order(tmp_path):
    ckpts = _stage(tmp_path)
    assert earlier_checkpoint(ckpts.path("me0003")) == ckpts.path("me0002")
    assert earlier_checkpoint(ckpts.path("me0001")) is None
    os.remove(ckpts.path("me0002") + ".index")  # a listed checkpoint that is gone is skipped
    assert earlier_checkpoint(ckpts.path("me0003")) == ckpts.path("me0001")


def test_a_failed_save_leaves_no_temporary_files_and_the_pointers_unchanged(tmp_path, monkeypatch):
    ckpts = _stage(tmp_path, values=(1.0,))
    before = json.loads((tmp_path / "stage" / "checkpoints.json").read_text())
    checkpoint = tf.train.Checkpoint(model=Tiny(5.0))

    def disk_full(prefix):
        os.makedirs(prefix + "_temp")  # what TensorFlow leaves when a shard write fails
        with open(prefix + ".index", "wb") as f:
            f.write(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint, "write", disk_full)
    with pytest.raises(OSError):
        ckpts.save(checkpoint, "me0002", {"top1": 0.5})
    leftovers = [n for n in os.listdir(tmp_path / "stage") if n.startswith(".")]
    assert leftovers == []
    assert json.loads((tmp_path / "stage" / "checkpoints.json").read_text()) == before
    assert ckpts.latest() == ckpts.path("me0001")


def test_orphans_of_a_killed_save_are_removed(tmp_path):
    stage = tmp_path / "stage"
    _stage(tmp_path, values=(1.0,))
    (stage / ".tmp-me0002_temp").mkdir()
    (stage / ".tmp-me0002_temp" / "part-00000-of-00001.data-00000-of-00001").write_bytes(b"x")
    (stage / ".tmp-me0002.index").write_bytes(b"x")
    (stage / ".checkpoints.json.abc.tmp").write_text("{")
    removed = remove_orphans(str(stage))
    assert len(removed) == 3
    assert sorted(os.listdir(stage)) == sorted(
        ["checkpoint", "checkpoints.json", "me0001.index", "me0001" + DATA])


def test_discard_moves_latest_and_best_to_intact_checkpoints(tmp_path):
    ckpts = _stage(tmp_path)  # top-1 0.1, 0.2, 0.3: me0003 is latest and best
    ckpts.discard("me0003")
    assert ckpts.state["latest"] == "me0002" and ckpts.state["best"] == "me0002"
    reread = RunCheckpoints(str(tmp_path / "stage"))
    assert [e["name"] for e in reread.entries()] == ["me0001", "me0002"]
    assert tf.train.latest_checkpoint(str(tmp_path / "stage")).endswith("me0002")


def test_an_unreadable_state_file_is_one_line(tmp_path):
    stage = tmp_path / "stage"
    stage.mkdir()
    (stage / "checkpoints.json").write_text("{not json")
    with pytest.raises(UserError, match="checkpoints.json is unreadable"):
        RunCheckpoints(str(stage))
    shutil.rmtree(stage)


def test_an_unreadable_model_spec_is_one_line(tmp_path):
    from adj_quant.checkpoints import load_spec

    (tmp_path / "model_spec.json").write_bytes(bytes(range(256)))
    with pytest.raises(UserError, match="model_spec.json is unreadable"):
        load_spec(str(tmp_path / "ckpt"))
    (tmp_path / "model_spec.json").write_text('{"kind": "float"}')
    with pytest.raises(UserError, match="model_spec.json is unreadable"):
        load_spec(str(tmp_path / "ckpt"))


def test_damage_in_a_tensor_the_model_does_not_restore_is_refused_too(tmp_path):
    # An optimizer-slot-like tensor 20x the model's size: the file's middle byte is in it.
    extra = tf.Variable(np.ones((1000, 200), np.float32))
    prefix = tf.train.Checkpoint(model=Tiny(1.0), slot=extra).write(str(tmp_path / "c"))
    _flip_middle_byte(prefix + DATA)
    with pytest.raises(CorruptCheckpoint, match="Checksum does not match"):
        restore_model(Tiny(), prefix)


def test_later_saves_write_what_checkpoint_write_writes_and_restore(tmp_path):
    """The second and later saves of one checkpoint object skip ``tf.train.Checkpoint.write``
    (``CheckpointWriter``); oracle: ``write`` itself, on the same values, for every key
    (the object graph included), and a restore into fresh objects."""
    from conftest import TOY_NET

    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
    from adj_quant.training_rules import Adam

    def objects(seed):
        model = QuantizedNetwork.from_float(FloatNetwork(TOY_NET, seed=seed),
                                            QuantConfig(bits_trainable=True))
        adam = Adam(model.trainable_variables, "adam")
        step = tf.Variable(0, dtype=tf.int64)
        return model, adam, step, tf.train.Checkpoint(model=model, adam=adam, step=step)

    model, adam, step, checkpoint = objects(0)
    ckpts = RunCheckpoints(str(tmp_path / "stage"))
    calls = []
    write = checkpoint.write
    checkpoint.write = lambda prefix: calls.append(prefix) or write(prefix)
    for i in range(3):
        for var in [*model.trainable_variables, *adam.m]:
            var.assign_add(tf.fill(var.shape, 0.25 * (i + 1)))
        step.assign_add(7)
        fast = ckpts.save(checkpoint, f"me{i + 1:04d}", {"top1": 0.1 * i})
        reference = write(str(tmp_path / "reference" / f"me{i + 1:04d}"))
        a, b = tf.train.load_checkpoint(fast), tf.train.load_checkpoint(reference)
        keys = sorted(b.get_variable_to_shape_map())
        assert sorted(a.get_variable_to_shape_map()) == keys and len(keys) > 100
        for key in keys:
            np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=key)
    assert len(calls) == 1  # only the first save walked the objects
    other, other_adam, other_step, restored = objects(1)
    restored.read(fast).assert_consumed()
    for x, y in zip([*other.variables, *other_adam.variables], [*model.variables, *adam.variables]):
        np.testing.assert_array_equal(x.numpy(), y.numpy(), err_msg=y.name)
    assert int(other_step.numpy()) == 21


def test_a_checkpoint_with_more_than_variables_is_written_by_write_every_time(tmp_path):
    """An iterator's state is not a variable: every save goes through ``write``, and the
    file restores the iterator's position."""
    dataset = tf.data.Dataset.range(10)
    iterator = iter(dataset)
    checkpoint = tf.train.Checkpoint(model=Tiny(1.0), iterator=iterator)
    calls = []
    write = checkpoint.write
    checkpoint.write = lambda prefix: calls.append(prefix) or write(prefix)
    ckpts = RunCheckpoints(str(tmp_path / "stage"))
    for i in range(3):
        next(iterator)
        last = ckpts.save(checkpoint, f"me{i + 1:04d}", {"top1": 0.1 * i})
    assert len(calls) == 3
    again = iter(dataset)
    tf.train.Checkpoint(model=Tiny(0.0), iterator=again).read(last).assert_consumed()
    assert int(next(again)) == 3


def test_a_background_save_writes_the_values_of_its_call_and_moves_the_pointers_when_done(
        tmp_path):
    """``save(background=True)`` takes the values when it is called: the variables change
    right after it returns, yet each file holds what ``Checkpoint.write`` wrote for the
    values at the call (oracle), and ``checkpoints.json`` names a checkpoint only once its
    files are complete."""
    model = Tiny(0.0)
    checkpoint = tf.train.Checkpoint(model=model)
    ckpts = RunCheckpoints(str(tmp_path / "stage"), keep=2)
    names = []
    for i in range(4):
        model.w.assign(tf.fill(model.w.shape, float(i)))
        twin = Tiny(0.0)
        twin.w.assign(model.w)
        reference = tf.train.Checkpoint(model=twin).write(str(tmp_path / "reference" / str(i)))
        names.append(f"me{i + 1:04d}")
        path = ckpts.save(checkpoint, names[-1], {"top1": 0.1 * i}, background=True)
        model.w.assign(tf.fill(model.w.shape, -1.0))  # while the file may still be written
        ckpts.wait()
        on_disk = json.loads((tmp_path / "stage" / "checkpoints.json").read_text())
        assert on_disk["latest"] == names[-1] == ckpts.state["latest"]
        a, b = tf.train.load_checkpoint(path), tf.train.load_checkpoint(reference)
        assert sorted(a.get_variable_to_shape_map()) == sorted(b.get_variable_to_shape_map())
        for key in b.get_variable_to_shape_map():
            np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=key)
    # keep=2 and the best (the last): the first two are pruned from the state and the disk
    assert [e["name"] for e in ckpts.entries()] == names[2:]
    assert sorted(n for n in os.listdir(tmp_path / "stage") if n.endswith(".index")) == [
        f"{n}.index" for n in names[2:]]


def test_a_background_save_that_fails_raises_at_the_next_call_and_keeps_the_pointers(
        tmp_path, monkeypatch):
    """A write that fails in the background (a full disk) raises its error at the next call
    that waits for it; the pointers, in memory and on disk, stay at the previous checkpoint
    and no temporary file is left."""
    from adj_quant import checkpoints

    ckpts = RunCheckpoints(str(tmp_path / "stage"))
    checkpoint = tf.train.Checkpoint(model=Tiny(1.0))
    ckpts.save(checkpoint, "me0001", {"top1": 0.1}, background=True)
    ckpts.save(checkpoint, "me0002", {"top1": 0.2}, background=True)
    prepare = checkpoints.CheckpointWriter.prepare

    def full_disk(self, prefix):
        write = prepare(self, prefix)

        def fail():
            write()  # part of the files is there, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")
        return fail

    monkeypatch.setattr(checkpoints.CheckpointWriter, "prepare", full_disk)
    ckpts.save(checkpoint, "me0003", {"top1": 0.3}, background=True)
    assert ckpts.state["latest"] == "me0003"  # until the write is known to have failed
    with pytest.raises(OSError, match="No space left"):
        ckpts.wait()
    assert ckpts.state["latest"] == ckpts.state["best"] == "me0002"
    assert [e["name"] for e in ckpts.entries()] == ["me0001", "me0002"]
    on_disk = json.loads((tmp_path / "stage" / "checkpoints.json").read_text())
    assert on_disk["latest"] == "me0002"
    assert not [n for n in os.listdir(tmp_path / "stage") if n.startswith(".tmp-")]
    assert not [n for n in os.listdir(tmp_path / "stage") if n.startswith("me0003")]
    ckpts.wait()  # the error was raised once


@pytest.mark.parametrize("bad", [None, np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [tf.float32, tf.bfloat16, tf.float64])
def test_all_finite_finds_one_bad_element_among_many_variables(bad, dtype):
    """Oracle: NumPy's isfinite over every element of the floating variables (an integer
    variable is not checked), for plain variables and a mirrored one."""
    from adj_quant.checkpoints import all_finite

    rng = np.random.default_rng(0)
    values = [rng.normal(size=shape).astype(np.float32) for shape in ([3, 3, 4, 8], [8], [])]
    if bad is not None:
        values[0][2, 1, 3, 5] = bad
    plain = [tf.Variable(tf.cast(v, dtype)) for v in values]
    other = [tf.Variable([7, 8]), tf.Variable(np.ones([5], np.float32))]
    expected = all(np.isfinite(v).all() for v in values)
    assert all_finite(other + plain) == expected
    assert all_finite(other) is True
    with tf.distribute.MirroredStrategy(["/cpu:0"]).scope():
        mirrored = tf.Variable(tf.cast(values[0], dtype))
    assert all_finite([other[1], mirrored]) == expected
