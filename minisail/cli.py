"""Command-line entry point: `python -m minisail <command> ...`.

Argument parsing only; every command calls into the library. Each command is one `_add_<name>` function
that declares its arguments and one `_run_<name>` function that does the work, registered in COMMANDS.
A command that takes `--json` prints one JSON object as its last line of standard output.
A `MinisailError` is printed as `minisail: error: ...` with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import sys

from minisail.errors import MinisailError

# name -> (help, add_arguments(parser), run(args) -> exit code); filled in below, one block per command.
COMMANDS: dict[str, tuple[str, object, object]] = {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m minisail", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments, _run) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _help, _add, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except MinisailError as error:
        print(f"minisail: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


# ---------------------------------------------------------------------------------------------------------
# Commands. Keep each block self-contained: arguments first, then the run function, then registration.
# ---------------------------------------------------------------------------------------------------------


# --- prompt: show exactly what the model sees ------------------------------------------------------------


def _add_prompt(parser: argparse.ArgumentParser) -> None:
    from minisail.text.templates import TEMPLATES

    parser.add_argument("question", help="the user's question; write <image> where an image goes")
    source = parser.add_argument_group("where the template and tokenizer come from (--model, or both of the others)")
    source.add_argument(
        "--model", metavar="DIR", help="checkpoint folder: config.json template/system_message + tokenizer"
    )
    source.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder (tokenizer.json or tokenizer.model)")
    source.add_argument("--template", metavar="NAME", help=f"conversation template: {', '.join(sorted(TEMPLATES))}")
    parser.add_argument("--system", metavar="TEXT", help="replace the template's system message")
    parser.add_argument(
        "--tiles",
        type=int,
        action="append",
        metavar="N",
        help="one per image: its tile count (num_patches_list)",
    )
    parser.add_argument("--tokens-per-tile", type=int, metavar="N", help="image tokens per tile (default 256)")
    parser.add_argument("--history", metavar="FILE", help="JSON list of [question, answer] pairs of earlier turns")
    parser.add_argument(
        "--image-style",
        choices=("placeholder", "prefix"),
        default="placeholder",
        help="placeholder: InternVL2-style chat() (default); prefix: the older <img>...</img>\\n chat()",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object (query, input_ids, ...)")


def _read_json(path, what: str, error_class: type[MinisailError] = MinisailError):
    import json
    from pathlib import Path

    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error_class(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise error_class(f"cannot read {what} {path}: {error}") from None


def _prompt_sources(args):
    """(template, tokenizer folder, tokens per tile from the config or None) from --model or the flags."""
    from pathlib import Path

    from minisail.errors import CheckpointError, ConfigError, TokenizerError
    from minisail.merge import tokens_per_tile
    from minisail.text.templates import get_template, template_for_config

    if args.model:
        if not Path(args.model).is_dir():
            raise CheckpointError(f"checkpoint folder {args.model} does not exist")
        config = _read_json(Path(args.model) / "config.json", "checkpoint config", ConfigError)
        if not isinstance(config, dict):
            raise ConfigError(f"{args.model}/config.json is not a JSON object")
        template = get_template(args.template) if args.template else template_for_config(config)
        folder = args.tokenizer or args.model
        vision = config.get("vision_config") or {}
        size, patch = config.get("force_image_size") or vision.get("image_size"), vision.get("patch_size")
        ratio = config.get("downsample_ratio")
        per_tile = tokens_per_tile(size, patch, ratio) if size and patch and ratio else None
    else:
        if not args.template or not args.tokenizer:
            raise MinisailError("give --model DIR, or both --template NAME and --tokenizer DIR")
        template, folder, per_tile = get_template(args.template), args.tokenizer, None
    if not Path(folder).is_dir():
        raise TokenizerError(f"tokenizer folder {folder} does not exist")
    return template, folder, per_tile


def _compact_ids(ids: list[int], context_id: int | None) -> str:
    """The ids with each run of the image-context id written as `id*N`."""
    import itertools

    parts = []
    for token_id, run in itertools.groupby(ids):
        count = len(list(run))
        parts += [f"{token_id}*{count}"] if token_id == context_id else [str(token_id)] * count
    return "[" + ", ".join(parts) + "]"


def _run_prompt(args) -> int:
    import json

    from minisail.errors import PromptError
    from minisail.text.prompt import (
        IMG_CONTEXT,
        build_query,
        build_yivl_query,
        chat_eos_token_id,
        compact_image_runs,
        encode_queries,
        encode_yivl_query,
    )
    from minisail.text.templates import SINGLE
    from minisail.text.tokenizer import load_tokenizer

    template, folder, config_per_tile = _prompt_sources(args)
    if args.system is not None:
        template = template.with_system_message(args.system)
    if args.tokens_per_tile is not None and args.tokens_per_tile < 1:
        raise PromptError(f"--tokens-per-tile must be at least 1, not {args.tokens_per_tile}")
    history = None
    if args.history:
        history = _read_json(args.history, "history file", PromptError)
        if not isinstance(history, list) or not all(
            isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history
        ):
            raise PromptError(f"history file {args.history} must hold a JSON list of [question, answer] pairs")
        history = [tuple(turn) for turn in history]
    tokens_per_tile = args.tokens_per_tile or config_per_tile or 256
    tokenizer = load_tokenizer(folder)
    if template.sep_style == SINGLE:  # Yi-VL: one image, spliced in as a single -200 id
        if args.tiles and args.tiles != [1]:
            raise PromptError("Yi-VL takes one untiled image: give --tiles 1 once, or no --tiles")
        query = build_yivl_query(args.question, history=history, image=bool(args.tiles), template=template)
        input_ids = encode_yivl_query(tokenizer, query.text)
    else:
        query = build_query(
            template,
            args.question,
            history=history,
            num_patches_list=args.tiles,
            tokens_per_tile=tokens_per_tile,
            image_style=args.image_style,
        )
        input_ids = encode_queries(tokenizer, query.text).input_ids[0].tolist()
    eos = chat_eos_token_id(tokenizer, template)
    if args.json:
        result = {
            "template": template.name,
            "query": query.text,
            "input_ids": input_ids,
            "num_tokens": len(input_ids),
            "eos_token_id": eos,
            "num_patches_list": list(query.num_patches_list),
            "tokens_per_tile": tokens_per_tile,
        }
        print(json.dumps(result, ensure_ascii=False))
        return 0
    tiles = ", ".join(map(str, query.num_patches_list)) or "none"
    print(f"template: {template.name}    images (tiles each): {tiles}    tokens per tile: {tokens_per_tile}")
    print(f"--- query, {len(query.text)} characters (runs of {IMG_CONTEXT} shown as {IMG_CONTEXT}*N) ---")
    print(compact_image_runs(query.text))
    print(f"--- input_ids, {len(input_ids)} tokens; generation stops at id {eos} ---")
    print(_compact_ids(input_ids, tokenizer.token_to_id(IMG_CONTEXT)))
    return 0


COMMANDS["prompt"] = ("show the exact prompt text and token ids a model gets", _add_prompt, _run_prompt)


# --- tiles: how an image is cut into tiles, and how many image tokens each family spends on it -------------


def _add_tiles(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="image file (any format and mode Pillow reads)")
    parser.add_argument("--min-tiles", type=int, default=1, metavar="N", help="fewest grid tiles (default 1)")
    parser.add_argument("--max-tiles", type=int, default=12, metavar="N", help="most grid tiles (default 12)")
    parser.add_argument("--image-size", type=int, default=448, metavar="PX", help="tile side (default 448)")
    parser.add_argument("--out", metavar="PNG", help="write a labelled picture of the tiles and thumbnail")
    parser.add_argument("--json", action="store_true", help="print one JSON object as the last line")


def _run_tiles(args) -> int:
    import json

    from minisail.errors import ImageError
    from minisail.image.preprocess import internvl_tiles
    from minisail.image.render import render_tiles, summarize

    if 1 <= args.max_tiles < args.min_tiles:  # upstream silently falls back to one tile; on a command line it is a typo
        raise ImageError(
            f"--min-tiles {args.min_tiles} is larger than --max-tiles {args.max_tiles}: no grid fits; give min <= max "
            "(minisail.tiling.best_grid reproduces upstream's 1x1 fallback where that is wanted)"
        )
    tiles = internvl_tiles(args.image, min_tiles=args.min_tiles, max_tiles=args.max_tiles, image_size=args.image_size)
    summary = {"image": args.image, "min_tiles": args.min_tiles, "max_tiles": args.max_tiles, **summarize(tiles)}
    if args.out:
        try:
            render_tiles(tiles).save(args.out, format="PNG")
        except OSError as error:
            raise MinisailError(f"cannot write {args.out}: {error}") from None
    summary["out"] = args.out
    if args.json:
        print(json.dumps(summary))
        return 0
    thumb = " + thumbnail" if summary["thumbnail"] else ""
    print(f"image: {args.image} ({summary['width']}x{summary['height']})")
    print(
        f"grid: {summary['cols']} cols x {summary['rows']} rows of {summary['image_size']}px{thumb} "
        f"= {summary['num_tiles']} tiles (tiles {args.min_tiles}..{args.max_tiles})"
    )
    print(f"image tokens ({summary['tokens_per_tile']} per tile):")
    for family, count in summary["image_tokens"].items():
        note = "one 448px image, no tiling" if family == "Yi-VL" else f"{summary['num_tiles']} tiles"
        print(f"  {family:<20} {count:>6}  ({note})")
    if args.out:
        print(f"picture: {args.out}")
    return 0


COMMANDS["tiles"] = ("show how an image is tiled and how many image tokens it costs", _add_tiles, _run_tiles)


# --- parity: run golden cases produced by the official code -------------------------------------------------


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


COMMANDS["parity"] = ("compare minisail with golden outputs of the official code", _add_parity, _run_parity)


# --- chat: talk to a model, the reply streamed to stdout ------------------------------------------------------------


def _add_chat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "question",
        nargs="?",
        help="ask once and exit; without it, chat on stdin, one question per line (/reset clears the history, "
        "/exit or the end of input quits)",
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint folder (weights and tokenizer)")
    parser.add_argument(
        "--image", action="append", default=[], metavar="IMG", help="an image for the first question (repeatable)"
    )
    parser.add_argument(
        "--max-tiles", type=int, metavar="N", help="most tiles per image (default: the checkpoint's own setting)"
    )
    parser.add_argument("--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--quantize", choices=("int8",), help="int8: load the language model's linear weights as int8 (weight-only)"
    )
    parser.add_argument("--system", metavar="TEXT", help="replace the template's system message")
    parser.add_argument("--template", metavar="NAME", help="conversation template (default: the checkpoint config's)")
    parser.add_argument(
        "--think",
        action="store_true",
        help="thinking models (SAIL-VL2-Thinking): ask for <think> reasoning and a \\boxed{} answer; the reasoning "
        "is shown dimmed",
    )
    sampling = parser.add_argument_group("generation (default: greedy)")
    sampling.add_argument("--temperature", type=float, metavar="T", help="sample at this temperature (0 = greedy)")
    sampling.add_argument("--top-p", type=float, metavar="P", help="nucleus sampling: keep this much probability")
    sampling.add_argument("--top-k", type=int, metavar="K", help="sample from the K likeliest tokens (default 50)")
    sampling.add_argument("--repetition-penalty", type=float, metavar="R", help="> 1 discourages repeats (1 = off)")
    sampling.add_argument("--max-new-tokens", type=int, default=512, metavar="N", help="reply length cap (512)")
    sampling.add_argument("--seed", type=int, help="seed for sampling (reproducible replies)")


def _chat_turn(session, question: str, images, args) -> None:
    """Ask one question and stream the reply; with --think the reasoning goes first, dimmed (or labelled)."""
    from minisail.session import split_thinking

    out = sys.stdout
    tty = out.isatty()
    labels = {"reasoning": ("\x1b[2m", "\x1b[0m\n\n") if tty else ("[thinking]\n", "\n[answer]\n")}
    sampling = {
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "repetition_penalty": args.repetition_penalty,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    current = None
    for event in session.ask(question, images, stream=True, think=args.think, **sampling):
        kind, text = event if args.think else ("answer", event)
        if kind != current:
            if current in labels:
                out.write(labels[current][1])
            if kind in labels:
                out.write(labels[kind][0])
            current = kind
        out.write(text)
        out.flush()
    if current == "reasoning" and tty:
        out.write("\x1b[0m")
    out.write("\n")
    if args.think:
        reply = split_thinking(session.history[-1][1])
        if reply.answer != reply.response:
            out.write(f"final answer: {reply.answer}\n")
    out.flush()


def _run_chat(args) -> int:
    from minisail.image.io import open_image
    from minisail.session import Session

    images = [open_image(path) for path in args.image]  # an unreadable image fails before the model loads

    def log(message: str) -> None:
        print(f"minisail: {message}", file=sys.stderr, flush=True)

    session = Session(args.model, max_tiles=args.max_tiles, dtype=args.dtype, device=args.device,
                      quantize=args.quantize, system=args.system, template=args.template, log=log)  # fmt: skip
    if args.question is not None:
        _chat_turn(session, args.question, images, args)
        return 0
    pending = images  # the images go with the first question (again after /reset)
    while True:
        if sys.stdin.isatty():
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        question = line.rstrip("\r\n")
        if question.strip() == "/reset":
            session.reset()
            pending = images
            log("history cleared")
        elif question.strip():
            try:
                _chat_turn(session, question, pending, args)
                pending = []
            except MinisailError as error:  # say what went wrong and keep the conversation going
                print(f"minisail: error: {error}", file=sys.stderr, flush=True)


COMMANDS["chat"] = ("chat with a model about images; the reply streams to stdout", _add_chat, _run_chat)


# --- bench: speed and memory at a model's real shapes, against transformers ------------------------------------


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


COMMANDS["bench"] = ("benchmark speed and memory at a model's real shapes (vs transformers)", _add_bench, _run_bench)
