"""Importing adjq changes nothing: no environment variable, no file or directory.

Every module under ``adj_quant/`` is imported in a fresh process with a clean environment
and an empty temporary home, cache and working directory, after the third-party packages
that adjq's modules import at module level (TensorFlow sets variables of its own when
imported: ``TF2_BEHAVIOR``, ``KMP_*``...; those are TensorFlow's, not adjq's). The only
exceptions are named here, with their reason, and the test checks that they are exactly
what happened:

* ``__main__`` modules are not imported: importing one runs its program.

The commands' start-up (a quiet TensorFlow, the XLA kernel settings) runs when a command's
``main()`` is called (``adj_quant.cli.start``), not when its module is imported.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT

#: The third-party packages adjq's modules import at module level, imported first.
THIRD_PARTY = ("numpy", "tensorflow", "tf_slim", "tqdm")

SNIPPET = r"""
import importlib, json, os, pkgutil, sys

for name in sys.argv[1].split(","):
    importlib.import_module(name)
third_party = set(sys.modules)
files = sorted(os.path.join(d, n) for root in sys.argv[2:]
               for d, subdirs, names in os.walk(root) for n in subdirs + names)
start = dict(os.environ)
import adj_quant

changes, imported, skipped = [], ["adj_quant"], []
if dict(os.environ) != start:
    changes.append(["adj_quant", {}])
before = dict(os.environ)
for info in pkgutil.walk_packages(adj_quant.__path__, "adj_quant."):
    if info.name.rsplit(".", 1)[-1] == "__main__":
        skipped.append(info.name)
        continue
    importlib.import_module(info.name)
    imported.append(info.name)
    now = dict(os.environ)
    if now != before:
        diff = {k: now.get(k) for k in set(now) | set(before) if now.get(k) != before.get(k)}
        changes.append([info.name, diff])
        before = now
new = {m.split(".")[0] for m in set(sys.modules) - third_party}
new -= set(sys.stdlib_module_names) | {"adj_quant", "slim_nets", "pretrained"}
print(json.dumps({"changes": changes, "imported": imported, "skipped": skipped,
                  "files": files, "new_third_party": sorted(new)}))
"""


def _modules_on_disk() -> set[str]:
    """Every module of the adj_quant package, from its files."""
    package = os.path.join(ROOT, "adj_quant")
    found = set()
    for directory, subdirs, files in os.walk(package):
        subdirs[:] = [d for d in subdirs
                      if os.path.exists(os.path.join(directory, d, "__init__.py"))]
        prefix = os.path.relpath(directory, ROOT).replace(os.sep, ".")
        for name in files:
            if name.endswith(".py"):
                stem = name[:-3]
                found.add(prefix if stem == "__init__" else f"{prefix}.{stem}")
    return found


def _everything_in(directory) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), directory)
                  for d, subdirs, files in os.walk(directory) for n in subdirs + files)


def test_importing_every_module_changes_no_environment_and_creates_no_file(tmp_path):
    home, cache, config, cwd = (tmp_path / n for n in ("home", "cache", "config", "cwd"))
    for d in (home, cache, config, cwd):
        d.mkdir()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
           "XDG_CACHE_HOME": str(cache), "XDG_CONFIG_HOME": str(config), "PYTHONPATH": ROOT,
           "PYTHONDONTWRITEBYTECODE": "1"}
    dirs = [str(d) for d in (home, cache, config, cwd)]
    run = subprocess.run([sys.executable, "-c", SNIPPET, ",".join(THIRD_PARTY), *dirs],
                         env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])

    # Skipped nothing silently: every module on disk was imported, or is a __main__.
    assert set(result["imported"]) | set(result["skipped"]) == _modules_on_disk()
    assert all(name.endswith(".__main__") for name in result["skipped"])
    assert "adj_quant.quantizers.kernels" in result["imported"]
    # Any other third-party package would have had its import effects counted as adjq's.
    assert result["new_third_party"] == [], "add them to THIRD_PARTY if their effects are theirs"

    # The environment: unchanged by every import, the commands' modules included.
    assert result["changes"] == [], f"imports changed the environment: {result['changes']}"
    assert "adj_quant.cli.train" in result["imported"]

    # The file system: nothing new in the home, cache, config or working directory.
    after = sorted(os.path.join(str(d), p) for d in (home, cache, config, cwd)
                   for p in _everything_in(d))
    assert after == result["files"], "importing adjq created files"
