"""The trainer's guards: no non-finite checkpoint, divergence and collapse stop the run,
a damaged latest checkpoint is skipped on resume, a full disk and a held stage are one
line, logs off a terminal are plain lines, and a single stage finds its teacher."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from conftest import TINY

from adj_quant import checkpoints, training_rules
from adj_quant.checkpoints import RunCheckpoints, read_json
from adj_quant.cli import train as train_cli
from adj_quant.directory_lock import LOCK_FILE
from adj_quant.recipe.trainer import collapsed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ".data-00000-of-00001"


def _train(capsys, *argv):
    """``train.py`` in-process: (exit code, stdout, stderr)."""
    try:
        train_cli.main([*TINY, *argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def _one_error(err):
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _values(prefix):
    reader = tf.train.load_checkpoint(prefix)
    return {k: reader.get_tensor(k) for k in reader.get_variable_to_shape_map()
            if k.startswith("model/")}


def test_collapse_is_chance_level_after_being_above_it():
    # Hand-made top-1 histories, 10 classes: chance level is at most 15%.
    assert collapsed([0.5, 0.1, 0.1, 0.1], 10, 3)
    assert not collapsed([0.5, 0.1, 0.2, 0.1], 10, 3)       # one mini-epoch above chance
    assert not collapsed([0.1, 0.1, 0.1, 0.1, 0.1], 10, 3)  # never above chance: still learning
    assert not collapsed([0.5, 0.1, 0.1], 10, 3)            # not yet 3 mini-epochs at chance
    assert not collapsed([0.5, 0.1, 0.1, 0.1], 10, 0)       # 0 turns the check off


@pytest.mark.slow
def test_weights_that_become_nan_are_never_saved(tmp_path, capsys, monkeypatch):
    # One step per mini-epoch, and an update that turns the weights NaN while the loss it
    # was computed from is finite (the issue's `--lr nan`, which the flags now refuse).
    monkeypatch.setattr(training_rules, "step_learning_rates",
                        lambda step, **kw: (float("nan"), float("nan")) if step >= 1 else (
                            kw["lr"], kw["lr_bits"]))
    run = tmp_path / "nan"
    code, out, err = _train(capsys, "--stage", "pretrain", "--run_dir", str(run),
                            "--batch_size", "143", "--max_epoch", "0.3", "--lr_fixed")
    assert code == 2
    line = _one_error(err)
    assert "the weights became NaN or Inf in mini-epoch 2" in line
    state = read_json(run / "pretrain" / "checkpoints.json")
    assert [e["mini_epoch"] for e in state["checkpoints"]] == [1]
    assert state["latest"] == state["best"] == state["checkpoints"][0]["name"]
    assert f"last good checkpoint is {run / 'pretrain' / state['latest']}" in line
    for name, value in _values(str(run / "pretrain" / state["latest"])).items():
        assert np.all(np.isfinite(value)), name


@pytest.mark.slow
def test_a_loss_above_max_loss_stops_the_run(tmp_path, capsys):
    code, _, err = _train(capsys, "--stage", "pretrain", "--run_dir", str(tmp_path),
                          "--max_epoch", "0.2", "--max_loss", "0.5")
    assert code == 2
    line = _one_error(err)
    assert "above the divergence bound 0.5" in line and "last good checkpoint is none" in line


@pytest.mark.slow
def _check_time_lines(out: str) -> None:
    """The stage's time report: the loop's parts (other included) add up to its total, every
    part is >= 0, the stage (which also builds the model) takes at least the loop."""
    loop = next(line for line in out.splitlines() if "training loop time" in line)
    total, parts = loop.split("training loop time ")[1].split(" s: ")
    seconds = {name: float(value) for name, value in
               (part.rsplit(" ", 1) for part in parts.split(", "))}
    assert set(seconds) == {"tracing", "first calls", "steps", "data", "epoch data",
                            "validation", "checkpoints", "summaries", "other"}
    assert all(value >= 0 for value in seconds.values())
    assert seconds["tracing"] > 0 and seconds["first calls"] > 0 and seconds["steps"] > 0
    assert abs(sum(seconds.values()) - float(total.replace(",", ""))) <= 0.5 + 0.05 * len(seconds)
    stage = next(line for line in out.splitlines() if "[pretrain] stage time" in line)
    assert float(stage.split("stage time ")[1].split(" s")[0].replace(",", "")) >= float(
        total.replace(",", "")) - 0.5


def test_resume_skips_a_damaged_latest_checkpoint_and_matches_an_uninterrupted_run(
        tmp_path, capsys):
    args = ["--stage", "pretrain", "--max_epoch", "0.3"]
    code, out, _ = _train(capsys, *args, "--run_dir", str(tmp_path / "ref"))
    assert code == 0
    _check_time_lines(out)
    ref = tmp_path / "ref" / "pretrain"
    # The same run, interrupted after its third checkpoint was written damaged.
    run = tmp_path / "run"
    shutil.copytree(tmp_path / "ref", run)
    os.remove(run / "pretrain" / "result.json")
    state = read_json(run / "pretrain" / "checkpoints.json")
    (run / "pretrain" / "checkpoints.json").write_text(json.dumps(dict(state, finished=False)))
    damaged = run / "pretrain" / state["latest"]
    with open(str(damaged) + DATA, "r+b") as f:
        f.truncate(1000)
    # Off a terminal (a pipe), with progress bars not turned off: plain lines only.
    flags = [a for a in TINY if a != "--no-progress"]
    proc = subprocess.run([sys.executable, "train.py", *flags, *args, "--run_dir", str(run)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert f"{damaged} is corrupt (" in proc.stderr and "resuming from" in proc.stderr
    assert "\r" not in proc.stdout + proc.stderr
    assert "[pretrain] mini-epoch 3/3" in proc.stdout
    a, b = _values(str(ref / state["latest"])), _values(str(damaged))
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["at the call", "in the background"])
def test_a_full_disk_is_one_line_naming_the_last_intact_checkpoint(tmp_path, capsys,
                                                                   monkeypatch, where):
    """The second checkpoint finds the disk full: when ``save`` is called, or while its files
    are written in the background (the error then comes at the next save)."""
    original = RunCheckpoints.save
    prepare = checkpoints.CheckpointWriter.prepare

    def save(self, checkpoint, name, info, best_key=None, background=False):
        if self.entries():  # the second save finds the disk full
            os.makedirs(os.path.join(self.directory, f".tmp-{name}_temp"))
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, checkpoint, name, info, best_key, background)

    def prepare_on_a_full_disk(self, prefix):
        first = self._plan is None  # the first checkpoint, written by prepare itself
        write = prepare(self, prefix)
        if first:
            return write

        def fail():
            raise OSError(errno.ENOSPC, "No space left on device")
        return fail

    if where == "at the call":
        monkeypatch.setattr(RunCheckpoints, "save", save)
    else:
        monkeypatch.setattr(checkpoints.CheckpointWriter, "prepare", prepare_on_a_full_disk)
    run = tmp_path / "run"
    code, _, err = _train(capsys, "--stage", "pretrain", "--run_dir", str(run),
                          "--max_epoch", "0.3")
    assert code == 2
    first = read_json(run / "pretrain" / "checkpoints.json")["latest"]
    line = _one_error(err)
    assert line.startswith("error: [pretrain] no space left on device while writing")
    assert f"last intact checkpoint is {run / 'pretrain' / first}" in line
    assert first.startswith("me0001")
    # The next start (disk freed) removes the orphaned folder and resumes.
    monkeypatch.setattr(RunCheckpoints, "save", original)
    monkeypatch.setattr(checkpoints.CheckpointWriter, "prepare", prepare)
    code, out, _ = _train(capsys, "--stage", "pretrain", "--run_dir", str(run),
                          "--max_epoch", "0.3")
    assert code == 0 and "resuming from" in out
    assert not [n for n in os.listdir(run / "pretrain") if n.startswith(".tmp-")]


def test_a_stage_held_by_a_live_process_is_refused(tmp_path, capsys):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        stage = tmp_path / "pretrain"
        stage.mkdir()
        (stage / LOCK_FILE).write_text(json.dumps({"pid": sleeper.pid,
                                                   "host": socket.gethostname()}))
        code, _, err = _train(capsys, "--stage", "pretrain", "--run_dir", str(tmp_path))
        assert code == 2
        assert f"is in use by process {sleeper.pid}" in _one_error(err)
        assert os.listdir(stage) == [LOCK_FILE]
    finally:
        sleeper.kill()
        sleeper.wait()


# The documented single-stage command with --ckpt_path into another run (the teacher comes
# from that run) is run by tests/test_documented_commands.py.
def test_a_single_stage_without_a_teacher_names_teacher_ckpt(tmp_path, capsys):
    code, _, err = _train(capsys, "--stage", "qat8", "--run_dir", str(tmp_path / "new"))
    assert code == 2
    assert "--teacher_ckpt" in _one_error(err)
    assert not (tmp_path / "new" / "qat8").exists()


def test_fast_checkpoint_writes_equal_eager_ones(tmp_path, capsys, monkeypatch):
    """A stage writes its first checkpoint with ``tf.train.Checkpoint.write`` and the later
    ones with one ``SaveV2`` (``checkpoints.CheckpointWriter``): each mini-epoch's file holds
    exactly what ``write`` writes in a run that writes them all with it (every variable,
    optimizer slots included)."""
    from adj_quant import checkpoints as checkpoints_lib

    args = ["--stage", "pretrain", "--max_epoch", "0.3"]
    monkeypatch.setattr(checkpoints_lib, "variables_by_key", lambda *a: None)  # write only
    code, _, _ = _train(capsys, *args, "--run_dir", str(tmp_path / "eager"))
    assert code == 0
    monkeypatch.undo()
    code, _, _ = _train(capsys, *args, "--run_dir", str(tmp_path / "fast"))
    assert code == 0
    eager = read_json(tmp_path / "eager" / "pretrain" / "checkpoints.json")
    fast = read_json(tmp_path / "fast" / "pretrain" / "checkpoints.json")
    names = [e["name"] for e in eager["checkpoints"]]
    assert names == [e["name"] for e in fast["checkpoints"]] and len(names) == 3
    for name in names:
        a = tf.train.load_checkpoint(str(tmp_path / "eager" / "pretrain" / name))
        b = tf.train.load_checkpoint(str(tmp_path / "fast" / "pretrain" / name))
        keys = sorted(a.get_variable_to_shape_map())
        assert keys == sorted(b.get_variable_to_shape_map())
        assert any("/m/" in k or "adam" in k for k in keys)
        for key in keys:
            np.testing.assert_array_equal(a.get_tensor(key), b.get_tensor(key), err_msg=key)


def test_the_evaluation_step_is_traced_once_for_every_batch_size():
    """The validation's last batch is smaller than the others; the evaluation step must
    not be traced again for it (each trace of a quantized network costs seconds), and the
    padding it gets must not count. Oracle: the hits counted in plain NumPy from the
    model's logits."""
    from conftest import TOY_NET

    from adj_quant.network import FloatNetwork
    from adj_quant.recipe import validation

    model = FloatNetwork(TOY_NET, seed=0)
    traces = []
    call = model.__call__

    class Counted:
        def __call__(self, images, training=False):
            traces.append(images.shape.as_list())
            return call(images, training=training)

    step = validation.make_eval_step(Counted())
    rng = np.random.default_rng(0)
    for n in (8, 3, 8):
        images = rng.uniform(0, 1, (n, 16, 16, 3)).astype(np.float32)
        labels = rng.integers(0, 10, n)
        top1, top5 = step(tf.constant(images), tf.constant(labels))
        logits = model(tf.constant(images)).numpy()
        assert int(top1) == int((logits.argmax(axis=1) == labels).sum())
        ranks = (logits > logits[np.arange(n), labels][:, None]).sum(axis=1)
        assert int(top5) == int((ranks < 5).sum())
    assert traces == [[8, 16, 16, 3]]


