"""bench/quantizer_backward.py: every way of writing the backward computes the same sums."""

import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "bench", "quantizer_backward.py")


def test_every_way_gives_the_sums_of_separate_reductions():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               ADJQ_XLA_CACHE="off")
    proc = subprocess.run([sys.executable, SCRIPT, "--shape", "4,8,8,8", "--repeats", "1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] not in ("way", "---"):
            rows[cells[0]] = cells
    assert set(rows) == {"separate", "stacked", "concat_rows", "row_blocks", "ones_matmul",
                         "variadic", "outside", "plain", "input_grad_only", "one_sum_only"}
    assert rows["separate"][2] == "0 (identical)"
    for name, (_, ms, diff) in rows.items():
        assert float(ms) > 0, name
        if diff != "(part only)" and diff != "0 (identical)":
            # float32 sums of 256 terms in another order: a few ulps of the largest sum
            assert float(diff) < 1e-5, (name, diff)


def test_a_bad_shape_is_one_line_naming_the_value():
    proc = subprocess.run([sys.executable, SCRIPT, "--shape", "16,112,x"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert "'16,112,x' is not an activation shape" in last and "N,H,W,C" in last
    assert "Traceback" not in proc.stderr
