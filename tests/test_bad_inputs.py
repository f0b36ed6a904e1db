"""The fast cases of the bad-input harness (tests/bad_inputs) against the installed console
scripts: no traceback, and no case that contradicts its expectation.

The commands are found next to this Python or on PATH (``ADJQ_SCRIPTS=DIR`` to point
elsewhere); a missing or broken console script fails the test, it is not skipped. The whole
harness, with its trained fixtures, is ``python -m tests.bad_inputs --work DIR``.
"""

import os

from bad_inputs import cases as harness_cases
from bad_inputs import commands, runner
from bad_inputs.outcomes import Result, classify
from conftest import ROOT


def test_the_fast_cases_need_no_trained_run_and_cover_every_command():
    fast = harness_cases.fast_cases()
    assert 15 <= len(fast) <= 40
    assert not [c.name for c in fast if "trained" in c.needs]
    assert {c.command for c in fast} == set(commands.SCRIPTS)
    every = harness_cases.all_cases()
    assert {c.command for c in every} == {*commands.SCRIPTS, *commands.CHECKOUT_SCRIPTS}
    assert len({c.name for c in every}) == len(every)


def test_classification_of_made_up_results():
    """The outcome classes on hand-written stderr (not produced by the code under test)."""
    one = Result(2, "", "2026-01-01 00:00:00.000001: I tensorflow/core/x.cc:1] noise\n"
                 "error: --lr inf is not a finite number; pass a finite value\n", 1.0)
    assert classify(one) == ("one-line", "error: --lr inf is not a finite number; "
                                         "pass a finite value")
    several = Result(2, "", "usage: adjq-train\nerror: bad\n", 1.0)
    assert classify(several)[0] == "multi-line"
    tb = Result(1, "", "Traceback (most recent call last):\n  File \"x\", line 1\n"
                "ValueError: boom\n", 1.0)
    assert classify(tb) == ("traceback", "ValueError: boom")
    assert classify(Result(0, "ok\n", "", 1.0))[0] == "clean-run"
    assert classify(Result(-9, "", "", 1.0))[0] == "traceback"
    assert classify(Result(None, "", "", 300.0, timed_out=True))[0] == "timeout"


def test_fast_bad_inputs(tmp_path):
    cases = harness_cases.fast_cases()
    scripts = os.environ.get("ADJQ_SCRIPTS")
    fx, env = runner.prepare(str(tmp_path), cases, ROOT, scripts)
    rows = runner.run_cases(cases, fx, str(tmp_path), env, jobs=2)
    bad = [f"{r['name']}: {r['outcome']}: {r['expectation_problem'] or r['message']}"
           for r in rows if r["outcome"] in ("traceback", "wrong", "timeout", "skipped")]
    assert not bad, "\n".join(bad)
