"""`python -m minisail prompt`: the exact prompt text and token ids a model gets for a question and images."""

from __future__ import annotations

import argparse

from minisail.errors import MinisailError


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

    from minisail.errors import CheckpointError, TokenizerError
    from minisail.loading import read_model_config
    from minisail.merge import tokens_per_tile
    from minisail.text.templates import get_template

    if args.model:
        if not Path(args.model).is_dir():
            raise CheckpointError(f"checkpoint folder {args.model} does not exist")
        # the same family detection and config checks as minisail.load (no weights read): a config that load
        # refuses gets no prompt either, with the same error
        checked = read_model_config(args.model)
        config = checked.config
        # the template chat() uses for this model (its family decides: SAIL-VL2 ignores config.json's system_message)
        template = get_template(args.template) if args.template else checked.family.chat_template(checked.parsed)
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
    from minisail.text.image_tokens import IMG_CONTEXT, MAX_IMAGE_TOKENS, compact_image_runs
    from minisail.text.prompt import build_query, build_yivl_query, chat_eos_token_id, encode_queries, encode_yivl_query
    from minisail.text.templates import SINGLE
    from minisail.text.tokenizer import load_tokenizer
    from minisail.tiling import MAX_TILES_LIMIT

    template, folder, config_per_tile = _prompt_sources(args)
    if args.system is not None:
        template = template.with_system_message(args.system)
    if args.tokens_per_tile is not None and not 1 <= args.tokens_per_tile <= MAX_IMAGE_TOKENS:
        raise PromptError(f"--tokens-per-tile must be between 1 and {MAX_IMAGE_TOKENS}, not {args.tokens_per_tile}")
    for tiles in args.tiles or ():  # one image is at most MAX_TILES_LIMIT grid tiles and a thumbnail
        if not 1 <= tiles <= MAX_TILES_LIMIT + 1:
            raise PromptError(f"--tiles must be between 1 and {MAX_TILES_LIMIT + 1} (tiles of one image), not {tiles}")
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
        print(json.dumps(result))  # ASCII escapes: one line whatever the text holds (U+2028 splits lines elsewhere)
        return 0
    tiles = ", ".join(map(str, query.num_patches_list)) or "none"
    print(f"template: {template.name}    images (tiles each): {tiles}    tokens per tile: {tokens_per_tile}")
    print(f"--- query, {len(query.text)} characters (runs of {IMG_CONTEXT} shown as {IMG_CONTEXT}*N) ---")
    print(compact_image_runs(query.text))
    print(f"--- input_ids, {len(input_ids)} tokens; generation stops at id {eos} ---")
    print(_compact_ids(input_ids, tokenizer.token_to_id(IMG_CONTEXT)))
    return 0


COMMAND = (
    "show the exact prompt text and token ids a model gets",
    _add_prompt,
    _run_prompt,
)
