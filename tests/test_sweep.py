"""adjq-sweep: the sweep file is checked key by key, shared stages are trained once, a sweep
resumes, a failing point is recorded and the others go on, and one directory takes one
sweep at a time."""

import csv
import os
import textwrap

import pytest
from conftest import run_main, save_small_keras_model

from adj_quant.cli import sweep as sweep_cli
from adj_quant.directory_lock import DirectoryLock
from adj_quant.recipe import sweep as sweep_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "configs", "digits.toml")


def _write(tmp_path, text, name="s.toml"):
    path = tmp_path / name
    path.write_text(f'base = "{BASE}"\n' + textwrap.dedent(text))
    return str(path)


def _refused(argv, capsys):
    with pytest.raises(SystemExit) as info:
        sweep_cli.main(argv)
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("body, message", [
    ("[flags]\nlearning_rate = 1\n", "unknown flag 'learning_rate'"),
    ("[flags]\n\"qat9.lr\" = 1e-3\n", "'qat9.lr' names no stage 'qat9'"),
    ("[flags]\nweight_bits = \"four\"\n", "weight_bits must be an integer, got 'four' (key "
                                           "'weight_bits')"),
    ("[flags]\nlr_fixed = 1\n", "lr_fixed must be true or false"),
    ("[grid]\nseed = []\n", "seed is an empty list"),
    ("[grid]\nseed = 3\n", "[grid]: seed must be a list"),
    ("[[points]]\nfamily = \"adjq\"\n\"adjustable.metric\" = []\n",
     "adjustable.metric is an empty list"),
    ("[[points]]\nfamily = \"int4\"\n", "family 'int4' is not one of"),
    ("[flags]\nrun_dir = \"x\"\n", "'run_dir' is set by the sweep itself"),
    ("[flags]\nqat8.weight_bits = 9\n", "weight_bits"),
    ("axes = 1\n", "unknown key 'axes'"),
    ("[[points]]\nfamily = \"float\"\n[[points]]\nfamily = \"float\"\n", "the same point as #1"),
])
def test_bad_sweep_files_are_one_line(tmp_path, capsys, body, message):
    line = _refused([_write(tmp_path, body), "--sweep_dir", str(tmp_path / "out")], capsys)
    assert message in line
    assert not (tmp_path / "out").exists()


def test_missing_and_broken_files_are_one_line(tmp_path, capsys):
    assert "not found" in _refused([str(tmp_path / "none.toml")], capsys)
    (tmp_path / "bad.toml").write_text("[flags\n")
    assert "not valid TOML" in _refused([str(tmp_path / "bad.toml")], capsys)
    assert "--jobs 0" in _refused([_write(tmp_path, ""), "--jobs", "0"], capsys)


PARETO = """
[grid]
seed = [0, 1]

[[points]]
family = "float"

[[points]]
family = "ptq_int8"

[[points]]
family = "uniform_qat"
label = "W4A4"
"qat8.weight_bits" = 4
"qat8.act_bits" = 4

[[points]]
family = "uniform_qat"
label = "W8A8"

[[points]]
family = "adjq"
"adjustable.metric" = [0.1, 0.15]
"finetune.metric" = [0.1, 0.15]
"""


def test_points_expand_and_share_their_common_stages(tmp_path):
    sweep = sweep_lib.load_sweep(_write(tmp_path, PARETO))
    # 2 seeds x (float, ptq, 2 uniform, 2 zipped adjq targets)
    assert len(sweep.points) == 12
    by = {(p.family, p.label, p.flags[(None, "seed")]): p for p in sweep.points}
    adjq = [p for p in sweep.points if p.family == "adjq" and p.flags[(None, "seed")] == 0]
    assert [(p.flags[("adjustable", "metric")], p.flags[("finetune", "metric")])
            for p in adjq] == [(0.1, 0.1), (0.15, 0.15)]
    seed0 = [p for p in sweep.points if p.flags[(None, "seed")] == 0]
    # Every point of one seed shares its pretrain; all but float/PTQ share calibrate.
    assert len({p.stage_keys["pretrain"] for p in seed0}) == 1
    assert len({p.stage_keys["calibrate"] for p in seed0 if "calibrate" in p.stage_keys}) == 1
    # 8-bit uniform QAT is the recipe's qat8: the adjq points reuse it; W4A4 is another.
    w8, w4 = by[("uniform_qat", "W8A8", 0)], by[("uniform_qat", "W4A4", 0)]
    assert w8.stage_keys["qat8"] == adjq[0].stage_keys["qat8"] != w4.stage_keys["qat8"]
    # The two targets differ from the adjustable stage on, and so does everything downstream.
    assert adjq[0].stage_keys["adjustable"] != adjq[1].stage_keys["adjustable"]
    assert adjq[0].stage_keys["finetune"] != adjq[1].stage_keys["finetune"]
    # Another seed trains everything again.
    assert by[("float", "", 1)].stage_keys["pretrain"] != by[("float", "", 0)].stage_keys[
        "pretrain"]
    # A flag of a stage the family does not run changes nothing of it.
    assert ("qat8", "weight_bits") not in by[("float", "", 0)].flags
    assert len({p.name for p in sweep.points}) == 12