def _adam_first_step(var, grad, lr, epsilon=training_rules.ADAM_EPSILON):
    """TF1 Adam's first update from zero slots, by hand: m = 0.1 g, v = 0.001 g^2 and
    ``var - lr sqrt(1 - 0.999) / (1 - 0.9) m / (sqrt(v) + epsilon)``."""
    m, v = 0.1 * grad, 0.001 * grad * grad
    return var - lr * np.sqrt(1 - 0.999) / (1 - 0.9) * m / (np.sqrt(v) + epsilon)


def test_one_step_function_trains_the_weights_alone_or_the_bits_too(tmp_path):
    """A stage that alternates (``--iter_train``) runs one traced step function for both
    kinds of mini-epoch. With ``train_bits`` false the bits and their optimizer are left
    exactly as they were; either way every trained variable takes the Adam step of its
    gradient. Oracle: the gradients of the same loss by a plain ``tf.GradientTape``, and
    the first Adam update worked out in NumPy."""
    from conftest import TOY_NET

    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
    from adj_quant.recipe.config import resolve
    from adj_quant.recipe.trainer import Trainer

    options = resolve({"img_size": 16, "batch_size": 8, "bits_trainable": True,
                       "iter_train": True, "progress": False}, "adjustable")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32))
    labels = tf.constant(rng.integers(0, 10, 8))
    lr, lr_bits = 1e-3, 1e-2
    for train_bits in (False, True):
        teacher = FloatNetwork(TOY_NET, seed=0)
        model = QuantizedNetwork.from_float(FloatNetwork(TOY_NET, seed=1),
                                            QuantConfig(bits_trainable=True))
        trainer = Trainer(model, options, str(tmp_path / str(train_bits)), teacher=teacher)
        with tf.GradientTape() as tape:
            loss = trainer._loss(images, labels, training=True)["loss"]
        variables = trainer.weight_vars + trainer.bits_vars
        grads = [g.numpy() for g in tape.gradient(loss, variables)]
        before = [v.numpy() for v in variables]
        step = trainer.train_step()
        for bits_step in (train_bits, not train_bits):  # one trace serves both kinds
            step.get_concrete_function(images, labels, tf.constant(lr), tf.constant(lr_bits),
                                       tf.constant(bits_step))
        assert step.experimental_get_tracing_count() == 1
        step(images, labels, tf.constant(lr), tf.constant(lr_bits), tf.constant(train_bits))
        n = len(trainer.weight_vars)
        for i, (var, value, grad) in enumerate(zip(variables, before, grads)):
            if i >= n and not train_bits:
                np.testing.assert_array_equal(var.numpy(), value, err_msg=var.name)
            else:
                expected = _adam_first_step(value, grad, lr if i < n else lr_bits)
                np.testing.assert_allclose(var.numpy(), expected, rtol=1e-5, atol=1e-7,
                                           err_msg=var.name)
        assert int(trainer.bits_opt.iterations.numpy()) == int(train_bits)
        assert int(trainer.opt.iterations.numpy()) == 1
        assert any(np.any(g != 0) for g in grads[n:])  # the bits had a gradient to take


