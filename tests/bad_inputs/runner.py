"""Running the cases: each in its own subprocess, classified (:mod:`.outcomes`) and checked
against its expectation; the table of results; the command line.

    python -m tests.bad_inputs --work WORKDIR [--only SUBSTR] [--fast] [--json OUT] [--jobs N]
    python -m tests.bad_inputs --list                     # the cases, without running them

The commands are the installed console scripts (:mod:`.commands`), run with
``cwd=CHECKOUT`` and ``PYTHONPATH=CHECKOUT`` so that the checkout's ``adj_quant`` is the one
imported (checked before anything runs).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .cases import TIMEOUT, Case, all_cases, fast_cases
from .commands import (
    ScriptNotFound,
    check_import,
    child_env,
    command_argv,
    kill_running,
    run_cmd,
)
from .fixtures import Ctx, Fixtures
from .outcomes import OUTCOMES, Result, classify, meaningful_lines

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def case_argv(case: Case, ctx: Ctx, fx: Fixtures) -> list[str]:
    """The case's command line with its placeholders filled (and set up)."""
    args = []
    for a in case.args:
        if a == "#copy-lone":  # a qat8 stage copied out of its run
            ctx.copy(os.path.join(fx.run, "qat8"), os.path.join("lone", "qat8"))
            continue
        if a.startswith("#"):  # a setup-only placeholder (e.g. corrupt a checkpoint)
            ctx.expand(a[1:])
            continue
        args.append(ctx.expand(a))
    return fx.argv_of(case.command) + args


def run_case(case: Case, fx: Fixtures, work: str, env: dict, timeout: int) -> dict:
    case_dir = os.path.join(work, "cases", case.name)
    shutil.rmtree(case_dir, ignore_errors=True)
    os.makedirs(case_dir)
    ctx = Ctx(fx, case_dir)
    argv = case_argv(case, ctx, fx)
    if case.setup:
        case.setup(ctx)
    limit = max(timeout, case.timeout)
    if case.runner == "concurrent":
        res = run_concurrent(argv, ctx, fx, env, limit)
    elif case.runner == "disk_full":
        res = run_disk_full(argv, ctx, fx, env, limit)
    else:
        res = run_cmd(argv, fx.repo, env, limit)
    logs = os.path.join(work, "logs")
    os.makedirs(logs, exist_ok=True)
    for suffix, text in ((".out", res.stdout), (".err", res.stderr)):
        with open(os.path.join(logs, case.name + suffix), "w") as f:
            f.write(text)
    base, message = classify(res)
    outcome, problem = base, None
    if case.expect and base != "skipped":
        try:
            problem = case.expect(ctx, res)
        except Exception as err:  # noqa: BLE001
            problem = f"expectation check failed: {type(err).__name__}: {err}"
        if problem:
            if base in ("clean-run", "one-line", "multi-line"):
                outcome = "wrong"
            res.notes.append("expectation: " + problem)
    return {
        "name": case.name, "category": case.category, "command": case.command,
        "description": case.desc, "argv": ["python" if a == sys.executable else a for a in argv],
        "rc": res.rc, "elapsed_s": round(res.elapsed, 1), "outcome": outcome,
        "base_outcome": base, "message": message, "expectation_problem": problem,
        "notes": res.notes, "stderr_lines": len(meaningful_lines(res.stderr)),
        "stderr_tail": res.stderr[-2000:], "stdout_tail": res.stdout[-1000:],
    }


