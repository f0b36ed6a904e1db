"""Plot a quantization sweep: top-1 accuracy against model cost, with the Pareto front.

    adjq-pareto sweep.csv                      # writes pareto.png next to sweep.csv
    adjq-pareto sweep.csv --output fig.png --title "digits, EfficientNet-B0 w0.25"
    python -m adj_quant.cli.pareto sweep.csv

Input: the ``sweep.csv`` of a sweep, one row per run. The columns read are ``point`` (a
name), ``family`` (float, ptq_dynamic, ptq_int8, uniform_qat, lsq, adjq and their sparse
variants uniform_qat_gmp, lsq_gmp, adjq_gmp, adjq_learned; any other name is
drawn with a default marker), ``status``, ``top1`` (a fraction 0..1), ``score_micronet``
and ``score_adjq`` (required), and ``label`` (a short text such as "W4A4" or
"metric 0.15"), ``seed``, ``avg_weight_bits`` and ``avg_act_bits`` (optional). Other
columns are ignored. Rows whose status is not "done", or without a top-1 or a score, are
skipped and counted in one line on stderr.

Runs of the same family and label (the same setting with different seeds) become one
point: the mean top-1 and mean scores, with the min-max range of top-1 kept as an error
bar and ``n`` the number of runs. (A sweep's label names the setting, all flags but the
seed; an empty label is one setting of its family too.)

Reading the plot: one PNG with two panels, top-1 accuracy (%) against the official
MicroNet score (left) and against the Adjustable Quantization submission's own score
(right). A lower score (a cheaper model) and a higher accuracy are better, so the best
points are up and to the left. Each family has its own marker and colour; each point is
annotated with its bits ("W4A4" for a fixed bit width, "2.4/5.6 b" for the average
weight/activation bits of a learned assignment). The step line is the Pareto front over
all points of all families: for a score budget on the x axis, it gives the best top-1
reached at or below that cost; a point below the line is beaten by a cheaper and at least
as accurate one.

On stdout: the path written, then the points on each front, one line each.
"""

from __future__ import annotations

import collections
import csv
import io
import math
import os
import sys
from typing import Iterable, Mapping, Sequence

from adj_quant.errors import UserError

REQUIRED_COLUMNS = ("point", "family", "status", "top1", "score_micronet", "score_adjq")
SCORES = (("score_micronet", "MicroNet score (official counting)"),
          ("score_adjq", "Adjustable Quantization score (its own counting)"))

# family -> (legend name, marker, colour); the order is the legend order.
FAMILIES = {
    "float": ("float", "*", "#222222"),
    "ptq_dynamic": ("TFLite PTQ (dynamic)", "v", "#8c564b"),
    "ptq_int8": ("TFLite PTQ (int8)", "^", "#e377c2"),
    "uniform_qat": ("uniform QAT", "s", "#1f77b4"),
    "lsq": ("LSQ+", "D", "#2ca02c"),
    "adjq": ("Adjustable Quantization", "o", "#d62728"),
    "uniform_qat_gmp": ("uniform QAT + magnitude pruning", "s", "#17becf"),
    "lsq_gmp": ("LSQ+ + magnitude pruning", "D", "#bcbd22"),
    "adjq_gmp": ("Adjustable Quantization + magnitude pruning", "o", "#ff7f0e"),
    "adjq_learned": ("Adjustable Quantization + learned sparsity", "*", "#9467bd"),
}
_DEFAULT_MARKER = "P"
_SPARE_COLOURS = ("#7f7f7f", "#aec7e8", "#98df8a", "#ff9896", "#c5b0d5")


# ----------------------------------------------------------------------------- reading

