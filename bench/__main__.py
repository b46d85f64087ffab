"""`python -m bench`, from the repository root: speed and memory at real shapes, against transformers and llama.cpp.

The benchmark is not part of the installed package (it compares with `transformers`, which nothing under
minisail/ may import), so it is started from a checkout. Prints a table, then one JSON object as the last line.
A `MinisailError` (a bad flag value, too little disk, a cache folder it cannot write) is printed as
`bench: error: ...` with exit status 2 (a usage error too, from argparse), the last line then being
{"error": ..., "kind": ...}. Output piped into a reader that stops early ends quietly with status 141.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from minisail.cli import BROKEN_PIPE_STATUS, silence_stdout
from minisail.errors import MinisailError


def build_parser() -> argparse.ArgumentParser:
    from bench.presets import PRESETS

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", choices=list(PRESETS), help="model shapes (default sail-vl-2b; with --clean: only its entries)"
    )
    parser.add_argument("--quick", action="store_true", help="1 load, fewer repeats, 16 tokens: under 3 minutes (CI)")
    parser.add_argument(
        "--dtype",
        action="append",
        choices=("fp32", "bf16", "int8", "int4"),
        help="repeat to pick (default fp32, bf16, int8; --quick: bf16 and int8 where bf16 is native, else fp32)",
    )
    parser.add_argument(
        "--new-tokens", type=int, metavar="N", help="tokens to generate per run, at least 2 (default 64, quick 16)"
    )
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
    parser.add_argument(
        "--clean",
        action="store_true",
        help="delete the benchmark's cached checkpoints (of --preset, if given) and exit",
    )
    parser.add_argument("--json", action="store_true", help="accepted for symmetry: the JSON line is always printed")
    return parser


def run(args: argparse.Namespace) -> int:
    from bench import Settings, get_preset, run_bench
    from bench.checkpoints import DEFAULT_CACHE, clean_cache
    from bench.report import format_table

    if args.cache is not None and not args.cache.strip():
        raise MinisailError("--cache is empty: give a folder (or leave the option out for ~/.cache/minisail/bench)")
    cache = Path(args.cache).expanduser() if args.cache is not None else DEFAULT_CACHE
    if args.clean:
        removed = clean_cache(cache, [args.preset] if args.preset else None)
        print(f"removed {len(removed)} cached benchmark checkpoint folder(s) from {cache}")
        print(json.dumps({"cache": str(cache), "removed": [str(path) for path in removed]}))
        return 0
    check_cache_folder(cache)
    overrides = {"compare": not args.no_transformers, "threads": args.threads, "compile": args.compile}
    if args.llama is not None:
        overrides["llama"] = args.llama
    if args.dtype:
        overrides["dtypes"] = tuple(dict.fromkeys(args.dtype))
    if args.new_tokens is not None:
        overrides["new_tokens"] = args.new_tokens
    if args.repeats is not None:
        overrides["repeats"] = args.repeats
    for name, least in (("new_tokens", 2), ("repeats", 1), ("threads", 1)):  # 2 tokens: 1 from the prefill, 1 decoded
        value = overrides.get(name)
        if value is not None and value < least:
            raise MinisailError(f"--{name.replace('_', '-')} must be at least {least}, got {value}")
    settings = Settings.quick(**overrides) if args.quick else Settings(**overrides)
    try:
        report = run_bench(get_preset(args.preset or "sail-vl-2b"), cache, settings)
    except OSError as error:  # the disk filled up (a GGUF export), the cache folder changed under the run, ...
        raise MinisailError(f"{error}: check the space and permissions of the cache folder {cache} (--cache)") from None
    print(format_table(report))
    print(json.dumps(report))
    return 0


def check_cache_folder(cache: Path) -> None:
    """The cache folder exists (or can be made) and can be written, said before any work."""
    if cache.exists() and not cache.is_dir():
        raise MinisailError(f"--cache {cache} is a file, not a folder: point --cache at a folder")
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=cache):
            pass
    except OSError as error:
        raise MinisailError(
            f"cannot write the cache folder {cache} ({error.strerror or error}): point --cache at a writable folder"
        ) from None


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:
        if exit.code not in (0, None):  # a usage error, said on stderr by argparse: the last line is JSON too
            print(json.dumps({"error": "usage error (see above)", "kind": "UsageError"}), flush=True)
        raise
    try:
        code = run(args)
        sys.stdout.flush()  # here: a closed pipe shows up on the last write
        return code
    except MinisailError as error:
        print(f"bench: error: {error}", file=sys.stderr)
        print(json.dumps({"error": str(error), "kind": type(error).__name__}), flush=True)
        return 2
    except BrokenPipeError:  # the reader stopped early (| head): quietly, as the minisail command does
        silence_stdout()
        return BROKEN_PIPE_STATUS
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
