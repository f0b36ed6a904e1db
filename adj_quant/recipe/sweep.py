"""Sweeps: many runs of the recipe and its baselines from one TOML file, sharing stages.

    adjq-sweep configs/sweeps/digits_pareto.toml                 # runs/sweeps/digits_pareto
    adjq-sweep configs/sweeps/digits_pareto.toml --dry_run       # the points, what each reuses
    adjq-sweep FILE.toml --jobs 2 --sweep_dir runs/my_sweep      # two points at a time
    adjq-pareto runs/sweeps/digits_pareto/sweep.csv              # the plot (recipe.pareto)

A sweep file names a base config, flags for every point, a grid, and a list of points::

    base = "../digits.toml"       # relative to the sweep file (default: the digits config)
    name = "my_sweep"             # the default --sweep_dir is runs/sweeps/<name>

    [flags]                       # every point; "stage.flag" sets a flag for one stage only
    max_val_images = 360

    [grid]                        # every point runs once per combination of these values
    seed = [0, 1]

    [[points]]
    family = "adjq"               # the recipe variant (FAMILIES below)
    "adjustable.metric" = [0.10, 0.15]    # a list in a point: one point per value
    "finetune.metric" = [0.10, 0.15]      # ... zipped with the other lists of the same length

    [[points]]
    family = "uniform_qat"
    label = "W4A4"                # shown in the csv and the plot (default: the flag values)
    "qat8.weight_bits" = 4
    "qat8.act_bits" = 4

Lists of the same length inside one point are zipped (one point per position); lists of
different lengths, and the ``[grid]``, multiply. Flags are the options of ``train.py``
(``python train.py --help``), checked before anything runs.

**Stage reuse.** Each stage of each point is identified by a content hash of its resolved
options (those that decide what it trains: the same as a resumed stage compares) and of the
hash of the stage before it. A stage is trained once, in ``<sweep_dir>/stages/<stage>-<hash>``;
every point that needs it links to it from ``<sweep_dir>/points/<point>/<stage>``. The
hash covers the options, not the code: after changing the library, start a new sweep
directory.

**Resuming.** Rerunning the same command skips finished points (their ``point.json``),
resumes interrupted stages through the recipe's own checkpoints, and tries failed points
again. A failing point is recorded with its one-line error and the sweep goes on. After a
``kill -9`` of the sweep's process group the rerun takes over the dead sweep's lock (and
the stages' locks) with a line saying so, trains no finished stage again, and writes the
``sweep.csv`` of an uninterrupted sweep apart from wall times: a stage's
``sweep_stage.json`` names the point that trained it, so a point killed after training a
stage does not count it as reused when it runs again.

**Output** in the sweep directory: ``sweep.csv`` (one row per point: flags, top-1/top-5,
average bits, both MicroNet scores, params, ops, wall time, the stages it reused, status and
error), ``tensorboard/`` (an HParams view of all points), and per point ``log.txt`` and
``point.json``. A lock file refuses a second sweep on the same directory.

The command is ``adjq-sweep`` (:mod:`adj_quant.cli.sweep`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from typing import Any

from adj_quant.errors import UserError
from adj_quant.files import write_atomic, write_json_atomic
from adj_quant.recipe import config as config_lib
from adj_quant.recipe.config import FIELDS, STAGES

#: Recipe variants: the stages each trains, in order. The last one is evaluated.
FAMILIES: dict[str, tuple[str, ...]] = {
    "float": ("pretrain",),                                 # the float model itself
    "ptq_dynamic": ("pretrain",),                           # + TFLite dynamic-range PTQ
    "ptq_int8": ("pretrain",),                              # + TFLite full-integer PTQ
    "uniform_qat": ("pretrain", "calibrate", "qat8"),       # fixed bits, learned ranges
    "lsq": ("pretrain", "calibrate", "qat8"),               # LSQ+ at fixed bits
    "adjq": STAGES,                                         # the whole recipe
    # with sparsity: gradual magnitude pruning in qat8, or thresholds learned in adjustable
    "uniform_qat_gmp": ("pretrain", "calibrate", "qat8"),
    "lsq_gmp": ("pretrain", "calibrate", "qat8"),
    "adjq_gmp": STAGES,
    "adjq_learned": STAGES,
}
#: Flags a family sets unless the point sets them.
FAMILY_FLAGS: dict[str, dict[tuple[str | None, str], Any]] = {
    "uniform_qat": {("qat8", "bits_trainable"): False},
    "lsq": {("qat8", "quantizer"): "lsq", ("qat8", "bits_trainable"): False},
    "uniform_qat_gmp": {("qat8", "bits_trainable"): False, ("qat8", "sparsity"): 0.7},
    "lsq_gmp": {("qat8", "quantizer"): "lsq", ("qat8", "bits_trainable"): False,
                ("qat8", "sparsity"): 0.7},
    "adjq_gmp": {("qat8", "sparsity"): 0.7},
    "adjq_learned": {("adjustable", "learned_sparsity"): True},
}
#: Flags a sweep does not take: it sets them itself.
RESERVED = {"run_dir", "stage", "config", "ckpt_path", "teacher_ckpt", "progress",
            "allow_config_change"}
#: Options that do not change what a stage computes (never part of a stage's hash).
NOT_HASHED = set(config_lib.UNCOMPARED_FIELDS) | RESERVED
POINT_KEYS = {"family", "label"}
CSV_RESULTS = ["top1", "top5", "avg_weight_bits", "avg_act_bits", "score_micronet",
               "score_adjq", "params", "ops", "wall_s", "reused", "status", "error"]
POINT_FILE, LOG_FILE = "point.json", "log.txt"
#: In a stage's directory: the point that trains (trained) it, and its seconds when done.
STAGE_FILE = "sweep_stage.json"


# --------------------------------------------------------------------------- the sweep file


@dataclasses.dataclass
class Point:
    """One run: a family and its flags, ``{(stage or None, flag): value}``."""

    name: str
    family: str
    label: str
    flags: dict[tuple[str | None, str], Any]
    stage_keys: dict[str, str] = dataclasses.field(default_factory=dict)

    def stage_cli(self, stage: str) -> dict[str, Any]:
        """What ``train.py --stage STAGE`` gets: the point's global flags, then the stage's."""
        cli = {flag: v for (where, flag), v in self.flags.items() if where is None}
        cli.update({flag: v for (where, flag), v in self.flags.items() if where == stage})
        return cli

    def flag_columns(self) -> dict[str, Any]:
        return {_flag_name(key): v for key, v in self.flags.items()}


def _flag_name(key: tuple[str | None, str]) -> str:
    return key[1] if key[0] is None else f"{key[0]}.{key[1]}"


def _parse_flag(name: str, where: str) -> tuple[str | None, str]:
    stage, _, flag = name.rpartition(".")
    if stage and stage not in STAGES:
        raise UserError(f"{where}: {name!r} names no stage {stage!r}; use one of "
                        f"{', '.join(STAGES)} before the dot, or the flag alone")
    if flag not in FIELDS:
        raise UserError(f"{where}: unknown flag {flag!r} in {name!r}; the flags are train.py's "
                        "(python train.py --help)")
    if flag in RESERVED:
        raise UserError(f"{where}: {name!r} is set by the sweep itself; remove it")
    return (stage or None, flag)


def _flatten(table: dict, where: str) -> dict[str, Any]:
    """TOML's dotted keys (``qat8.act_bits = 4``) arrive as tables: back to ``"qat8.act_bits"``."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            if key not in STAGES:
                raise UserError(f"{where}: table {key!r} is not a stage; use one of "
                                f"{', '.join(STAGES)}")
            for inner, v in value.items():
                if isinstance(v, dict):
                    raise UserError(f"{where}: {key}.{inner} is a table; give a value")
                flat[f"{key}.{inner}"] = v
        else:
            flat[key] = value
    return flat