def run_concurrent(argv, ctx, fx, env: dict, timeout: int) -> Result:
    """Start ``argv`` in the background, wait for its first checkpoint, run it a second time
    (the measured run), then kill the first."""
    marker = os.path.join(ctx.field("run"), "pretrain", "checkpoints.json")
    first_out = open(os.path.join(ctx.case, "first.out"), "wb")
    first_err = open(os.path.join(ctx.case, "first.err"), "wb")
    first = subprocess.Popen(argv, cwd=fx.repo, env=env, stdin=subprocess.DEVNULL,
                             stdout=first_out, stderr=first_err, start_new_session=True)
    notes = []
    try:
        t0 = time.time()
        while time.time() - t0 < 180 and first.poll() is None and not os.path.exists(marker):
            time.sleep(0.5)
        if first.poll() is not None:
            notes.append(f"the first process had already exited ({first.returncode}) "
                         "before the second started: inconclusive")
        else:
            notes.append(f"second started {time.time() - t0:.0f}s after the first, "
                         "which had written a checkpoint")
        res = run_cmd(argv, fx.repo, env, timeout)
        notes.append("the first was still running when the second ended" if first.poll() is None
                     else f"the first exited ({first.returncode}) before the second ended")
    finally:
        if first.poll() is None:
            try:
                os.killpg(first.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        first.wait()
        first_out.close()
        first_err.close()
    res.notes.extend(notes)
    return res


def run_disk_full(argv, ctx, fx, env: dict, timeout: int) -> Result:
    """Run ``argv`` with its run directory on a 3 MiB tmpfs, mounted in a private user and
    mount namespace (no root needed where unprivileged user namespaces are allowed)."""
    if not shutil.which("unshare"):
        return Result(None, "", "", 0.0, skipped="no unshare(1) on this machine")
    mnt = os.path.join(ctx.case, "tmpfs")
    os.makedirs(mnt, exist_ok=True)
    listing = os.path.join(ctx.case, "tmpfs_listing.txt")
    script = ('mount -t tmpfs -o size=3m tmpfs "$1" || exit 97; shift; "$@"; rc=$?; '
              f'ls -a "{mnt}/run/pretrain" > "{listing}" 2>&1; exit $rc')
    wrapped = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script, "sh",
               mnt, *argv]
    res = run_cmd(wrapped, fx.repo, env, timeout)
    if res.rc == 97:
        why = res.stderr.strip()[:200]
        return Result(None, "", "", res.elapsed,
                      skipped=f"cannot mount a tmpfs in a user namespace: {why}")
    if res.rc is not None and res.rc > 128:  # the shell reports a signal as 128 + N
        res.rc = -(res.rc - 128)
    if os.path.exists(listing):
        res.notes.append("stage dir on the full disk: " + " ".join(open(listing).read().split()))
    return res


def report(rows: list[dict]) -> str:
    width = max([len(r["name"]) for r in rows] + [4])
    cat = max([len(r["category"]) for r in rows] + [8])
    lines = [f"{'case':<{width}}  {'category':<{cat}}  {'outcome':<10}  message",
             "-" * (width + cat + 80)]
    for r in rows:
        msg = r["message"]
        if r["expectation_problem"] and r["outcome"] != "clean-run":
            msg = f"[{r['expectation_problem']}] {msg}"
        lines.append(f"{r['name']:<{width}}  {r['category']:<{cat}}  {r['outcome']:<10}  "
                     f"{msg[:140]}")
    counts = {k: sum(r["outcome"] == k for r in rows) for k in OUTCOMES}
    lines += ["", f"{len(rows)} cases: " + ", ".join(f"{k} {v}" for k, v in counts.items() if v)]
    return "\n".join(lines)


def prepare(work: str, cases: list[Case], repo: str = ROOT, scripts: str | None = None,
            timeout: int = TIMEOUT) -> tuple[Fixtures, dict]:
    """Check the commands, make the fixtures the cases need; ``(fixtures, env)``."""
    from .cases import TINY

    env = child_env(repo)
    for command in sorted({c.command for c in cases}):
        command_argv(command, repo, scripts)  # every command is there, or one line
    where = check_import(repo, env, scripts)
    print(f"adj_quant from {where}", flush=True)
    fx = Fixtures(work, repo, env, max(timeout, 600), lambda c: command_argv(c, repo, scripts),
                  TINY)  # training the fixtures takes a while
    fx.prepare(set().union(*(c.needs for c in cases)) if cases else set())
    return fx, env


