"""The ``lsa`` command: run notebooks over a grid, build the toy zoo, reproduce the paper's analyses.

lsa run NOTEBOOK... --model M... --language L... [-p key=value ...] [--output DIR] [--cell-timeout S] [--jobs N]
lsa zoo build [--only NAME ...] [--minutes M]
lsa reproduce [--output DIR] [--cell-timeout S] [--jobs N] [--no-real]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path


def _run(args: argparse.Namespace) -> int:
    from lsa import runner

    output = Path(args.output or Path("runs") / time.strftime("%Y%m%d-%H%M%S"))
    try:
        params = runner.parse_params(args.param)
        if args.preset:
            cells = runner.plan_preset(args.preset, output, random=args.random, params=params, notebooks=args.notebooks)
        elif not args.notebooks:
            raise runner.GridError("name at least one notebook, or a --preset")
        else:
            models, languages = args.model or ["toy-bilingual"], args.language or ["en"]
            cells = runner.plan(args.notebooks, models, languages, params, output)
    except runner.GridError as exc:
        print(f"lsa run: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        for cell in cells:
            print(f"{cell.label}  ->  {cell.folder}")
        print(f"{len(cells)} run(s)")
        return 0
    try:
        result = runner.run_grid(
            cells,
            overwrite=args.overwrite,
            skip_existing=args.skip_existing,
            kernel=args.kernel,
            cell_timeout=args.cell_timeout,
            jobs=args.jobs,
        )
    except runner.GridError as exc:
        print(f"lsa run: {exc}", file=sys.stderr)
        return 2
    table = result.table()
    print(table[["notebook", "model", "language", "status", "wall_s"]].to_string(index=False))
    for cell in result.failed:
        print(f"\nFAILED {cell.label}\n  {cell.error}\n  see {cell.folder / 'notebook.ipynb'}", file=sys.stderr)
    print(f"\nresults in {output}")
    return 1 if result.failed else 0


def _zoo(args: argparse.Namespace) -> int:
    from lsa import zoo

    names = tuple(args.only) if args.only else ("toy-bilingual", "toy-en", "toy-zh")
    zoo.build_zoo(names=names, seed=args.seed, minutes=args.minutes)
    return 0


def _reproduce(args: argparse.Namespace) -> int:
    from lsa import reproduce, runner

    try:
        return reproduce.main(
            output=args.output, quick=args.quick, cell_timeout=args.cell_timeout, jobs=args.jobs, real=args.real
        )
    except runner.GridError as exc:
        print(f"lsa reproduce: {exc}", file=sys.stderr)
        return 2


def _add_cell_timeout(parser: argparse.ArgumentParser) -> None:
    from lsa.runner import DEFAULT_CELL_TIMEOUT

    parser.add_argument(
        "--cell-timeout",
        type=int,
        default=DEFAULT_CELL_TIMEOUT,
        metavar="SECONDS",
        help=f"a notebook cell running longer fails its grid cell; the others still run (default {DEFAULT_CELL_TIMEOUT}, 0: no limit)",
    )


def _add_jobs(parser: argparse.ArgumentParser, default: int) -> None:
    parser.add_argument(
        "--jobs",
        "-j",
        type=int,
        default=default,
        metavar="N",
        help=f"notebooks run at once, each in its own kernel (default {default}); a cell that reads another's "
        "results waits for it",
    )


def build_parser() -> argparse.ArgumentParser:
    from lsa.runner import PRESETS

    parser = argparse.ArgumentParser(prog="lsa", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="execute notebooks over models x languages x parameters")
    run.add_argument("notebooks", nargs="*", help="notebook paths or names under notebooks/ (e.g. quickstart)")
    run.add_argument("--model", "-m", nargs="+", help="model ids, paths or zoo names (default toy-bilingual)")
    run.add_argument("--language", "-l", nargs="+", help="languages (default en); 'en+zh' = one run with both")
    run.add_argument("--preset", help="a named grid: " + ", ".join(sorted(PRESETS)) + " (notebooks given = a subset)")
    run.add_argument(
        "--random",
        action="store_true",
        help="with --preset: random models with the same layer and head counts (offline)",
    )
    run.add_argument("--param", "-p", action="append", help="key=value (repeat a key to make a grid)")
    run.add_argument("--output", "-o", help="output folder (default runs/<timestamp>)")
    run.add_argument("--overwrite", action="store_true", help="replace results already in the output folder")
    run.add_argument("--skip-existing", action="store_true", help="keep results already there, run the rest")
    run.add_argument("--kernel", help="Jupyter kernel name (default: the notebook's kernelspec)")
    _add_cell_timeout(run)
    _add_jobs(run, 1)
    run.add_argument("--dry-run", action="store_true", help="list the grid and stop")
    run.set_defaults(func=_run)

    zoo = sub.add_parser("zoo", help="the toy model zoo")
    zoo_sub = zoo.add_subparsers(dest="zoo_command", required=True)
    build = zoo_sub.add_parser("build", help="generate the corpus and train the zoo models into data/models")
    build.add_argument("--only", nargs="+", help="train only these (toy-bilingual, toy-en, toy-zh)")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--minutes", type=float, help="training budget per model")
    build.set_defaults(func=_zoo)

    rep = sub.add_parser(
        "reproduce", help="run every analysis on the toy zoo and the real pretrained models, and write a report"
    )
    rep.add_argument("--output", "-o", help="output folder (default runs/reproduce-<timestamp>)")
    rep.add_argument("--quick", action="store_true", help="small prompt sets (for tests)")
    rep.add_argument(
        "--no-real",
        dest="real",
        action="store_false",
        help="the toy zoo only, without the real pretrained models' section",
    )
    _add_cell_timeout(rep)
    _add_jobs(rep, min(2, os.cpu_count() or 1))
    rep.set_defaults(func=_reproduce)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
