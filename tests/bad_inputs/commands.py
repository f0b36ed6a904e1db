"""The commands under test: the installed console scripts, found next to the interpreter
(a virtual environment's ``bin``) or on PATH, never by module path, so that a renamed module
or a stale entry point shows up as a failing case instead of a silently skipped one. The
checkout's ``quantizer.py`` (the seed's old form) is run as a file. Each command runs in
its own session, stdin from /dev/null, stderr not a terminal."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

from .outcomes import Result

#: The console scripts of ``pyproject.toml``'s ``[project.scripts]``.
SCRIPTS = ("adjq-train", "adjq-eval", "adjq-score", "adjq-export", "adjq-quantize-checkpoint",
           "adjq-convert", "adjq-sweep", "adjq-pareto")
#: Run as ``python CHECKOUT/quantizer.py``.
CHECKOUT_SCRIPTS = ("quantizer.py",)


#: Process groups of the commands running now (each command runs in its own session).
RUNNING: set[int] = set()


def kill_running() -> None:
    """Kill the process group of every command still running (after an interrupt)."""
    for pgid in list(RUNNING):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ScriptNotFound(Exception):
    pass


def find_script(name: str, scripts_dir: str | None = None) -> str:
    """The path of console script ``name``: in ``scripts_dir`` if given, else next to
    ``sys.executable``, else on PATH."""
    if scripts_dir:
        candidates = [os.path.join(scripts_dir, name)]
    else:
        candidates = [os.path.join(os.path.dirname(sys.executable), name), shutil.which(name)]
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    where = scripts_dir or f"{os.path.dirname(sys.executable)} or PATH"
    raise ScriptNotFound(f"console script {name} not found in {where}; install the checkout "
                         "with pip install -e . (or pass --scripts DIR)")


def command_argv(command: str, repo: str, scripts_dir: str | None = None) -> list[str]:
    """The argv prefix of a case's command."""
    if command in CHECKOUT_SCRIPTS:
        return [sys.executable, os.path.join(repo, command)]
    if command not in SCRIPTS:
        raise KeyError(f"unknown command {command!r}")
    return [find_script(command, scripts_dir)]


def script_interpreter(path: str) -> str:
    """The interpreter a console script runs with (its ``#!`` line), else ``sys.executable``."""
    with open(path, "rb") as f:
        first = f.readline().decode("utf-8", "replace").strip()
    if first.startswith("#!") and " " not in first[2:].strip():
        return first[2:].strip()
    return sys.executable


def run_cmd(argv, cwd, env, timeout, stdout_path=None, stderr_path=None) -> Result:
    """Run ``argv`` in its own session; on timeout kill that session's process group."""
    started = time.time()
    out = open(stdout_path, "w+b") if stdout_path else subprocess.PIPE
    err = open(stderr_path, "w+b") if stderr_path else subprocess.PIPE
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=err, start_new_session=True)
    RUNNING.add(proc.pid)
    timed_out = False
    try:
        o, e = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        o, e = proc.communicate()
    if stdout_path:
        out.seek(0)
        o = out.read()
        out.close()
    if stderr_path:
        err.seek(0)
        e = err.read()
        err.close()
    RUNNING.discard(proc.pid)
    return Result(proc.returncode, o.decode("utf-8", "replace"), e.decode("utf-8", "replace"),
                  time.time() - started, timed_out)


def child_env(repo: str) -> dict:
    env = dict(os.environ)
    for key in ("ADJQ_TRACEBACK", "TF_CPP_MIN_LOG_LEVEL", "PYTHONSTARTUP"):
        env.pop(key, None)
    env["PYTHONPATH"] = repo + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def check_import(repo: str, env: dict, scripts_dir: str | None = None) -> str:
    """Where the console scripts' interpreter imports ``adj_quant`` from, with ``env``; exits
    with one line unless it is ``repo``'s."""
    python = script_interpreter(find_script("adjq-train", scripts_dir))
    res = run_cmd([python, "-c", "import adj_quant, os; print(os.path.realpath("
                   "adj_quant.__file__))"], repo, env, 120)
    where = res.stdout.strip()
    if res.rc != 0 or not where.startswith(os.path.realpath(repo) + os.sep):
        sys.exit(f"adj_quant is not imported from {repo} (got {where!r}, exit {res.rc}):\n"
                 f"{res.stderr[-2000:]}")
    return where
