"""`python -m minisail parity`: run golden cases produced by the official upstream code."""

from __future__ import annotations

import argparse


def _add_parity(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("cases", nargs="+", metavar="CASE_DIR", help="golden case folders (checkpoint/, inputs, ...)")
    parser.add_argument(
        "--tolerance", type=float, help="max abs difference allowed (default 1e-4; 0.1 for cases recorded in bf16)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object with every result as the last line")


def _run_parity(args) -> int:
    import json

    from minisail.parity import run_case

    results = []
    for case in args.cases:
        result = run_case(case, tolerance=args.tolerance)
        print(result.line(), flush=True)
        results.append(result)
    failed = [r.case for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if args.json:
        print(json.dumps({"results": [r.to_json() for r in results], "failed": failed}))
    return 1 if failed else 0


COMMAND = (
    "compare minisail with golden outputs of the official code",
    _add_parity,
    _run_parity,
)
