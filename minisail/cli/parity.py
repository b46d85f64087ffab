"""`python -m minisail parity`: run golden cases produced by the official upstream code.

Under `torchrun --nproc-per-node N`: with `--tp N` every case runs tensor parallel over the N ranks (each holds
1/N of the sharded weights); without `--tp` the cases are split across the ranks (data parallel) and the results
gathered. Rank 0 prints (minisail/parallel/)."""

from __future__ import annotations

import argparse
import math
import sys


def _add_parity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", nargs="+", metavar="CASE_DIR", help="golden case folders (checkpoint/, inputs, ...)")
    parser.add_argument(
        "--tolerance",
        type=_tolerance,
        help="max abs difference allowed (default 1e-4; 0.1 for cases recorded in bf16)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with every result as the last line")
    parser.add_argument(
        "--tp",
        type=int,
        metavar="N",
        help="tensor parallel over N ranks (launch with torchrun --nproc-per-node N); without it, torchrun's ranks "
        "split the cases between them",
    )


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number >= 0")
    return value


def _run_parity(args) -> int:
    import json

    from minisail.parallel import launch
    from minisail.parallel.data import map_over_ranks
    from minisail.parity import run_case, run_case_or_report

    launch.start(args.tp)
    try:
        with launch.peers_failing():
            if args.tp is not None and args.tp > 1:  # every rank runs every case, each with its slices
                results = []
                for case in args.cases:
                    results.append(run_case(case, tolerance=args.tolerance, tp=args.tp))  # an error stops every rank
                    print(results[-1].line(), flush=True)
            else:  # data parallel (or one process): each rank its own cases, gathered in order
                single = launch.world_size() == 1
                results = map_over_ranks(
                    lambda case: run_case_or_report(case, tolerance=args.tolerance),
                    args.cases,
                    on_result=(lambda result: print(result.line(), flush=True)) if single else None,
                )
                if not single:
                    print("\n".join(result.line() for result in results), flush=True)
            launch.finish()
    finally:
        launch.stop()
    failed = [r.case for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        print(json.dumps({"results": [r.to_json() for r in results], "failed": failed}))
    errors = [r for r in results if r.error is not None]
    for result in errors:  # also where errors go: a case that could not run is an error, exit status 2
        print(f"minisail: error: {result.case}: {result.error}", file=sys.stderr)
    return 2 if errors else 1 if failed else 0


COMMAND = (
    "compare minisail with golden outputs of the official code",
    _add_parity,
    _run_parity,
)