def _check_value(key: tuple[str | None, str], value: Any, where: str) -> Any:
    name = _flag_name(key)
    if value is None or isinstance(value, (dict, list)) or (
            isinstance(value, float) and value != value):
        raise UserError(f"{where}: {name} = {value!r} is not a single value")
    try:
        return config_lib._coerce(key[1], value, where)  # noqa: SLF001 (the config's own check)
    except UserError as err:
        raise UserError(f"{err} (key {name!r})") from None


def _values_of(key, value, where) -> list:
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: {_flag_name(key)} is an empty list; give at least one "
                            "value or remove the key")
        return [_check_value(key, v, where) for v in value]
    return [_check_value(key, value, where)]


LABEL = ("", "label")  # a point's label list, zipped with its flag lists like one of them


def _expand(table: dict[str, Any], where: str, labels: list | None = None) -> list[dict]:
    """Lists of one length are zipped, the groups of different lengths multiplied."""
    keyed = {_parse_flag(name, where): _values_of(_parse_flag(name, where), v, where)
             for name, v in table.items()}
    if labels is not None:
        keyed[LABEL] = labels
    by_length: dict[int, list] = {}
    for key, values in keyed.items():
        by_length.setdefault(len(values), []).append(key)
    groups = [[dict(zip(keys, combo)) for combo in zip(*(keyed[k] for k in keys))]
              for _, keys in sorted(by_length.items())]
    points = []
    for combo in itertools.product(*groups):
        merged: dict = {}
        for part in combo:
            merged.update(part)
        points.append(merged)
    return points or [{}]


