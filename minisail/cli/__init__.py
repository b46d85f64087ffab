"""Command-line entry point: `python -m minisail <command> ...`.

Argument parsing only; every command calls into the library. Each command is one module here (prompt, tiles,
parity, chat) with an `_add_<name>` function that declares its arguments and a `_run_<name>` function
that does the work, exported as `COMMAND = (help, add, run)`.
A command that takes `--json` prints one JSON object as its last line of standard output.
A `MinisailError` is printed as `minisail: error: ...` with exit status 2, never as a traceback (with `--json`,
the last line of standard output is then {"error": ..., "kind": the error's class}; a usage error, which exits
with status 2 as argparse does, ends it with {"error": ..., "kind": "UsageError"}).
Output piped into a reader that stops early (`python -m minisail prompt ... | head -1`) ends the command
quietly with status 141 (128 + SIGPIPE, what a shell reports for a command killed by it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from minisail.cli import chat, parity, prompt, tiles
from minisail.errors import MinisailError

# name -> (help, add_arguments(parser), run(args) -> exit code)
COMMANDS: dict[str, tuple[str, object, object]] = {
    module.__name__.rpartition(".")[2]: module.COMMAND for module in (prompt, tiles, parity, chat)
}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, its usage error kept on the SystemExit, for --json's last line."""

    def error(self, message):
        self.print_usage(sys.stderr)
        exit = SystemExit(2)
        exit.usage_error = f"{self.prog}: error: {message}"
        print(exit.usage_error, file=sys.stderr)
        raise exit


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m minisail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a terminal that is not UTF-8 gets escapes, not a traceback
        if callable(getattr(stream, "reconfigure", None)):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit:  # a usage error (status 2); --help exits 0 without one
        given = sys.argv[1:] if argv is None else [str(a) for a in argv]
        if getattr(exit, "usage_error", None) is not None and "--json" in given:
            print(json.dumps({"error": exit.usage_error, "kind": "UsageError"}), flush=True)
        raise
    _help, _add, run = COMMANDS[args.command]
    try:
        code = int(run(args) or 0)
        sys.stdout.flush()  # here, inside the try: a closed pipe shows up on the last write
        return code
    except BrokenPipeError:
        silence_stdout()
        return BROKEN_PIPE_STATUS
    except MinisailError as error:
        rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE", "1")
        where = f"rank {rank} of {world}: " if rank is not None and world != "1" else ""  # under torchrun: who
        print(f"minisail: error: {where}{error}", file=sys.stderr)
        if getattr(args, "json", False):  # --json: the last line is one JSON object, on failure too
            try:
                print(json.dumps({"error": f"{where}{error}", "kind": type(error).__name__}), flush=True)
            except BrokenPipeError:
                silence_stdout()
        return 2
    except KeyboardInterrupt:
        return 130


BROKEN_PIPE_STATUS = 141


def silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's own flush at exit does not hit the closed pipe again
    (the recipe in Python's signal module documentation, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real file descriptor (stdout replaced, e.g. under pytest)
        pass