@pytest.mark.parametrize("stage", ["qat8", "finetune", "adjustable"])
def test_a_metric_no_step_changes_is_counted_once_with_the_same_step(tmp_path, stage):
    """Where no step changes the bits (qat8's fixed bits, finetune's frozen ones) the metric
    term is counted once and enters the traced step as a value; where the bits train it
    stays in the step. Oracles: the same step of a twin trainer that counts the metric in
    the step (the loss parts and every variable after it equal bit for bit), and the
    MicroNet score counted eagerly (``micronet_cost``); the step's graph then holds none of
    the count's float64 ops."""
    from conftest import TOY_NET

    from adj_quant import cost as cost_lib
    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
    from adj_quant.recipe.config import resolve
    from adj_quant.recipe.trainer import Trainer

    options = resolve({"img_size": 16, "batch_size": 8, "progress": False,
                       "finetune": stage == "finetune"}, stage)
    rng = np.random.default_rng(0)
    args = (tf.constant(rng.uniform(0, 1, (8, 16, 16, 3)).astype(np.float32)),
            tf.constant(rng.integers(0, 10, 8)), tf.constant(1e-3), tf.constant(1e-2),
            tf.constant(False))
    results = []
    for fixed in (True, False):
        model = QuantizedNetwork.from_float(FloatNetwork(TOY_NET, seed=1),
                                            QuantConfig(bits_trainable=stage != "qat8"))
        trainer = Trainer(model, options, str(tmp_path / str(fixed)),
                          teacher=FloatNetwork(TOY_NET, seed=0))
        assert trainer._metric_is_fixed() == (stage != "adjustable")
        if not fixed:
            trainer._metric_is_fixed = lambda: False
        step = trainer.train_step()
        graph = step.get_concrete_function(*args).graph
        float64_ops = [op for op in graph.get_operations()
                       if any(t.dtype == tf.float64 for t in op.outputs)]
        parts = {k: v.numpy() for k, v in step(*args).items()}
        results.append((parts, [v.numpy() for v in model.variables], len(float64_ops)))
        score = cost_lib.micronet_cost(model, trainer.metric_img_size,
                                       style=options.metric_style).score
        assert parts["metric"] == np.float32(score.numpy())
    (parts, values, f64), (parts_in_step, values_in_step, f64_in_step) = results
    assert parts.keys() == parts_in_step.keys()
    for key in parts:
        np.testing.assert_array_equal(parts[key], parts_in_step[key], err_msg=key)
    for a, b in zip(values, values_in_step):
        np.testing.assert_array_equal(a, b)
    assert f64_in_step > 100
    assert f64 == (f64_in_step if stage == "adjustable" else 0)


