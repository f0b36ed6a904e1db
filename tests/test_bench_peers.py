"""bench/peers.py: flags, the summary arithmetic, and the adjq-only run without the peers.

The peers (tf-keras, tensorflow-model-optimization) are not needed: the run hides them by
putting None into ``sys.modules``, which makes their import fail as if they were missing.
"""

import importlib.util
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "peers.py")
HIDE_PEERS = ("import runpy, sys\n"
              "sys.modules['tf_keras'] = None\n"
              "sys.modules['tensorflow_model_optimization'] = None\n"
              "sys.argv = [sys.argv[1]] + sys.argv[2:]\n"
              "runpy.run_path(sys.argv[0], run_name='__main__')\n")


def peers_module():
    """The script as a module; importing it imports no TensorFlow."""
    spec = importlib.util.spec_from_file_location("bench_peers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(*args, hide_peers=False):
    cmd = [sys.executable, "-c", HIDE_PEERS, SCRIPT] if hide_peers else [sys.executable, SCRIPT]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(cmd + list(args), capture_output=True, text=True, env=env, cwd=ROOT)


@pytest.mark.parametrize("flags, message", [
    (["--models", "adjq_float,resnet"], "--models 'adjq_float,resnet': choose from"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--warmup", "0"], "--warmup must be at least 1"),
    (["--img_size", "16"], "--img_size must be at least 32"),
    (["--batch_size", "two"], "argument --batch_size: invalid int value"),
])
def test_bad_flags_are_one_line_errors(flags, message):
    proc = run_script(*flags)
    assert proc.returncode == 2
    assert proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("peers.py: error: ") and message in last, proc.stderr
    assert "Traceback" not in proc.stderr


def test_help_describes_every_flag():
    proc = run_script("--help")
    assert proc.returncode == 0
    for flag in ("--img_size", "--batch_size", "--rounds", "--warmup", "--num_classes",
                 "--models", "--infer_batch_size", "--skip_rss", "--jit_compile", "--json",
                 "--seed"):
        assert flag in proc.stdout, flag
    assert "_rss_child" not in proc.stdout
    assert "one process" in proc.stdout  # the arrangement is documented


def test_ratios_are_medians_of_per_round_ratios():
    peers = peers_module()
    a = SimpleNamespace(error=None, train_ms=[200.0, 300.0, None, 100.0])
    b = SimpleNamespace(error=None, train_ms=[100.0, 100.0, 100.0, 100.0])
    got = peers.ratio({"a": a, "b": b}, "a", "b")
    assert got["median"] == 2.0 and got["min"] == 1.0 and got["max"] == 3.0 and got["n"] == 3
    assert got["of_medians"] == 2.0
    assert peers.ratio({"a": a}, "a", "b") is None
    assert peers.ratio({"a": a, "b": SimpleNamespace(error="boom", train_ms=[])}, "a", "b") is None


def test_other_load_subtracts_own_cpu_time():
    peers = peers_module()
    # 2 s wall; the machine was busy 3 CPU-seconds, 1.8 of them ours: others used 0.6 CPUs.
    got = peers.other_load((10.0, 100.0, 0.0, 5.0), (12.0, 103.0, 0.2, 6.8))
    assert got == {"other_cpus": 0.6, "own_cpus": 0.9, "steal_cpus": 0.1}
    assert peers.other_load((10.0, None, None, 5.0), (12.0, None, None, 6.0))["other_cpus"] is None


@pytest.mark.slow  # tracing the quantized EfficientNet-B0 takes about 1.5 minutes on 2 cores
def test_adjq_only_run_without_the_peers():
    proc = run_script("--img_size", "32", "--batch_size", "2", "--warmup", "1", "--rounds", "2",
                      "--num_classes", "10", "--infer_batch_size", "2", "--skip_rss", "--json",
                      hide_peers=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    missing = [line for line in proc.stderr.splitlines() if "are not installed" in line]
    assert missing == [
        "bench/peers.py: the peers (Keras's float EfficientNetB0 via tf-keras, tfmot QAT) are "
        "not installed; install them with pip install -e \".[bench]\" — running the adjq part "
        "only"]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["quant_vs_float"] > 0
    assert report["ratios"]["quant_vs_float"]["min"] <= report["quant_vs_float"] \
        <= report["ratios"]["quant_vs_float"]["max"]
    for key in ("float_vs_keras", "quant_vs_tfmot", "tfmot_vs_keras", "first_step_keras_s",
                "first_step_tfmot_s", "peak_rss_quant_vs_float", "peak_rss_tfmot_vs_keras"):
        assert key in report and report[key] is None, key
    assert report["first_step_quant_s"] > report["models"]["adjq_quant"]["build_s"] > 0
    assert report["first_step_float_s"] > 0
    assert report["peers_available"] is False
    assert set(report["models"]) == {"adjq_float", "adjq_quant"}
    for model in ("adjq_float", "adjq_quant"):
        assert report["infer_img_per_s"][model] > 0
        assert len(report["models"][model]["train_ms_per_round"]) == 2
    assert report["settings"]["img_size"] == 32 and report["settings"]["batch_size"] == 2
    assert report["load"]["load_avg_start"] is not None and "train" in report["load"]
    assert report["machine"]["tensorflow"]
    assert "peers not installed" in proc.stdout  # the table says so too
