"""Thinking replies: the instruction that asks for them, and their parts, whole or streamed.

Thinking models (SAIL-VL2-2B-Thinking, SAIL-VL2-8B-Thinking) are asked with THINK_INSTRUCTION appended to the
question, as their model cards do, and reply `<think>reasoning</think> answer with \\boxed{...}`.
`split_thinking` separates a whole reply into a ThoughtReply (reasoning, response, the `\\boxed{}` content);
`ReplyStream` does the same to a reply arriving in decoded pieces, as `Session.ask(stream=True)` and
`python -m minisail chat --think` show it, ending where chat()'s reply ends (cut at `<|im_end|>`; Yi-VL's reply
loses a trailing `###`).
There is no upstream code for this: it follows the model cards' instruction and chat()'s reply clean-up
(`minisail.text.prompt.postprocess_reply`). Both are linear in the reply (tests/generation/test_hostile_inputs.py).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

THINK_INSTRUCTION = (
    "You FIRST think about the reasoning process as an internal monologue and then provide the final answer. "
    "The reasoning process MUST BE enclosed within <think> </think> tags. The final answer MUST BE put in \\boxed{}."
)
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass(frozen=True)
class ThoughtReply:
    text: str  # the whole reply, as chat() returns it
    reasoning: str  # inside <think> ... </think>, stripped ('' when the reply does not start with <think>)
    response: str  # after </think> (the whole reply when there is no reasoning), stripped
    answer: str  # the content of the last \boxed{...} in the response, else the response


def _reply_parts(text: str, think: bool) -> dict[str, str]:
    """The reply as (reasoning, answer) texts; a reply has reasoning only if it starts with <think>."""
    text = text.lstrip()
    if not think or not text.startswith(THINK_OPEN):
        return {"reasoning": "", "answer": text.strip()}
    reasoning, _, answer = text[len(THINK_OPEN) :].partition(THINK_CLOSE)
    return {"reasoning": reasoning.strip(), "answer": answer.strip()}


BOXED = "\\boxed{"
BRACES = re.compile(r"[{}]")


def boxed_content(text: str) -> str | None:
    """The content of the last complete `\\boxed{...}`, nested braces included; None if there is none.

    "Last" is the latest-starting `\\boxed{` whose brace is closed; an unclosed later one (a reply cut off) is
    skipped. One pass: every brace is matched with a stack, then the last `\\boxed{` with a match wins.
    """
    closing: dict[int, int] = {}  # position of a "{" -> position of its matching "}"
    open_braces: list[int] = []
    for brace in BRACES.finditer(text):
        if brace.group() == "{":
            open_braces.append(brace.start())
        elif open_braces:
            closing[open_braces.pop()] = brace.start()
    best = None
    for opening in re.finditer(re.escape(BOXED), text):
        brace = opening.end() - 1
        if brace in closing:
            best = text[brace + 1 : closing[brace]]
    return best


def split_thinking(text: str) -> ThoughtReply:
    parts = _reply_parts(text, think=True)
    boxed = boxed_content(parts["answer"])
    return ThoughtReply(text, parts["reasoning"], parts["answer"], parts["answer"] if boxed is None else boxed)


class _StrippedText:
    """Text arriving in chunks, emitted as the chunks' `.strip()` would end: leading whitespace dropped, trailing
    whitespace held back until something non-blank follows it."""

    def __init__(self):
        self.started = False
        self.pending: list[str] = []  # whitespace seen after the last non-blank character

    def feed(self, chunk: str) -> str:
        if not self.started:
            chunk = chunk.lstrip()
            self.started = bool(chunk)
        body = chunk.rstrip()
        if not body:
            self.pending += [chunk] if chunk else []
            return ""
        out = "".join(self.pending) + body
        self.pending = [chunk[len(body) :]]
        return out


class ReplyStream:
    """Decoded text pieces in; (kind, text) events out, kind "reasoning" or "answer", that join to the reply.

    What is emitted is always a prefix of the final reply: leading and trailing whitespace are held back (the
    reply is stripped), and so is the end of the text while it could still become a cut string (`<|im_end|>`,
    `###`) or a think tag.

    Incremental: each piece costs time in proportion to its length (plus the watched strings' lengths), never to
    the text so far. Only the unreleased end of the text is kept: the part that could still be a cut string or
    a tag. What is released ("visible") only ever grows, and it goes through a small state machine: undecided
    (is it `<think>...`?), then the reasoning (up to `</think>`) and the answer, each stripped as it arrives.
    """

    def __init__(self, cut_at: Sequence[str] = (), *, think: bool = False, trailing: str | None = None):
        self.cut_at = [s for s in cut_at if s]
        self.think = think
        # Yi-VL's rule (postprocess_reply): a reply ending in `trailing` ("###") loses it, text after a "###" stays.
        # So from its first occurrence the rest is held back to the end, then released by that rule.
        self.trailing = trailing or None
        self.tail: str | None = None  # the text from the first `trailing` on (None: not seen yet)
        self.watch = self.cut_at + ([THINK_OPEN, THINK_CLOSE] if think else []) + ([trailing] if trailing else [])
        self.unreleased = ""  # the end of the text not visible yet (shorter than the longest watched string)
        self.cut = False  # a cut string was found: everything after it is ignored
        self.head = ""  # visible text while undecided, leading whitespace dropped
        self.kind = None  # None (undecided), "answer", "reasoning" (inside <think>), or "after" (past </think>)
        self.close_tail = ""  # the reasoning's last characters, to find a </think> split across pieces
        self.parts = {"reasoning": _StrippedText(), "answer": _StrippedText()}

    def feed(self, piece: str) -> list[tuple[str, str]]:
        if self.cut:
            return []
        if self.tail is not None:
            self.tail += piece
            return []
        text = self.unreleased + piece
        found = [i for i in (text.find(cut) for cut in self.cut_at) if i >= 0]
        if found:  # the reply ends at the first cut string
            text, self.cut = text[: min(found)], True
        start = text.find(self.trailing) if self.trailing else -1
        if start >= 0:
            text, self.tail = text[:start], text[start:]
        held = max((n for s in self.watch for n in range(1, min(len(s), len(text) + 1)) if text.endswith(s[:n])),
                   default=0)  # fmt: skip
        self.unreleased = text[len(text) - held :]
        return self._release(text[: len(text) - held], final=False)

    def finish(self) -> list[tuple[str, str]]:
        text, self.unreleased = self.unreleased, ""
        if self.tail is not None:  # the reply's end as postprocess_reply leaves it: stripped, one `trailing` dropped
            tail, self.tail = self.tail.rstrip(), None
            text += tail.removesuffix(self.trailing).rstrip() if tail.endswith(self.trailing) else tail
        return self._release(text, final=True)

    def _release(self, visible: str, final: bool) -> list[tuple[str, str]]:
        """Route newly visible text to the reasoning or the answer, as `_reply_parts` splits the whole."""
        events: list[tuple[str, str]] = []
        if self.kind is None:
            self.head = (self.head + visible).lstrip()
            if not self.head:
                return events  # only whitespace so far
            # Decided by the first visible non-blank text: a partial "<think>" at the very end is held back,
            # so a visible head that does not start with the whole tag never becomes one.
            if self.think and self.head.startswith(THINK_OPEN):
                self.kind, self.head = "reasoning", self.head[len(THINK_OPEN) :]
            else:
                self.kind = "answer"
            visible, self.head = self.head, ""
        if self.kind == "reasoning":
            window = self.close_tail + visible
            close = window.find(THINK_CLOSE)
            if close < 0:
                self.close_tail = window[-(len(THINK_CLOSE) - 1) :]
                self._emit(events, "reasoning", visible)
                return events
            # the reasoning ends before </think> (text already emitted past it stays emitted, as before)
            self._emit(events, "reasoning", visible[: max(0, close - len(self.close_tail))])
            visible, self.kind = window[close + len(THINK_CLOSE) :], "after"
        self._emit(events, "answer", visible)
        return events

    def _emit(self, events: list, kind: str, chunk: str) -> None:
        out = self.parts[kind].feed(chunk)
        if out:
            if events and events[-1][0] == kind:
                events[-1] = (kind, events[-1][1] + out)
            else:
                events.append((kind, out))
