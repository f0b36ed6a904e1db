"""adjq-pareto: reading a sweep.csv, the Pareto front, the two-panel PNG and the CLI errors.

Fast: no model, no TensorFlow in adj_quant.pareto (checked in a subprocess below)."""

import csv
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from adj_quant.cli import pareto as pareto_cli
from adj_quant.recipe import pareto

COLUMNS = ["point", "family", "label", "seed", "top1", "top5", "avg_weight_bits",
           "avg_act_bits", "score_micronet", "score_adjq", "params", "ops", "wall_s",
           "status", "error"]


def write_csv(path, rows, columns=COLUMNS):
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({"status": "done", **row})
    return path


def row(point, family, label, seed, top1, mn, aq, w="", a="", **extra):
    return {"point": point, "family": family, "label": label, "seed": seed, "top1": top1,
            "top5": "", "avg_weight_bits": w, "avg_act_bits": a, "score_micronet": mn,
            "score_adjq": aq, "params": 1000, "ops": 5000, "wall_s": 12.5, "error": "",
            **extra}


SWEEP = [
    row("float", "float", "", 0, 0.96, 1.1, 1.3, 32, 32),
    row("int8", "ptq_int8", "W8A8", 0, 0.955, 0.4, 0.5, 8, 8),
    row("qat4_s0", "uniform_qat", "W4A4", 0, 0.93, 0.22, 0.26, 4, 4),
    row("qat4_s1", "uniform_qat", "W4A4", 1, 0.91, 0.22, 0.26, 4, 4),
    row("lsq3", "lsq", "W3A3", 0, 0.90, 0.17, 0.20, 3, 3),
    row("adjq_s0", "adjq", "metric 0.15", 0, 0.945, 0.18, 0.17, 2.4, 5.6),
    row("adjq_s1", "adjq", "metric 0.15", 1, 0.935, 0.19, 0.18, 2.5, 5.5),
    row("other", "some_new_family", "", 0, 0.8, 0.3, 0.3, 3.3, 6),
    row("oom", "adjq", "metric 0.5", 0, "", "", "", status="failed", error="OOM"),
]


# ----------------------------------------------------------------------------- the front

def brute_force_front(points, x_key, y_key):
    def dominates(q, p):
        return (q[x_key] <= p[x_key] and q[y_key] >= p[y_key]
                and (q[x_key] < p[x_key] or q[y_key] > p[y_key]))

    return [p for p in points if not any(dominates(q, p) for q in points if q is not p)]


# Few distinct values as well as any floats: ties in x, in y and whole duplicates.
value = st.one_of(st.integers(0, 4).map(float),
                  st.floats(0, 10, allow_nan=False, allow_infinity=False))


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(value, value), max_size=25))
def test_front_matches_brute_force(pairs):
    points = [{"id": i, "score": x, "top1": y} for i, (x, y) in enumerate(pairs)]
    front = pareto.pareto_front(points, "score")
    expected = brute_force_front(points, "score", "top1")
    assert sorted(p["id"] for p in front) == sorted(p["id"] for p in expected)
    xs = [p["score"] for p in front]
    assert xs == sorted(xs)  # by ascending cost, so the step line can be drawn as is
    assert [p["top1"] for p in front] == sorted(p["top1"] for p in front)
    assert all(any(p is q for q in points) for p in front)  # the objects passed in


def test_front_small_cases():
    a = {"x": 1.0, "top1": 0.5}
    b = {"x": 1.0, "top1": 0.5}       # a duplicate of a: neither dominates the other
    c = {"x": 2.0, "top1": 0.5}       # as accurate as a, costs more: dominated
    d = {"x": 0.5, "top1": 0.2}       # cheapest: on the front
    e = {"x": 3.0, "top1": 0.9}       # most accurate: on the front
    nan = {"x": float("nan"), "top1": 1.0}  # not finite: left out
    assert pareto.pareto_front([], "x") == []
    assert pareto.pareto_front([c, e, a, nan, d, b], "x") == [d, a, b, e]


# ----------------------------------------------------------------------------- reading