def _number(text) -> float | None:
    """A finite float, or None for an empty cell, ``nan``/``inf`` or text that is no number."""
    if text is None:
        return None
    text = str(text).strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def load(path) -> tuple[list[dict], collections.Counter]:
    """``(aggregated points, Counter of skipped rows by reason)``; raises UserError."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file — pass the sweep.csv written by the sweep")
    if not os.path.isfile(path):
        raise UserError(f"{path}: not a file — pass the sweep.csv written by the sweep")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in (reader.fieldnames or [])]
            if not columns:
                raise UserError(f"{path}: empty file, no header row; expected the columns "
                                f"{', '.join(REQUIRED_COLUMNS)}")
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise UserError(f"{path}: missing column{'s' if len(missing) > 1 else ''} "
                                f"{', '.join(repr(c) for c in missing)} (found: "
                                f"{', '.join(columns)})")
            rows = [{(k or "").strip(): v for k, v in row.items()} for row in reader]
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not a UTF-8 text CSV ({err.reason})") from None
    except csv.Error as err:
        raise UserError(f"{path}: not a readable CSV ({err})") from None

    skipped: collections.Counter = collections.Counter()
    groups: dict[tuple, list[dict]] = {}
    for line, row in enumerate(rows, start=2):
        status = (row.get("status") or "").strip().lower()
        if status != "done":
            skipped[status or "no status"] += 1
            continue
        top1 = _number(row.get("top1"))
        scores = {key: _number(row.get(key)) for key, _ in SCORES}
        if top1 is None or None in scores.values():
            skipped["no top1/score"] += 1
            continue
        if not 0.0 <= top1 <= 1.0:
            raise UserError(f"{path} line {line} ({row.get('point')}): top1 {top1:g} is not "
                            f"a fraction in 0..1 (write 0.875, not 87.5)")
        family = (row.get("family") or "").strip() or "unknown"
        label = (row.get("label") or "").strip()
        name = (row.get("point") or "").strip()
        run = {"point": name, "family": family, "label": label,
               "seed": (row.get("seed") or "").strip(), "top1": top1,
               "top5": _number(row.get("top5")),
               "avg_weight_bits": _number(row.get("avg_weight_bits")),
               "avg_act_bits": _number(row.get("avg_act_bits")), **scores}
        groups.setdefault((family, label), []).append(run)
    return [_aggregate(runs) for runs in groups.values()], skipped


def _aggregate(runs: list[dict]) -> dict:
    top1 = [r["top1"] for r in runs]
    names = list(dict.fromkeys(r["point"] for r in runs))
    point = {
        "point": names[0] if len(names) == 1 else " + ".join(names),
        "family": runs[0]["family"],
        "label": runs[0]["label"],
        "seeds": [r["seed"] for r in runs],
        "n": len(runs),
        "top1": sum(top1) / len(top1),
        "top1_min": min(top1),
        "top1_max": max(top1),
    }
    for key in ("top5", "avg_weight_bits", "avg_act_bits") + tuple(k for k, _ in SCORES):
        point[key] = _mean([r[key] for r in runs])
    return point


def skip_note(skipped: collections.Counter) -> str:
    count = sum(skipped.values())
    parts = ", ".join(f"{n} {reason}" for reason, n in sorted(skipped.items()))
    rows = f"{count} row{'s' if count != 1 else ''}"
    return f"skipped {rows} not done or without a top-1/score ({parts})"


def read_points(path) -> list[dict]:
    """The finished points of a ``sweep.csv``, runs of the same family and label (different
    seeds) averaged into one point.

    Each point is a dict: ``point``, ``family``, ``label``, ``seeds`` (list), ``n`` (number
    of runs), ``top1`` (mean fraction), ``top1_min``/``top1_max`` (range over the runs),
    ``score_micronet``/``score_adjq`` (means), ``top5``/``avg_weight_bits``/``avg_act_bits``
    (means, None when not given). Skipped rows are counted in one line on stderr.
    Raises :class:`UserError` for a missing file or a missing required column."""
    points, skipped = load(path)
    if skipped:
        print(f"note: {os.fspath(path)}: {skip_note(skipped)}", file=sys.stderr)
    return points


# ----------------------------------------------------------------------------- the front

def pareto_front(points: Iterable[Mapping], x_key: str, y_key: str = "top1") -> list:
    """The points that no other point dominates, by ascending ``x_key``.

    A lower ``x`` (cost) and a higher ``y`` (accuracy) are better: a point is dominated if
    another has ``x <=`` and ``y >=`` with at least one strict. Equal points do not
    dominate each other (all are kept). Points whose x or y is missing or not finite are
    left out. Returns the same objects that were passed in."""
    def finite(p):
        x, y = p.get(x_key), p.get(y_key)
        return (x is not None and y is not None
                and math.isfinite(float(x)) and math.isfinite(float(y)))

    ordered = sorted((p for p in points if finite(p)), key=lambda p: (p[x_key], -p[y_key]))
    front: list = []
    best_y = best_x = None  # the highest y so far, and the lowest x that reached it
    for p in ordered:
        x, y = p[x_key], p[y_key]
        if best_y is None or y > best_y:
            best_y, best_x = y, x
            front.append(p)
        elif y == best_y and x == best_x:  # the same (x, y) as the point that set best_y
            front.append(p)
    return front


# ----------------------------------------------------------------------------- drawing

def bits_text(point: Mapping) -> str:
    """The bits of a point from its average bits: "W4A4" when both are whole numbers,
    "2.4/5.6 b" (weight/activation) otherwise, "FP32" for 32/32; "" when not known."""
    w, a = point.get("avg_weight_bits"), point.get("avg_act_bits")
    if w is None or a is None:
        return ""
    if w >= 32 and a >= 32:
        return "FP32"
    if float(w).is_integer() and float(a).is_integer():
        return f"W{w:.0f}A{a:.0f}"
    return f"{w:.1f}/{a:.1f} b"


def annotation(point: Mapping) -> str:
    """The text next to a point: its label, else its bits; a label that does not contain
    the bits (e.g. "metric 0.15" of a learned assignment) gets them on a second line."""
    label, bits = point.get("label") or "", bits_text(point)
    if not label:
        return bits or point.get("point", "")
    if bits and bits not in label:
        return f"{label}\n{bits}"
    return label


def _styles(points: Sequence[Mapping]) -> dict[str, tuple[str, str, str]]:
    """family -> (legend name, marker, colour), in legend order (known families first)."""
    present = list(dict.fromkeys(p["family"] for p in points))
    styles = {f: FAMILIES[f] for f in FAMILIES if f in present}
    spare = iter(_SPARE_COLOURS * (1 + len(present) // len(_SPARE_COLOURS)))
    for family in present:
        if family not in styles:
            styles[family] = (f"{family} (unknown family)", _DEFAULT_MARKER, next(spare))
    return styles


# Where a point's text may go, in points from the point: (dx, dy, ha, va), nearest first.
_PLACES = [(5, 3, "left", "bottom"), (5, -3, "left", "top"), (-5, 3, "right", "bottom"),
           (-5, -3, "right", "top"), (0, 7, "center", "bottom"), (0, -7, "center", "top"),
           (8, 12, "left", "bottom"), (8, -12, "left", "top"), (-8, 12, "right", "bottom"),
           (-8, -12, "right", "top"), (0, 20, "center", "bottom"), (0, -20, "center", "top")]


def _annotate(ax, points, score_key) -> None:
    """Write every point's bits next to it, each text where it overlaps the fewest texts
    and markers already there (after the layout: call with the figure drawn once)."""
    renderer = ax.figure.canvas.get_renderer()
    to_display = ax.transData.transform
    markers = []
    for p in points:
        cx, cy = to_display((p[score_key], 100 * p["top1"]))
        markers.append((cx - 5, cy - 5, cx + 5, cy + 5))
    placed: list[tuple] = []

    def overlap(a, b):
        w = min(a[2], b[2]) - max(a[0], b[0])
        h = min(a[3], b[3]) - max(a[1], b[1])
        return w * h if w > 0 and h > 0 else 0.0

    # Crowded points first: they have the fewest free places.
    for p in sorted(points, key=lambda p: (p[score_key], -p["top1"])):
        xy = (p[score_key], 100 * p["top1"])
        text = ax.annotate(annotation(p), xy, xytext=(0, 0), textcoords="offset points",
                           fontsize=7, color="#333333", zorder=4, annotation_clip=False)
        text.set_in_layout(False)
        own = to_display(xy)
        best = None
        for dx, dy, ha, va in _PLACES:
            text.set_position((dx, dy))
            text.set_ha(ha)
            text.set_va(va)
            box = text.get_window_extent(renderer)
            box = (box.x0 - 1, box.y0 - 1, box.x1 + 1, box.y1 + 1)
            cost = sum(overlap(box, other) for other in placed)
            cost += sum(overlap(box, m) for m in markers
                        if abs(m[0] + 5 - own[0]) > 0.5 or abs(m[1] + 5 - own[1]) > 0.5)
            if best is None or cost < best[0]:
                best = (cost, dx, dy, ha, va, box)
            if cost == 0:
                break
        _, dx, dy, ha, va, box = best
        text.set_position((dx, dy))
        text.set_ha(ha)
        text.set_va(va)
        placed.append(box)


def _panel(ax, points, styles, score_key, score_name, log_x):
    for family, (_, marker, colour) in styles.items():
        members = [p for p in points if p["family"] == family]
        xs = [p[score_key] for p in members]
        ys = [100 * p["top1"] for p in members]
        ax.scatter(xs, ys, marker=marker, color=colour, s=70 if marker == "*" else 42,
                   edgecolors="black", linewidths=0.5, zorder=3)
        for p in members:
            if p["n"] > 1:
                y = 100 * p["top1"]
                ax.errorbar([p[score_key]], [y],
                            yerr=[[y - 100 * p["top1_min"]], [100 * p["top1_max"] - y]],
                            fmt="none", ecolor=colour, elinewidth=1, capsize=3, zorder=2)
    front = pareto_front(points, score_key)
    xs = [p[score_key] for p in front]
    ys = [100 * p["top1"] for p in front]
    right = max(p[score_key] for p in points)
    if xs and right > xs[-1]:  # the best accuracy stays the same for any larger budget
        xs, ys = xs + [right], ys + [ys[-1]]
    ax.step(xs, ys, where="post", color="black", linewidth=1.2, linestyle="--", alpha=0.8,
            zorder=1)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(f"{score_name}: lower is better{' (log scale)' if log_x else ''}")
    ax.set_ylabel("top-1 accuracy (%): higher is better")
    ax.set_title(f"top-1 vs {score_name.split(' (')[0]} (better: up and to the left)",
                 fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.margins(x=0.12, y=0.08)


def render(points: Sequence[Mapping], title: str | None = None) -> bytes:
    """The PNG bytes of :func:`plot`'s figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
    from matplotlib.figure import Figure  # noqa: PLC0415
    from matplotlib.lines import Line2D  # noqa: PLC0415

    if not points:
        raise UserError("no finished points to plot")
    styles = _styles(points)
    fig = Figure(figsize=(14, 6.2), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # the Agg (file-only) canvas: no display needed
    axes = fig.subplots(1, 2)
    for ax, (key, name) in zip(axes, SCORES):
        values = [p[key] for p in points]
        log_x = min(values) > 0 and max(values) / min(values) > 30
        _panel(ax, points, styles, key, name, log_x)
    fig.suptitle(title or "top-1 accuracy vs model cost score: better is up and to the left "
                          "(lower score, higher top-1)", fontsize=12)
    handles = [Line2D([], [], marker=m, color=c, markeredgecolor="black",
                      markeredgewidth=0.5, linestyle="none", markersize=9 if m == "*" else 7,
                      label=name) for name, m, c in styles.values()]
    handles.append(Line2D([], [], color="black", linestyle="--",
                          label="Pareto front (all points)"))
    if any(p["n"] > 1 for p in points):
        handles.append(Line2D([], [], color="grey", marker="|", markersize=10,
                              linestyle="none",
                              label="mean of n seeds, bar = min-max top-1"))
    fig.legend(handles=handles, loc="outside lower center", ncol=min(len(handles), 5),
               fontsize=9, frameon=False)
    fig.draw_without_rendering()  # the layout first: the texts are placed in its pixels
    for ax, (key, _) in zip(axes, SCORES):
        _annotate(ax, points, key)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def plot(points: Sequence[Mapping], output, title: str | None = None) -> str:
    """Write one PNG, two panels (top-1 % against ``score_micronet`` and ``score_adjq``),
    each with every family's points, their bits and the Pareto front over all points.
    Returns the path written (atomically: a reader never sees half a file)."""
    from adj_quant.files import write_atomic  # noqa: PLC0415

    output = os.fspath(output)
    data = render(points, title)
    parent = os.path.dirname(os.path.abspath(output))
    os.makedirs(parent, exist_ok=True)
    write_atomic(output, data)
    return output


def describe(point: Mapping, key: str) -> str:
    """One line of a point on the ``key`` front: score, top-1, family, bits, seeds."""
    text = annotation(point).replace("\n", ", ")
    seeds = f", n={point['n']} (top-1 {100 * point['top1_min']:.2f}-" \
            f"{100 * point['top1_max']:.2f}%)" if point["n"] > 1 else ""
    name = FAMILIES.get(point["family"], (point["family"],))[0]
    return (f"  {key} {point[key]:.6g}  top-1 {100 * point['top1']:.2f}%  {name}"
            f"{': ' + text if text else ''}  [{point['point']}]{seeds}")
