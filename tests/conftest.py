"""Shared fixtures: one tiny but really trained digits run, used by several test files."""

import importlib.util
import os
import sys

import pytest

from adj_quant.cli import train as train_cli
from adj_quant.network import Network, Node

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A small EfficientNet (width 0.25, depth 0.25) at 32x32 on the real digits data.
TINY = ["--img_size", "32", "--batch_size", "64", "--width_multiplier", "0.25",
        "--depth_multiplier", "0.25", "--calib_images", "256", "--max_val_images", "360",
        "--metric_img_size", "224", "--no-progress"]


#: A small declared network (stem, depthwise block with a residual add, pooling, FC) for the
#: tests of pruning, learned sparsity and packed files.
TOY_NET = Network("toy", "toy", (
    Node("Conv", "conv", kernel=3, filters=8, stride=2), Node("Conv/swish", "act", fn="swish"),
    Node("block/dws", "dws", kernel=3), Node("block/dws/swish", "act", fn="swish"),
    Node("block/project", "conv", filters=8),
    Node("block/add", "add", inputs=("block/project", "Conv/swish")),
    Node("pool", "gap", keepdims=False), Node("Logits", "fc", filters=10, batch_norm=False)))


def pytest_addoption(parser):
    parser.addoption(
        "--every-keras-application", action="store_true",
        help="run tests/test_keras_applications.py on every keras.applications constructor, "
             "not only on the smallest member of each family")


def train_stage(run_dir, stage, *extra):
    train_cli.main(["--stage", stage, "--run_dir", str(run_dir), *TINY, *extra])


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory):
    """All five stages; pretraining is long enough for a real accuracy (~93%)."""
    run = tmp_path_factory.mktemp("digits_run")
    train_stage(run, "pretrain", "--max_epoch", "6", "--lr", "3e-3", "--lr_fixed",
                "--bn_momentum", "0.9")
    train_stage(run, "calibrate", "--eval_initial_thresholds")
    train_stage(run, "qat8", "--max_epoch", "0.3", "--lr", "1e-4", "--lr_fixed")
    train_stage(run, "adjustable", "--max_epoch", "0.2", "--lr_bits", "0.05", "--metric", "0.05",
                "--warm_up_epoch", "0", "--iter_train_freq", "1")
    train_stage(run, "finetune", "--max_epoch", "0.3", "--swa_delay", "0.1", "--swa_freq", "0.2")
    return run