def test_seeds_are_aggregated(tmp_path, capsys):
    rows = [
        row("adjq_s0", "adjq", "metric 0.15", 0, 0.90, 0.20, 0.10, 2.0, 5.0),
        row("adjq_s1", "adjq", "metric 0.15", 1, 0.93, 0.22, 0.14, 2.5, 6.0),
        row("adjq_s2", "adjq", "metric 0.15", 2, 0.96, 0.30, 0.18, 3.0, 7.0),
        row("adjq_m3", "adjq", "metric 0.30", 0, 0.85, 0.10, 0.09, 2.0, 4.0),
        row("qat", "uniform_qat", "W4A4", 0, 0.91, 0.25, 0.26, 4, 4),
        row("run", "adjq", "metric 0.5", 0, "", "", "", status="running"),
        row("bad", "lsq", "W2A2", 0, 0.5, "", 0.1, status="done"),  # no MicroNet score
    ]
    # An extra flag column anywhere is ignored.
    path = write_csv(tmp_path / "sweep.csv", [{**r, "resumed": 1} for r in rows],
                     COLUMNS[:3] + ["resumed"] + COLUMNS[3:])
    points = pareto.read_points(path)
    assert [(p["family"], p["label"]) for p in points] == [
        ("adjq", "metric 0.15"), ("adjq", "metric 0.30"), ("uniform_qat", "W4A4")]
    three = points[0]
    assert three["n"] == 3
    assert three["seeds"] == ["0", "1", "2"]
    assert three["top1"] == pytest.approx((0.90 + 0.93 + 0.96) / 3)  # 0.93
    assert (three["top1_min"], three["top1_max"]) == (0.90, 0.96)
    assert three["score_micronet"] == pytest.approx(0.24)  # (0.20 + 0.22 + 0.30) / 3
    assert three["score_adjq"] == pytest.approx(0.14)      # (0.10 + 0.14 + 0.18) / 3
    assert three["avg_weight_bits"] == pytest.approx(2.5)
    assert three["avg_act_bits"] == pytest.approx(6.0)
    assert three["point"] == "adjq_s0 + adjq_s1 + adjq_s2"
    one = points[1]
    assert (one["n"], one["top1"], one["top1_min"], one["top1_max"]) == (1, 0.85, 0.85, 0.85)
    assert points[2]["avg_weight_bits"] == 4.0 and points[2]["top5"] is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 rows" in err[0]
    assert "1 running" in err[0] and "1 no top1/score" in err[0]


def test_unlabelled_runs_of_a_family_are_one_setting(tmp_path):
    path = write_csv(tmp_path / "sweep.csv", [
        row("adjq-seed0", "adjq", "", 0, 0.8, 0.2, 0.2, 2.2, 4.4),
        row("adjq-seed1", "adjq", "", 1, 0.9, 0.4, 0.4, 2.4, 4.6),
        row("float-seed0", "float", "", 0, 0.95, 1.0, 1.0, 32, 32),
    ])
    points = pareto.read_points(path)
    assert [(p["family"], p["n"]) for p in points] == [("adjq", 2), ("float", 1)]
    assert points[0]["top1"] == pytest.approx(0.85)
    assert points[0]["score_adjq"] == pytest.approx(0.3)
    assert points[0]["avg_weight_bits"] == pytest.approx(2.3)


def test_annotations_give_the_bits():
    assert pareto.annotation({"label": "W4A4", "avg_weight_bits": 4.0,
                              "avg_act_bits": 4.0}) == "W4A4"
    assert pareto.annotation({"label": "", "avg_weight_bits": 4.0,
                              "avg_act_bits": 8.0}) == "W4A8"
    assert pareto.annotation({"label": "", "avg_weight_bits": 2.44,
                              "avg_act_bits": 5.61}) == "2.4/5.6 b"
    assert pareto.annotation({"label": "metric 0.15", "avg_weight_bits": 2.44,
                              "avg_act_bits": 5.61}) == "metric 0.15\n2.4/5.6 b"
    assert pareto.annotation({"label": "", "avg_weight_bits": 32.0,
                              "avg_act_bits": 32.0}) == "FP32"
    assert pareto.annotation({"label": "W8 dynamic", "avg_weight_bits": None,
                              "avg_act_bits": None}) == "W8 dynamic"