def run_cases(cases: list[Case], fx: Fixtures, work: str, env: dict, timeout: int = TIMEOUT,
              jobs: int = 1, done=None) -> list[dict]:
    """Run ``cases`` (``jobs`` at a time); ``done(i, row)`` after each, in finishing order."""
    rows: dict[str, dict] = {}
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        futures = {pool.submit(run_case, c, fx, work, env, timeout): c for c in cases}
        for i, future in enumerate(concurrent.futures.as_completed(futures), 1):
            row = future.result()
            rows[row["name"]] = row
            if done:
                done(i, row)
    except BaseException:  # an interrupt: no new case, and kill the running ones
        pool.shutdown(wait=False, cancel_futures=True)
        kill_running()
        raise
    pool.shutdown()
    return [rows[c.name] for c in cases]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tests.bad_inputs",
                                description="Run bad command lines against every installed "
                                "adjq command and classify what each one does.")
    p.add_argument("--repo", default=ROOT, help="the checkout to test (default: this one)")
    p.add_argument("--scripts", metavar="DIR",
                   help="where the console scripts are (default: next to this Python, or PATH)")
    p.add_argument("--work", help="work directory for fixtures, case copies and logs")
    p.add_argument("--only", action="append", default=[], metavar="SUBSTR",
                   help="run only cases whose name contains SUBSTR or whose category is "
                        "SUBSTR (repeatable)")
    p.add_argument("--fast", action="store_true",
                   help="only the fast cases (no trained fixture), as the test suite runs them")
    p.add_argument("--untrained", action="store_true",
                   help="only the cases that need no trained fixture")
    p.add_argument("--jobs", type=int, default=1, help="cases run at the same time")
    p.add_argument("--json", metavar="OUT", help="write every case's result as JSON")
    p.add_argument("--timeout", type=int, default=TIMEOUT,
                   help="seconds per case (the quantized-stage, guard, lock and disk cases get "
                        "at least 300)")
    p.add_argument("--list", action="store_true", help="list the cases and exit")
    return p


def main(argv=None) -> int:
    p = _parser()
    a = p.parse_args(argv)
    cases = fast_cases() if a.fast else all_cases()
    if a.only:
        cases = [c for c in cases if any(s in c.name or s == c.category for s in a.only)]
    if a.untrained:
        cases = [c for c in cases if "trained" not in c.needs]
    if a.list:
        for c in cases:
            need = ",".join(sorted(c.needs)) or "-"
            print(f"{c.name:<36} {c.category:<10} {need:<13} {c.desc}")
        print(f"{len(cases)} cases")
        return 0
    if not a.work:
        p.error("--work is required")
    repo, work = os.path.abspath(a.repo), os.path.abspath(a.work)
    os.makedirs(work, exist_ok=True)
    try:
        fx, env = prepare(work, cases, repo, a.scripts, a.timeout)
    except ScriptNotFound as err:
        sys.exit(f"error: {err}")
    started, finished = time.time(), []

    def done(i, row):
        note = f"  {row['message'][:100]}" if row["outcome"] != "clean-run" else ""
        print(f"[{i}/{len(cases)}] {row['name']}: {row['outcome']} ({row['elapsed_s']}s){note}",
              flush=True)
        finished.append(row)
        if a.json:  # rewritten after every case, so a partial run leaves its results
            with open(a.json, "w") as f:
                json.dump({"repo": repo, "cases": finished}, f, indent=1)

    try:
        rows = run_cases(cases, fx, work, env, a.timeout, a.jobs, done)
    except KeyboardInterrupt:
        print(f"interrupted after {len(finished)} cases" + (f"; they are in {a.json}" if a.json
                                                            else ""), file=sys.stderr)
        return 130
    print()
    print(report(rows))
    print(f"\n{time.time() - started:.0f}s; logs in {os.path.join(work, 'logs')}")
    return 0
