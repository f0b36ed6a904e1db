"""``adjq-sweep``: many runs of the recipe and its baselines from one TOML file, sharing stages.

    adjq-sweep configs/sweeps/digits_pareto.toml                 # runs/sweeps/digits_pareto
    adjq-sweep configs/sweeps/digits_pareto.toml --dry_run       # the points, what each reuses
    adjq-sweep FILE.toml --jobs 2 --sweep_dir runs/my_sweep      # two points at a time

The sweep file, stage reuse, resuming and the output are described in
:mod:`adj_quant.recipe.sweep` and docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from adj_quant.cli.start import start
from adj_quant.errors import OneLineParser, UserError, cli_main
from adj_quant.recipe import sweep as sweep_lib


def parse(argv=None) -> argparse.Namespace:
    p = OneLineParser(prog="adjq-sweep", description=sweep_lib.__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("sweep_file", metavar="SWEEP.toml", nargs="?", help="the sweep file (see "
                   "configs/sweeps/ and docs/sweeps.md)")
    p.add_argument("--sweep_dir", default=None, help="where the points, shared stages, "
                   "sweep.csv and tensorboard/ go (default: runs/sweeps/<the file's name>)")
    p.add_argument("--jobs", type=int, default=1, help="points trained at the same time, each "
                   "in its own process")
    p.add_argument("--dry_run", action="store_true", help="list the points and which stages "
                   "each trains or reuses; run nothing")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="a progress bar over the points")
    p.add_argument("--_point", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


@cli_main
def main(argv=None) -> None:
    start(xla=True)
    args = parse(argv)
    if args._point:  # noqa: SLF001 (a point's own process)
        sys.exit(sweep_lib.run_point(args._point))
    if args.sweep_file is None:
        raise UserError("pass a sweep file, e.g. configs/sweeps/digits_pareto.toml (see "
                        "adjq-sweep --help)")
    if args.jobs < 1:
        raise UserError(f"--jobs {args.jobs} must be at least 1")
    sweep = sweep_lib.load_sweep(args.sweep_file)
    sweep_dir = args.sweep_dir or os.path.join("runs", "sweeps", sweep.name)
    if os.path.exists(sweep_dir) and not os.path.isdir(sweep_dir):
        raise UserError(f"--sweep_dir {sweep_dir} is a file; pass a directory")
    if args.dry_run:
        sweep_lib.dry_run(sweep, sweep_dir)
        return
    summary = sweep_lib.run_sweep(sweep, sweep_dir, args.jobs,
                                  args.progress and sys.stderr.isatty())
    print(f"{summary['done']} of {len(sweep.points)} points done"
          + (f", {summary['failed']} not (see sweep.csv)" if summary["failed"] else "")
          + f" in {summary['seconds'] / 60:.1f} min; stage reuse saved "
          f"{summary['saved_s'] / 60:.1f} min of training ({summary['trained_s'] / 60:.1f} min "
          f"trained)\n{summary['csv']}")
    if summary["failed"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