@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
def test_a_quantized_evaluation_quantizes_the_weights_once_per_pass_with_the_same_hits(pruned):
    """Validation of a quantized network quantizes its weights at the first batch of a pass
    and reuses them (``QuantizedEvalStep``). Oracles: the logits equal the ordinary forward,
    which quantizes the weights itself, bit for bit; the hits equal those counted in NumPy
    from those logits; a pass after the weights changed uses the new weights."""
    from conftest import TOY_NET

    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
    from adj_quant.recipe import validation

    model = QuantizedNetwork.from_float(FloatNetwork(TOY_NET, seed=0),
                                        QuantConfig(bits_trainable=True, pruned=pruned))
    rng = np.random.default_rng(0)
    batches = [(tf.constant(rng.uniform(0, 1, (n, 16, 16, 3)), tf.float32),
                tf.constant(rng.integers(0, 10, n))) for n in (8, 8, 3)]
    model.calibrate_activations([b[0] for b in batches], progress=False)
    if pruned:  # half of each prunable layer's weights, and a whole output channel
        for layer in model.layers.values():
            if layer.mask is not None and layer.prunable:
                mask = (rng.uniform(size=layer.mask.shape) < 0.5).astype(np.float32)
                mask[..., 0] = 0.0
                layer.mask.assign(mask)
    step = validation.make_eval_step(model)
    assert isinstance(step, validation.QuantizedEvalStep)
    computed = []
    quantized_parameters = step._parameters
    step._parameters = lambda size: computed.append(size) or quantized_parameters(size)
    forward = tf.function(lambda images: model(images), autograph=False)

    def expected_hits():
        top1 = top5 = 0
        for images, labels in batches:
            logits, labels = forward(images).numpy(), labels.numpy()
            top1 += int((logits.argmax(axis=1) == labels).sum())
            ranks = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(axis=1)
            top5 += int((ranks < 5).sum())
        return top1, top5

    for change in range(2):
        with step.one_pass():
            hits = [step(images, labels) for images, labels in batches]
            parameters = step._fixed[1]
        assert computed == [16] * (change + 1)  # once per pass
        assert tuple(sum(int(h[i]) for h in hits) for i in (0, 1)) == expected_hits()
        for images, _ in batches:
            np.testing.assert_array_equal(
                model(images, parameters=parameters).numpy(), forward(images).numpy())
        for layer in model.layers.values():  # new weights for the second pass
            layer.weights.assign(layer.weights * 0.5 + 0.01)
    top1 = validation.accuracy(model, tf.data.Dataset.from_tensor_slices(
        (tf.concat([b[0] for b in batches], 0), tf.concat([b[1] for b in batches], 0))).batch(8),
        progress=False, step=step)["top1"]
    assert top1 == expected_hits()[0] / 19 and computed == [16] * 3


