"""`python -m bench`, from the repository root: speed and memory at real shapes, against transformers and llama.cpp.

The benchmark is not part of the installed package (it compares with `transformers`, which nothing under
minisail/ may import), so it is started from a checkout. Prints a table, then one JSON object as the last line.
A `MinisailError` (a bad flag value, too little disk) is printed as `bench: error: ...` with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from minisail.errors import MinisailError


def build_parser() -> argparse.ArgumentParser:
    from bench.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", default="sail-vl-2b", choices=list(PRESETS), help="model shapes (default sail-vl-2b)"
    )
    parser.add_argument("--quick", action="store_true", help="1 load, fewer repeats, 16 tokens: under 3 minutes (CI)")
    parser.add_argument(
        "--dtype", action="append", choices=("fp32", "bf16", "int8", "int4"), help="repeat to pick (default all)"
    )
    parser.add_argument("--new-tokens", type=int, metavar="N", help="tokens to decode per run (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, metavar="N", help="repeats of the short measurements (default 5)")
    parser.add_argument(
        "--threads", type=int, metavar="N", help="threads per worker, torch's and llama.cpp's (default: torch's)"
    )
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers even if it is installed")
    parser.add_argument(
        "--llama",
        action=argparse.BooleanOptionalAction,
        help="compare with llama.cpp (needs the llama extra; default: yes where installed, no with --quick)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="minisail decodes through torch.compile (minutes to compile, 2nd copy)"
    )
    parser.add_argument("--cache", metavar="DIR", help="checkpoint cache folder (default ~/.cache/minisail/bench)")
    parser.add_argument("--clean", action="store_true", help="delete the benchmark's cached checkpoints and exit")
    parser.add_argument("--json", action="store_true", help="accepted for symmetry: the JSON line is always printed")
    return parser


def run(args: argparse.Namespace) -> int:
    from bench import Settings, get_preset, run_bench
    from bench.checkpoints import DEFAULT_CACHE, clean_cache
    from bench.report import format_table

    cache = Path(args.cache).expanduser() if args.cache else DEFAULT_CACHE
    if args.clean:
        removed = clean_cache(cache)
        print(f"removed {len(removed)} cached benchmark checkpoint folder(s) from {cache}")
        return 0
    overrides = {"compare": not args.no_transformers, "threads": args.threads, "compile": args.compile}
    if args.llama is not None:
        overrides["llama"] = args.llama
    if args.dtype:
        overrides["dtypes"] = tuple(dict.fromkeys(args.dtype))
    if args.new_tokens is not None:
        overrides["new_tokens"] = args.new_tokens
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    for name in ("new_tokens", "repeats", "threads"):
        value = overrides.get(name)
        if value is not None and value < 1:
            raise MinisailError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    settings = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    report = run_bench(get_preset(args.preset), cache, settings)
    print(format_table(report))
    print(json.dumps(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except MinisailError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