@pytest.fixture(autouse=True)
def _no_global_seed_leaks():
    """A test that sets TensorFlow's global seed (``keras.utils.set_random_seed``) would
    change the data order of every later in-process run: ``Dataset.shuffle(seed=s)`` draws
    from (global seed, s). Unset it after each test, as in a fresh process."""
    yield
    import tensorflow as tf

    tf.random.set_seed(None)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """Every test that uses the shared trained run is slow (it trains all five stages).

    Under pytest-xdist (``--dist loadgroup``) a file's tests stay together in one worker
    (module fixtures are built once), and every file that uses the shared run goes to the
    same worker, so that the run is trained once. ``tryfirst``: xdist reads the groups in
    its own hook of the same name, which must run after this one (test_suite_setup.py
    checks that it does)."""
    shared = {item.path for item in items
              if {"digits_run", "run_dir"} & set(getattr(item, "fixturenames", ()))}
    for item in items:
        if {"digits_run", "run_dir"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        group = "digits_run" if item.path in shared else item.path.name
        item.add_marker(pytest.mark.xdist_group(group))


def run_main(main, argv):
    """A command's ``main(argv)`` in this process, returned as a finished process would be:
    ``CompletedProcess`` with the exit code and what it printed to stdout and stderr. For
    the tests of a command's output that need no process of its own (a TensorFlow start-up
    each)."""
    import contextlib
    import io
    import subprocess

    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main([str(a) for a in argv]) or 0
        except SystemExit as exit_info:
            code = exit_info.code
    return subprocess.CompletedProcess(argv, code, stdout.getvalue(), stderr.getvalue())


def load_stage_model(stage_dir, which="best"):
    """The model of a stage directory's ``which`` checkpoint (``"best"`` or ``"latest"``),
    rebuilt from its ``model_spec.json``, and the directory's ``checkpoints.json``."""
    from adj_quant.checkpoints import ModelSpec, read_json, restore_model

    state = read_json(os.path.join(stage_dir, "checkpoints.json"))
    spec = ModelSpec.from_json(read_json(os.path.join(stage_dir, "model_spec.json")))
    model = spec.build()
    restore_model(model, os.path.join(stage_dir, state[which]))
    return model, state


def save_small_keras_model(path) -> str:
    """A saved Keras model that traces in seconds, for tests of machinery that any network
    exercises (EfficientNet-B0 takes half a minute per quantized stage): conv-BN-swish,
    depthwise-BN-swish, 1x1 conv-BN, pooling, FC, 10 classes, 32x32 inputs. Every kind of
    quantizer (weights, inputs, swish inputs, biases) and batch norm is in it. Returns the
    ``--model`` value."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(3)
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, padding="same", use_bias=False)(inputs)
    x = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(x))
    x = keras.layers.DepthwiseConv2D(3, padding="same", use_bias=False)(x)
    x = keras.layers.Activation("swish")(keras.layers.BatchNormalization()(x))
    x = keras.layers.Conv2D(24, 1, use_bias=False)(x)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    keras.Model(inputs, keras.layers.Dense(10)(x)).save(path)
    tf.random.set_seed(None)
    return f"keras:{path}"


def build_tool():
    """``tools/build_tfrecords.py`` (a script, not a package module), loaded once."""
    if "build_tfrecords" not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            "build_tfrecords", os.path.join(ROOT, "tools", "build_tfrecords.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    return sys.modules["build_tfrecords"]


def small_run(tmp_path):
    """A run of the small saved Keras model (:func:`save_small_keras_model`) at the TINY
    settings, pretrained briefly and calibrated. Returns ``(run_dir, train, model_flags)``,
    where ``train(stage, *flags)`` runs one more stage in it and ``model_flags`` is the
    ``--model`` flag of the run."""
    run = str(tmp_path / "run")
    small = ["--model", save_small_keras_model(tmp_path / "small.keras")]

    def train(stage, *extra):
        train_cli.main(["--stage", stage, "--run_dir", run, *TINY, *small, *extra])

    train("pretrain", "--max_epoch", "0.2", "--lr", "3e-3", "--lr_fixed")
    train("calibrate")
    return run, train, small


def set_weight_bits_on_a_centred_range(quant, bits) -> None:
    """Give a weight quantizer per-channel ``bits`` on a range centred on 0 and 10 % wider
    than its weights: channels of <= 4 bits then hold codes in [-7, 7] (INT4)."""
    import numpy as np

    half = np.maximum(-quant.init_min.numpy(), quant.init_max.numpy())
    quant.init_min.assign(-half)
    quant.init_max.assign(half)
    quant.range_scale.assign(np.full(quant.channels, 1.1, np.float32))
    quant.bits_scale.assign(np.asarray(bits, np.float32) / 8)


def export_int4_and_int8(model, spec, images, out) -> dict:
    """``model`` exported as ``--quantization adjustable`` twice, into ``out``: ``"int4"``
    (INT4 where the learned levels fit) and ``"int8"`` (every tensor INT8). Each entry has the
    file's ``path`` and ``bytes``, the snapped ``levels``, the exported ``net``, the
    interpreter's ``logits`` and output ``step``, and the TensorFlow graph's logits ``tf``."""
    import tensorflow as tf

    from adj_quant import tflite_export as TE
    from adj_quant import tflite_runner as TR

    result = {}
    for name, int4 in (("int4", True), ("int8", False)):
        net = TE.export_net(model, spec, "adjustable")
        if int4:
            net.int4 = TE.int4_steps(model, net)
            net.out_ranges = TE.output_ranges(net, images)
        data, levels = TE.snap_to_learned_levels(
            TE.convert(TE.inference_module(net, 32), "adjustable", images), model, net)
        path = out / f"{name}.tflite"
        path.write_bytes(data)
        runner = TR.TFLiteRunner(str(path), batch=len(images))
        result[name] = {"path": path, "bytes": data, "levels": levels, "net": net,
                        "logits": runner(images), "step": runner.output["quantization"][0],
                        "tf": net(tf.constant(images)).numpy()}
    return result
