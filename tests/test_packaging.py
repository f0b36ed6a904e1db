"""The package as a user installs it: non-editable, used from outside the checkout."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_non_editable_install_works_outside_the_checkout(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--target", str(target), str(ROOT)], check=True, capture_output=True)
    # No top-level modules named after the checkout's scripts; configs are package data.
    for name in ("train.py", "eval.py", "quantizer.py"):
        assert not (target / name).exists(), name
    assert (target / "adj_quant" / "configs" / "digits.toml").is_file()
    env = dict(os.environ, PYTHONPATH=str(target))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run(
        [sys.executable, "-c", "import adj_quant, adj_quant.recipe.config as c; "
                               "print(adj_quant.__file__); print(c.DEFAULT_CONFIG)"],
        cwd=outside, env=env, capture_output=True, text=True, check=True).stdout.split()
    assert where[0].startswith(str(target)) and Path(where[1]).is_file()
    assert where[1].startswith(str(target))
    proc = subprocess.run([str(target / "bin" / "adjq-score"), "--weight_bits", "4",
                           "--act_bits", "4", "--json"],
                          cwd=outside, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["params"] == 842_997  # worked out by hand in test_cost.py
    for script in ("adjq-train", "adjq-eval", "adjq-export", "adjq-quantize-checkpoint",
                   "adjq-convert", "adjq-sweep", "adjq-pareto"):
        help_run = subprocess.run([str(target / "bin" / script), "--help"], cwd=outside,
                                  env=env, capture_output=True, text=True)
        assert help_run.returncode == 0 and "usage:" in help_run.stdout, (script, help_run.stderr)
    # The shipped sweep is package data too, and plans from there (its base is ../digits.toml).
    sweep_file = target / "adj_quant" / "configs" / "sweeps" / "digits_pareto.toml"
    dry = subprocess.run([str(target / "bin" / "adjq-sweep"), str(sweep_file), "--dry_run"],
                         cwd=outside, env=env, capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1].startswith("15 points; 18 stage runs to train")