def _short(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _point_name(family: str, label: str, flags: dict) -> str:
    parts = [family] + ([label] if label else [])
    for key, v in sorted(flags.items(), key=lambda kv: _flag_name(kv[0])):
        part = f"{key[1]}{_short(v)}"
        if (not label or key[1] == "seed") and part not in parts:
            parts.append(part)  # "adjustable.metric" and "finetune.metric" alike: once
    name = "-".join(parts)
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", name)[:120]


@dataclasses.dataclass
class Sweep:
    path: str
    name: str
    base: str
    points: list[Point]


def _read_sweep_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"sweep file {path} not found; pass a TOML file such as "
                        "configs/sweeps/digits_pareto.toml") from None
    except IsADirectoryError:
        raise UserError(f"sweep file {path} is a directory; pass a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"sweep file {path} is not valid TOML ({err})") from None
    unknown = set(data) - {"base", "name", "flags", "grid", "points"}
    if unknown:
        raise UserError(f"{path}: unknown key {sorted(unknown)[0]!r}; a sweep file has base, "
                        "name, [flags], [grid] and [[points]]")
    return data


def _base_and_name(data: dict, path: str) -> tuple[str, str]:
    """The base config (checked now) and the sweep's name."""
    here = os.path.dirname(os.path.abspath(path))
    base = data.get("base")
    if base is None:
        base = config_lib.DEFAULT_CONFIG
    elif not isinstance(base, str):
        raise UserError(f"{path}: base must be a path to a config file, got {base!r}")
    else:
        base = os.path.normpath(os.path.join(here, base))
    config_lib.load_config(base)  # a bad base config is reported now
    name = data.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise UserError(f"{path}: name {name!r} must be letters, digits, '.', '_' or '-'")
    return base, name


def _point_labels(raw: dict, own: dict, where: str) -> tuple[str, list | None]:
    """A point's ``label``: one string, or a list with one label per value of its lists."""
    label = raw.get("label", "")
    labels = label if isinstance(label, list) else None
    if labels is not None and (not labels or not all(isinstance(x, str) for x in labels)):
        raise UserError(f"{where}: label must be a string or a non-empty list of strings "
                        "(one per value of the point's lists)")
    if labels is None and not isinstance(label, str):
        raise UserError(f"{where}: label must be a string, got {label!r}")
    if labels is not None and not any(isinstance(v, list) and len(v) == len(labels)
                                      for v in own.values()):
        raise UserError(f"{where}: label has {len(labels)} entries but no flag list of "
                        f"the point has {len(labels)} values to go with them")
    return label, labels


def _points_of(raw, i: int, path: str, fixed: dict, grid: list[dict],
               names: dict[str, int]) -> list[Point]:
    """The points of the ``i``-th ``[[points]]`` table (its lists and the grid expanded)."""
    where = f"{path} [[points]] #{i}"
    if not isinstance(raw, dict):
        raise UserError(f"{where} is not a table")
    family = raw.get("family", "adjq")
    if family not in FAMILIES:
        raise UserError(f"{where}: family {family!r} is not one of {', '.join(FAMILIES)}")
    own = _flatten({k: v for k, v in raw.items() if k not in POINT_KEYS}, where)
    label, labels = _point_labels(raw, own, where)
    points = []
    for combo in _expand(own, where, labels):
        if labels is not None:
            label = combo.pop(LABEL)
        for cell in grid:
            flags = {**fixed, **FAMILY_FLAGS.get(family, {}), **cell, **combo}
            flags = {k: v for k, v in flags.items()
                     if k[0] is None or k[0] in FAMILIES[family]}
            point_label = label or " ".join(dict.fromkeys(
                f"{k[1]}={_short(v)}" for k, v in sorted(
                    {**cell, **combo}.items(), key=lambda kv: _flag_name(kv[0]))
                if k[1] != "seed"))
            pname = _point_name(family, label, {**cell, **combo})
            if pname in names:
                raise UserError(f"{where}: the same point as #{names[pname]} ({pname}); "
                                "remove one or give it other flags")
            names[pname] = i
            points.append(Point(pname, family, point_label, flags))
    return points


def load_sweep(path: str) -> Sweep:
    """Read and check a sweep file; every error is one line naming the key."""
    data = _read_sweep_file(path)
    base, name = _base_and_name(data, path)

    def table(key, kind):
        value = data.get(key, kind())
        if not isinstance(value, kind):
            what = "table" if kind is dict else "list of tables ([[points]])"
            raise UserError(f"{path}: {key} must be a {what}")
        return value

    fixed = {}
    for flag, v in _flatten(table("flags", dict), f"{path} [flags]").items():
        key = _parse_flag(flag, f"{path} [flags]")
        fixed[key] = _check_value(key, v, f"{path} [flags]")
    grid_table = _flatten(table("grid", dict), f"{path} [grid]")
    for flag, v in grid_table.items():
        if not isinstance(v, list):
            raise UserError(f"{path} [grid]: {flag} must be a list of values")
    grid = _expand(grid_table, f"{path} [grid]")
    raw_points = table("points", list) or [{"family": "adjq"}]
    points: list[Point] = []
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_points, 1):
        points += _points_of(raw, i, path, fixed, grid, names)
    for point in points:
        plan_stage_keys(point, base)
    return Sweep(os.path.abspath(path), name, base, points)