# ----------------------------------------------------------------------------- the figure

def test_render_two_panel_png(tmp_path, capsys):
    import matplotlib.image

    path = write_csv(tmp_path / "sweep.csv", SWEEP)
    assert pareto_cli.main([str(path)]) == 0
    png = tmp_path / "pareto.png"  # next to the CSV by default
    assert png.is_file()
    image = matplotlib.image.imread(png)
    height, width = image.shape[:2]
    assert width > height  # two panels side by side
    assert image.var() > 0  # not blank
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0] == f"wrote {png}"
    # The front on the MicroNet score: lsq3 (0.17) and the two adjq seeds' mean
    # (0.185, 94%) are on it, the W4A4 QAT (0.22, 92%) and the unknown family are not.
    micronet = lines[lines.index(next(x for x in lines if "front on score_micronet" in x)):
                     lines.index(next(x for x in lines if "front on score_adjq" in x))]
    front_text = "\n".join(micronet)
    assert "[lsq3]" in front_text and "[adjq_s0 + adjq_s1], n=2" in front_text
    assert "[float]" in front_text and "[int8]" in front_text
    assert "qat4" not in front_text and "[other]" not in front_text
    assert "skipped 1 row" in err and "1 failed" in err


def test_plot_writes_where_asked(tmp_path, capsys):
    points = pareto.read_points(write_csv(tmp_path / "sweep.csv", SWEEP[:3]))
    out = tmp_path / "figs" / "front.png"
    assert pareto.plot(points, out, title="digits: top-1 vs score") == str(out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert pareto_cli.main([str(tmp_path / "sweep.csv"), "--output", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote {out}\n")


# ----------------------------------------------------------------------------- errors

def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as exc:
        pareto_cli.main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_missing_column_is_named(tmp_path, capsys):
    columns = [c for c in COLUMNS if c != "score_adjq"]
    path = write_csv(tmp_path / "sweep.csv", SWEEP, columns)
    message = one_line_error(capsys, [str(path)])
    assert "missing column 'score_adjq'" in message
    assert not (tmp_path / "pareto.png").exists()


def test_no_finished_points(tmp_path, capsys):
    path = write_csv(tmp_path / "sweep.csv", [
        row("a", "adjq", "m", 0, "", "", "", status="failed"),
        row("b", "adjq", "m", 0, "", "", "", status="pending"),
    ])
    message = one_line_error(capsys, [str(path)])
    assert "no finished points" in message and "1 failed" in message
    assert "1 pending" in message
    assert not (tmp_path / "pareto.png").exists()
    empty = write_csv(tmp_path / "empty.csv", [])
    assert "no finished points" in one_line_error(capsys, [str(empty)])


def test_other_bad_inputs(tmp_path, capsys):
    assert "no such file" in one_line_error(capsys, [str(tmp_path / "nope.csv")])
    (tmp_path / "blank.csv").write_text("")
    assert "no header" in one_line_error(capsys, [str(tmp_path / "blank.csv")])
    path = write_csv(tmp_path / "sweep.csv", [row("a", "lsq", "W4A4", 0, 87.5, 0.2, 0.2)])
    assert "not a fraction" in one_line_error(capsys, [str(path)])
    path = write_csv(tmp_path / "sweep.csv", SWEEP)
    assert ".png" in one_line_error(capsys, [str(path), "--output", "x.pdf"])
    assert "--help" in one_line_error(capsys, [str(path), "--bogus"])


def test_help_names_every_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        pareto_cli.main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("csv", "--output", "--title"):
        assert flag in text


def test_module_does_not_import_tensorflow():
    # Only pareto itself: the test process has TensorFlow already (conftest.py imports it).
    code = ("import sys, adj_quant.recipe.pareto, adj_quant.cli.pareto; "
            "assert 'tensorflow' not in sys.modules, 'tensorflow imported'; "
            "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, timeout=60)
