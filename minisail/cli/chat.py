"""`python -m minisail chat`: talk to a model about images, the reply streamed to stdout."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from minisail.errors import CheckpointError, MinisailError, ParallelError, PromptError
from minisail.tiling import MAX_TILES_LIMIT


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
        "--max-tiles",
        type=whole_number(1, MAX_TILES_LIMIT),
        metavar="N",
        help="most tiles per image (default: the checkpoint's own setting)",
    )
    parser.add_argument(
        "--dtype",
        help="float32, bfloat16 or float16 (default: the checkpoint's; on a CPU without native bf16, float32 if it "
        "fits in memory)",
    )
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cpu)")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="int8 / int4: load the language model's linear weights as int8 / group-wise int4 (weight-only; int4 runs "
        "with bf16 activations)",
    )
    parser.add_argument(
        "--tp", type=int, metavar="N", help="tensor parallel over N ranks (launch with torchrun --nproc-per-node N)"
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
    sampling.add_argument(
        "--max-new-tokens", type=whole_number(1), default=512, metavar="N", help="reply length cap (512)"
    )
    sampling.add_argument("--seed", type=int, help="seed for sampling (reproducible replies)")


def whole_number(low: int, high: int | None = None):
    """An argparse type: an integer in [low, high], refused before anything loads (a bad value should not cost a
    model load)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            accepted = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{value} is not {accepted}")
        return value

    return parse


def _chat_turn(session, question: str, images, args) -> None:
    """Ask one question and stream the reply; with --think the reasoning goes first, dimmed (or labelled)."""
    from minisail.text.replies import split_thinking

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
    from minisail.image.preprocess import open_image
    from minisail.loading import read_model_config, resolve_device, resolve_dtype
    from minisail.parallel import launch
    from minisail.text.templates import SINGLE, get_template

    resolve_dtype(args.dtype), resolve_device(args.device)  # a bad --dtype / --device fails before any reading
    if not Path(args.model).is_dir():
        raise CheckpointError(f"checkpoint folder {args.model} does not exist")
    checked = read_model_config(args.model)  # not a checkpoint (no or a bad config.json): said before the tokenizer
    own = checked.family.chat_template(checked.parsed)  # an unknown template is refused before the weights load
    if own.sep_style == SINGLE and len(args.image) > 1:
        raise PromptError(f"Yi-VL takes one image per conversation, not {len(args.image)}: give one --image")
    if args.template is not None and (get_template(args.template).sep_style == SINGLE) != (own.sep_style == SINGLE):
        kind = "Yi-VL's (one image spliced in as a single id)" if own.sep_style != SINGLE else "not Yi-VL's"
        raise PromptError(f"--template {args.template} is {kind}; this checkpoint takes templates like {own.name!r}")
    images = [open_image(path) for path in args.image]  # an unreadable image fails before the model loads
    launch.start(args.tp, args.device)
    try:
        with launch.peers_failing():
            status = _chat(args, images)
            launch.finish()
            return status
    finally:
        launch.stop()


def _chat(args, images) -> int:
    from minisail.parallel import launch
    from minisail.session import Session

    def log(message: str) -> None:
        if launch.rank() == 0:
            print(f"minisail: {message}", file=sys.stderr, flush=True)

    tp = args.tp if args.tp is not None and args.tp > 1 else None
    if tp is not None:  # every rank must draw the same samples: one seed, chosen by rank 0
        launch.same_random_state()
    session = Session(args.model, max_tiles=args.max_tiles, dtype=args.dtype, device=args.device,
                      quantize=args.quantize, tp=tp, system=args.system, template=args.template, log=log)  # fmt: skip
    if args.question is not None:
        _chat_turn(session, args.question, images, args)
        return 0
    pending = images  # the images go with the first question (again after /reset)
    while True:
        if sys.stdin.isatty() and launch.rank() == 0:
            print("> ", end="", file=sys.stderr, flush=True)
        line = launch.read_line()  # rank 0 reads; every rank gets the line
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
            except ParallelError:  # another rank stopped or timed out: the session cannot go on
                raise
            except MinisailError as error:  # say what went wrong and keep the conversation going
                print(f"minisail: error: {error}", file=sys.stderr, flush=True)


COMMAND = (
    "chat with a model about images; the reply streams to stdout",
    _add_chat,
    _run_chat,
)