def stage_hash(stage: str, options: dict, upstream: str) -> str:
    text = json.dumps({"stage": stage, "options": options, "upstream": upstream},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_stage_keys(point: Point, base: str) -> None:
    """``point.stage_keys[stage] = "<stage>-<hash>"`` for each stage of its family."""
    upstream = ""
    for stage in FAMILIES[point.family]:
        try:
            o = config_lib.resolve({"config": base, **point.stage_cli(stage)}, stage)
        except UserError as err:
            raise UserError(f"point {point.name}, stage {stage}: {err}") from None
        options = {k: v for k, v in dataclasses.asdict(o).items() if k not in NOT_HASHED}
        upstream = f"{stage}-{stage_hash(stage, options, upstream)}"
        point.stage_keys[stage] = upstream


# --------------------------------------------------------------------------- the directory


def stage_store(sweep_dir: str, key: str) -> str:
    return os.path.join(sweep_dir, "stages", key)


def point_dir(sweep_dir: str, point: Point) -> str:
    return os.path.join(sweep_dir, "points", point.name)


def stage_finished(sweep_dir: str, key: str) -> bool:
    return os.path.exists(os.path.join(stage_store(sweep_dir, key), "result.json"))


def _read_json(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_point(sweep_dir: str, point: Point) -> dict | None:
    return _read_json(os.path.join(point_dir(sweep_dir, point), POINT_FILE))


def link_stages(sweep_dir: str, point: Point) -> str:
    """The point's run directory, each stage a link into the shared stage store."""
    directory = point_dir(sweep_dir, point)
    os.makedirs(directory, exist_ok=True)
    for stage, key in point.stage_keys.items():
        target = stage_store(sweep_dir, key)
        os.makedirs(target, exist_ok=True)
        link = os.path.join(directory, stage)
        relative = os.path.relpath(target, directory)
        if os.path.islink(link) and os.readlink(link) == relative:
            continue
        if os.path.islink(link):
            os.remove(link)
        os.symlink(relative, link)
    return directory


# --------------------------------------------------------------------------- one point


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    first = text[0] if text else ""
    return first if isinstance(err, UserError) else f"{type(err).__name__}: {first}"[:400]


def _evaluate_checkpoint(run_dir: str, stage: str, base: str, cli: dict, as_float: bool):
    from adj_quant.recipe import evaluation

    args = {"ckpt_path": os.path.join(run_dir, stage), "config": base, "progress": False,
            "output": os.path.join(run_dir, "quant_info.json"), "float_model": as_float}
    args.update({k: v for k, v in cli.items() if k in evaluation.EVAL_FIELDS and k not in args})
    return evaluation.evaluate_checkpoint(args)


def _evaluate_ptq(run_dir: str, quantization: str, base: str, cli: dict) -> dict:
    """Export the float model to TFLite (dynamic / int8), run it in the interpreter, and
    count its bits: 8-bit weights; activations float (dynamic) or 8-bit (int8); biases
    float (dynamic) or int32 (int8), both counted at 32 bits."""
    from adj_quant import cost as cost_lib
    from adj_quant.recipe import validation
    from adj_quant.recipe.config import resolve
    from adj_quant.recipe.evaluation import evaluate_tflite
    from adj_quant.recipe.export import DEFAULT_REPRESENTATIVE, export
    from adj_quant.recipe.stages import arch_of

    output = os.path.join(run_dir, f"model_{quantization}.tflite")
    exported = export({"ckpt_path": os.path.join(run_dir, "pretrain"), "format": "tflite",
                       "quantization": quantization, "output": output, "overwrite": True,
                       "config": base, "progress": False,
                       "representative_images": DEFAULT_REPRESENTATIVE})
    o = exported["options"]
    accuracy = evaluate_tflite({
        "tflite": output, "dataset": o.dataset, "num_classes": o.num_classes,
        "labels_offset": o.labels_offset, "batch_size": o.batch_size,
        "max_val_images": cli.get("max_val_images", o.max_val_images), "config": base,
        "progress": False})
    o = resolve({"config": base, **cli}, None)
    arch = arch_of(o)
    act = 8 if quantization == "int8" else cost_lib.FLOAT_BITS
    bits = cost_lib.BitAssignment.uniform(arch, 8, act, swish_bits=-1 if act == 32 else 8,
                                          bias_bits=0)
    scores = validation.scores(bits, arch, o.metric_img_size or o.img_size)
    return {"top1": accuracy["top1"], "top5": accuracy["top5"], **scores,
            "tflite": output}


def run_point(spec_path: str) -> int:
    """In a process of its own: the point's stages, then its evaluation -> ``point.json``."""
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    run_dir, base, family = spec["run_dir"], spec["base"], spec["family"]
    flags = {(k.split(".")[0] if "." in k else None, k.split(".")[-1]): v
             for k, v in spec["flags"].items()}
    point = Point(spec["name"], family, spec["label"], flags, spec["stage_keys"])
    started = time.time()
    out = {"name": point.name, "family": family, "label": point.label, "status": "running",
           "reused": [], "stage_seconds": {}}
    path = os.path.join(run_dir, POINT_FILE)
    write_json_atomic(path, out)
    try:
        from adj_quant.recipe import stages

        for stage in FAMILIES[family]:
            store = os.path.join(run_dir, stage)
            record = os.path.join(store, STAGE_FILE)
            if os.path.exists(os.path.join(store, "result.json")):
                owner = _read_json(record) or {}
                if owner.get("trained_by") == point.name:
                    # Trained by this point in a run of the sweep that was then interrupted:
                    # not trained again, and not "reused" (as in an uninterrupted sweep).
                    print(f"[sweep] {stage}: trained by this point before the sweep was "
                          f"interrupted: {os.path.realpath(store)}", flush=True)
                    if "seconds" in owner:
                        out["stage_seconds"][stage] = owner["seconds"]
                    continue
                out["reused"].append(stage)
                print(f"[sweep] {stage}: reusing {os.path.realpath(store)}", flush=True)
                continue
            # Claimed before training, so that a rerun after a kill knows who trained it.
            write_json_atomic(record, {"trained_by": point.name})
            t0 = time.time()
            cli = {"config": base, "run_dir": run_dir, "progress": False,
                   **point.stage_cli(stage)}
            stages.STAGE_FUNCTIONS[stage](cli)
            seconds = time.time() - t0
            out["stage_seconds"][stage] = seconds
            write_json_atomic(record, {"seconds": seconds, "trained_by": point.name})
        last = FAMILIES[family][-1]
        cli = point.stage_cli(last)
        if family in ("ptq_dynamic", "ptq_int8"):
            result = _evaluate_ptq(run_dir, family.split("_")[1], base, cli)
        else:
            result = _evaluate_checkpoint(run_dir, last, base, cli, family == "float")
        out.update({k: result[k] for k in ("top1", "top5", "avg_weight_bits", "avg_act_bits",
                                           "score_micronet", "score_adjq", "params", "ops")},
                   status="done", error="")
    except BaseException as err:  # noqa: BLE001 (recorded; the sweep goes on)
        import traceback

        traceback.print_exc()
        out.update(status="failed", error=_one_line(err))
        if isinstance(err, KeyboardInterrupt):
            out.update(status="interrupted")
    out["wall_s"] = time.time() - started
    write_json_atomic(path, out)
    return 0 if out["status"] == "done" else 1


# --------------------------------------------------------------------------- the scheduler


def _spawn(sweep: Sweep, sweep_dir: str, point: Point) -> subprocess.Popen:
    directory = link_stages(sweep_dir, point)
    spec = {"name": point.name, "family": point.family, "label": point.label,
            "flags": point.flag_columns(), "stage_keys": point.stage_keys,
            "run_dir": directory, "base": sweep.base}
    spec_path = os.path.join(directory, "point_spec.json")
    write_json_atomic(spec_path, spec)
    log = open(os.path.join(directory, LOG_FILE), "a", encoding="utf-8")  # noqa: SIM115
    log.write(f"\n===== {time.strftime('%Y-%m-%d %H:%M:%S')} {point.name}\n")
    log.flush()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    process = subprocess.Popen([sys.executable, "-m", "adj_quant.cli.sweep", "--_point", spec_path],
                               stdout=log, stderr=subprocess.STDOUT, env=env)
    process.log = log  # type: ignore[attr-defined]
    return process


def write_csv(sweep: Sweep, sweep_dir: str) -> str:
    # The flags that tell points apart (those every point has alike are in sweep.toml).
    flag_names = [n for n in sorted({n for p in sweep.points for n in p.flag_columns()})
                  if n != "seed" and len({json.dumps(p.flag_columns().get(n))
                                          for p in sweep.points}) > 1]
    rows = []
    for point in sweep.points:
        result = read_point(sweep_dir, point) or {}
        row = {"point": point.name, "family": point.family, "label": point.label,
               "seed": point.flag_columns().get("seed", "")}
        row.update({n: point.flag_columns().get(n, "") for n in flag_names})
        row.update({k: result.get(k, "") for k in CSV_RESULTS})
        row["reused"] = "+".join(result.get("reused", []))
        row["status"] = result.get("status", "pending")
        if isinstance(row["wall_s"], float):
            row["wall_s"] = round(row["wall_s"], 1)
        rows.append(row)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, ["point", "family", "label", "seed", *flag_names,
                                     *CSV_RESULTS], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    path = os.path.join(sweep_dir, "sweep.csv")
    write_atomic(path, buffer.getvalue().encode())
    return path


def write_hparams(sweep: Sweep, sweep_dir: str) -> None:
    """TensorBoard's HParams view: one run per finished point (written once)."""
    import tensorflow as tf
    from tensorboard.plugins.hparams import api as hp

    root = os.path.join(sweep_dir, "tensorboard")
    metrics = ["top1", "top5", "score_micronet", "score_adjq", "avg_weight_bits",
               "avg_act_bits"]
    with tf.summary.create_file_writer(root).as_default():
        hp.hparams_config(hparams=[hp.HParam("family"), hp.HParam("label")] + [
            hp.HParam(n) for n in sorted({n for p in sweep.points for n in p.flag_columns()})],
            metrics=[hp.Metric(m) for m in metrics])
    for point in sweep.points:
        result = read_point(sweep_dir, point)
        directory = os.path.join(root, point.name)
        if not result or result.get("status") != "done" or os.path.isdir(directory):
            continue
        with tf.summary.create_file_writer(directory).as_default():
            hp.hparams({"family": point.family, "label": point.label,
                        **point.flag_columns()}, trial_id=point.name)
            for m in metrics:
                tf.summary.scalar(m, result[m], step=0)


def reuse_report(sweep: Sweep, sweep_dir: str) -> tuple[float, float]:
    """``(seconds trained, seconds reuse saved)``: what reused stages took when trained."""
    trained = saved = 0.0
    for point in sweep.points:
        result = read_point(sweep_dir, point) or {}
        trained += sum(result.get("stage_seconds", {}).values())
        for stage in result.get("reused", []):
            try:
                with open(os.path.join(stage_store(sweep_dir, point.stage_keys[stage]),
                                       STAGE_FILE), encoding="utf-8") as f:
                    saved += json.load(f)["seconds"]
            except (OSError, ValueError, KeyError):
                pass
    return trained, saved


def dry_run(sweep: Sweep, sweep_dir: str) -> None:
    first: dict[str, str] = {}
    runs = sum(len(p.stage_keys) for p in sweep.points)
    for point in sweep.points:
        done = read_point(sweep_dir, point)
        state = " (finished)" if done and done.get("status") == "done" else ""
        parts = []
        for stage, key in point.stage_keys.items():
            if stage_finished(sweep_dir, key):
                parts.append(f"{stage} reused (trained)")
            elif key in first:
                parts.append(f"{stage} reused from {first[key]}")
            else:
                first[key] = point.name
                parts.append(f"{stage} trains")
        print(f"{point.name}{state}: " + ", ".join(parts))
    print(f"{len(sweep.points)} points; {len(first)} stage runs to train, {runs} without "
          f"reuse; sweep directory {sweep_dir}")


def run_sweep(sweep: Sweep, sweep_dir: str, jobs: int, progress: bool) -> dict:
    from tqdm import tqdm

    from adj_quant.directory_lock import DirectoryLock

    with DirectoryLock(sweep_dir, "sweep directory"):
        with open(sweep.path, "rb") as f:
            write_atomic(os.path.join(sweep_dir, "sweep.toml"), f.read())
        todo = [p for p in sweep.points if (read_point(sweep_dir, p) or {}).get("status") != "done"]
        bar = tqdm(total=len(sweep.points), initial=len(sweep.points) - len(todo),
                   desc="sweep", unit="point", disable=not progress)
        running: dict[str, tuple[Point, subprocess.Popen]] = {}
        claimed: set[str] = set()
        started = time.time()
        try:
            while todo or running:
                for point in list(todo):
                    if len(running) >= jobs:
                        break
                    needs = {k for k in point.stage_keys.values()
                             if not stage_finished(sweep_dir, k)}
                    if needs & claimed:
                        continue  # another point is training a stage it shares
                    todo.remove(point)
                    claimed |= needs
                    running[point.name] = (point, _spawn(sweep, sweep_dir, point))
                    bar.set_postfix_str(point.name[:40])
                time.sleep(0.2)
                for name, (point, process) in list(running.items()):
                    if process.poll() is None:
                        continue
                    process.log.close()
                    del running[name]
                    claimed -= set(point.stage_keys.values())
                    result = read_point(sweep_dir, point) or {}
                    if result.get("status") != "done":
                        if result.get("status") in (None, "running"):
                            result.update(status="failed", error=f"the point's process ended "
                                          f"with status {process.returncode}; see its log")
                            write_json_atomic(os.path.join(point_dir(sweep_dir, point),
                                                           POINT_FILE), result)
                        tqdm.write(f"[sweep] {name} failed: {result.get('error')} (log: "
                                   f"{os.path.join(point_dir(sweep_dir, point), LOG_FILE)})",
                                   file=sys.stderr)
                    else:
                        tqdm.write(f"[sweep] {name}: top-1 {100 * result['top1']:.2f}%, "
                                   f"score_micronet {result['score_micronet']:.4f}")
                    bar.update(1)
                    write_csv(sweep, sweep_dir)
        finally:
            for _, process in running.values():
                process.terminate()
                process.wait()
                process.log.close()
            bar.close()
            csv_path = write_csv(sweep, sweep_dir)
        write_hparams(sweep, sweep_dir)
    trained, saved = reuse_report(sweep, sweep_dir)
    statuses = [(read_point(sweep_dir, p) or {}).get("status", "pending") for p in sweep.points]
    return {"csv": csv_path, "seconds": time.time() - started, "trained_s": trained,
            "saved_s": saved, "done": statuses.count("done"),
            "failed": len(statuses) - statuses.count("done")}
