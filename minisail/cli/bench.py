"""`python -m minisail bench`: speed and memory at a model's real shapes, against transformers."""

from __future__ import annotations

import argparse

from minisail.errors import MinisailError


def _add_bench(parser: argparse.ArgumentParser) -> None:
    from minisail.bench.presets import PRESETS

    parser.add_argument(
        "--preset", default="sail-vl-2b", choices=list(PRESETS), help="model shapes (default sail-vl-2b)"
    )
    parser.add_argument("--quick", action="store_true", help="1 load, fewer repeats, 16 tokens: under 3 minutes (CI)")
    parser.add_argument(
        "--dtype", action="append", choices=("fp32", "bf16", "int8"), help="repeat to pick (default all)"
    )
    parser.add_argument("--new-tokens", type=int, metavar="N", help="tokens to decode per run (default 64, quick 16)")
    parser.add_argument("--repeats", type=int, metavar="N", help="repeats of the short measurements (default 5)")
    parser.add_argument("--threads", type=int, metavar="N", help="torch threads in the workers (default: torch's)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers even if it is installed")
    parser.add_argument(
        "--compile", action="store_true", help="minisail decodes through torch.compile (minutes to compile, 2nd copy)"
    )
    parser.add_argument("--cache", metavar="DIR", help="checkpoint cache folder (default ~/.cache/minisail/bench)")
    parser.add_argument("--clean", action="store_true", help="delete the benchmark's cached checkpoints and exit")
    parser.add_argument("--json", action="store_true", help="accepted for symmetry: the JSON line is always printed")


def _run_bench(args) -> int:
    import json
    from pathlib import Path

    from minisail.bench import Settings, get_preset, run_bench
    from minisail.bench.checkpoints import DEFAULT_CACHE, clean_cache
    from minisail.bench.report import format_table

    cache = Path(args.cache).expanduser() if args.cache else DEFAULT_CACHE
    if args.clean:
        removed = clean_cache(cache)
        print(f"removed {len(removed)} cached benchmark checkpoint folder(s) from {cache}")
        return 0
    overrides = {"compare": not args.no_transformers, "threads": args.threads, "compile": args.compile}
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


COMMAND = (
    "benchmark speed and memory at a model's real shapes (vs transformers)",
    _add_bench,
    _run_bench,
)