def test_dry_run_lists_what_each_point_trains_and_reuses(tmp_path, capsys):
    sweep_cli.main([_write(tmp_path, PARETO), "--sweep_dir", str(tmp_path / "out"),
                    "--dry_run"])
    out = capsys.readouterr().out.splitlines()
    assert out[-1].startswith("12 points; 16 stage runs to train, 36 without reuse")
    assert sum("pretrain trains" in line for line in out) == 2  # one per seed
    assert any(line.startswith("ptq_int8") and "pretrain reused from float" in line
               for line in out)
    assert not (tmp_path / "out").exists()


def test_a_second_sweep_on_the_same_directory_is_refused(tmp_path, capsys):
    path = _write(tmp_path, '[[points]]\nfamily = "float"\n')
    out = tmp_path / "out"
    with DirectoryLock(str(out), "sweep directory"):
        line = _refused([path, "--sweep_dir", str(out)], capsys)
    assert "sweep directory" in line and str(os.getpid()) in line


TINY = """
[flags]
model = "{model}"
img_size = 32
batch_size = 64
calib_images = 128
max_val_images = 360
"pretrain.max_epoch" = 2
"pretrain.lr" = 3e-3
"pretrain.lr_fixed" = true
"qat8.max_epoch" = 0.1

[[points]]
family = "float"

[[points]]
family = "ptq_dynamic"

[[points]]
family = "uniform_qat"
label = "W4A4"
"qat8.weight_bits" = 4
"qat8.act_bits" = 4
"qat8.swish_bits" = 0

[[points]]
family = "float"
label = "no data"
dataset = "/nonexistent/imagenet"
"""


def _sweep(path, out, *extra):
    """``adjq-sweep`` in this process: its main process only schedules, and each point
    still trains in a process of its own."""
    return run_main(sweep_cli.main, [path, "--sweep_dir", out, *extra])


@pytest.mark.slow
def test_a_tiny_sweep_runs_resumes_and_records_a_failure(tmp_path):
    model = save_small_keras_model(tmp_path / "small.keras")
    path, out = _write(tmp_path, TINY.replace("{model}", model)), tmp_path / "out"
    done = _sweep(path, out)
    assert done.returncode == 1, done.stderr[-3000:]  # one point failed
    assert "3 of 4 points done, 1 not" in done.stdout
    rows = {r["label"] or r["family"]: r for r in csv.DictReader(open(out / "sweep.csv"))}
    failed = rows["no data"]
    assert failed["status"] == "failed" and "/nonexistent/imagenet" in failed["error"]
    assert "\n" not in failed["error"] and "Traceback" not in failed["error"]
    for key in ("float", "ptq_dynamic", "W4A4"):
        assert rows[key]["status"] == "done", rows[key]
    # Counted by the recipe's own code: float is 32 bits, 4-bit QAT is 4/4.
    assert float(rows["float"]["avg_weight_bits"]) == 32.0
    assert float(rows["W4A4"]["avg_weight_bits"]) == pytest.approx(4.0)
    assert float(rows["ptq_dynamic"]["avg_weight_bits"]) == pytest.approx(8.0)
    # 8-bit weights: fewer parameter bits than float, even after float's 16-bit freebie
    # (which halves a float model's params and multiplies, so its score is the lower one).
    assert float(rows["ptq_dynamic"]["params"]) < float(rows["float"]["params"])
    assert float(rows["float"]["top1"]) > 0.15  # trained: chance is 0.10
    # The float point trained pretrain; the others reused it.
    assert rows["float"]["reused"] == ""
    assert rows["ptq_dynamic"]["reused"] == "pretrain"
    assert rows["W4A4"]["reused"] == "pretrain"
    trained = [s for s in os.listdir(out / "stages")
               if (out / "stages" / s / "result.json").exists()]
    assert sorted(s.split("-")[0] for s in trained) == ["calibrate", "pretrain", "qat8"]
    # The float point's stage is a link into the shared store.
    assert os.path.realpath(out / "points" / rows["W4A4"]["point"] / "pretrain") == \
        os.path.realpath(out / "points" / rows["float"]["point"] / "pretrain")
    assert (out / "tensorboard").is_dir() and len(os.listdir(out / "tensorboard")) >= 3
    # The evaluation agrees with eval.py run by hand on the same checkpoint.
    from adj_quant.cli import evaluate

    args = evaluate.parse(["--ckpt_path", str(out / "points" / rows["W4A4"]["point"] / "qat8"),
                           "--config", BASE, "--no-progress", "--max_val_images", "360",
                           "--output", str(tmp_path / "qi.json")])
    again = evaluate.evaluate_checkpoint(args)
    assert again["top1"] == pytest.approx(float(rows["W4A4"]["top1"]))
    assert again["score_micronet"] == pytest.approx(float(rows["W4A4"]["score_micronet"]))

    # Rerun: finished points are skipped (nothing trains), the failed one is tried again.
    before = {p: (out / "points" / p / "point.json").stat().st_mtime_ns
              for p in os.listdir(out / "points")}
    again = _sweep(path, out, "--dry_run")
    assert "(finished)" in again.stdout
    done = _sweep(path, out)
    assert done.returncode == 1
    after = {p: (out / "points" / p / "point.json").stat().st_mtime_ns for p in before}
    changed = [p for p in before if before[p] != after[p]]
    assert changed == [failed["point"]]
