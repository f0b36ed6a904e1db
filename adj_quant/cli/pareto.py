"""``adjq-pareto``: plot a sweep's top-1 against both MicroNet scores, with the Pareto front.

    adjq-pareto sweep.csv                      # writes pareto.png next to sweep.csv
    adjq-pareto sweep.csv --output fig.png --title "digits, EfficientNet-B0 w0.25"

What is read and drawn: :mod:`adj_quant.recipe.pareto`. On stdout: the path written, then
the points on each front, one line each.
"""

from __future__ import annotations

import argparse
import os
import sys

from adj_quant.errors import OneLineParser, UserError, cli_main
from adj_quant.recipe import pareto


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="adjq-pareto", description=pareto.__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", help="the sweep.csv of a sweep (one row per run)")
    p.add_argument("--output", default=None, metavar="PNG",
                   help="the PNG to write (default: pareto.png next to the CSV)")
    p.add_argument("--title", default=None,
                   help="the figure's title, e.g. the data set and network (default: a "
                        "generic 'top-1 vs score, better is up-left' title)")
    return p


@cli_main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    output = args.output
    if output is None:
        output = os.path.join(os.path.dirname(os.path.abspath(args.csv)), "pareto.png")
    elif not output.lower().endswith(".png"):
        raise UserError(f"--output {output}: the plot is a PNG; give a path ending in .png")
    if os.path.isdir(output):
        raise UserError(f"--output {output}: is a directory; give a file name such as "
                        f"{os.path.join(output, 'pareto.png')}")
    points, skipped = pareto.load(args.csv)
    if not points:
        note = f"; {pareto.skip_note(skipped)}" if skipped else " (no rows)"
        raise UserError(f"{args.csv}: no finished points to plot{note}")
    if skipped:
        print(f"note: {args.csv}: {pareto.skip_note(skipped)}", file=sys.stderr)
    written = pareto.plot(points, output, args.title)
    print(f"wrote {written}")
    for key, _ in pareto.SCORES:
        front = pareto.pareto_front(points, key)
        print(f"Pareto front on {key} ({len(front)} of {len(points)} points):")
        for point in front:
            print(pareto.describe(point, key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