def test_the_bits_read_in_one_call_give_the_bit_assignment_and_histograms_of_the_model():
    """The reports read a quantized model's bits in one traced call (``bits_reader``).
    Oracle: ``bit_assignment()`` and the histograms read quantizer by quantizer, eagerly."""
    from conftest import TOY_NET

    from adj_quant.network import FloatNetwork
    from adj_quant.qnetwork import QuantConfig, QuantizedNetwork
    from adj_quant.recipe import validation

    model = QuantizedNetwork.from_float(FloatNetwork(TOY_NET, seed=0),
                                        QuantConfig(bits_trainable=True, pruned=True))
    rng = np.random.default_rng(1)
    for quant in model.quantizers().values():
        for var in quant.bits_variables():
            var.assign(rng.uniform(0.2, 1.1, var.shape))
    read = model.bits_reader()
    for _ in range(2):
        values = read()
        assert model.assignment_of(values).fingerprint() == model.bit_assignment().fingerprint()
        ours, eager = validation.bits_histograms(model, values), validation.bits_histograms(model)
        assert ours.keys() == eager.keys() == {"bits/weights", "bits/activations"}
        for key in eager:
            np.testing.assert_array_equal(ours[key], eager[key])
        assert len(np.unique(eager["bits/weights"])) > 2
        for var in model.bits_variables():  # the next read sees new bits
            var.assign(var * 0.7)
