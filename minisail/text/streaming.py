"""UTF-8-safe text streaming: text pieces as generated ids arrive, never splitting a character.

Mirrors the rule of transformers' `TextStreamer` (emit new text only when it has grown and does not end in
U+FFFD) with a bounded decode window, as incremental detokenizers (vLLM, text-generation-inference) do.
`minisail.generate.generate_stream` feeds it a generation's ids; the chat session streams through it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

STREAM_WINDOW = 64  # ids a streamed piece may wait for; a character takes at most 4 byte tokens


def stream_text(tokenizer, token_ids: Iterable[int], *, skip_special_tokens: bool = True) -> Iterator[str]:
    """Text pieces as the ids arrive, never splitting a character; they join to the decode of all ids.

    Byte-level tokenizers spend several tokens on one CJK character or emoji, and a prefix of them decodes
    to U+FFFD. So new text is emitted only when it has grown and does not end in U+FFFD (transformers'
    TextStreamer rule). Decoding all ids at every step would make a long reply quadratic, so only a window is
    decoded, as incremental detokenizers do: `decode(ids[prefix:])` against `decode(ids[prefix:read])`, where
    `read` is where the text was last emitted and `prefix` where it was emitted before that. Both decodes start
    at the same id, so whatever a decoder does at the start of a text (SentencePiece drops the first "▁") cancels
    out, and the difference is the new text. A window that has not emitted for STREAM_WINDOW ids (a run of
    invalid bytes) moves on anyway, emitting what it has, U+FFFD included: no id is decoded more than about
    2 * STREAM_WINDOW times.
    Should a tokenizer ever rewrite text it already produced, the last piece resumes after the longest common
    prefix of what was emitted and the decode of all ids. (One does: with skip_special_tokens=False, InternLM2's
    slow decode puts a space in front of the text before a special token, and always cleans up " ," / " ." /
    " n't" across what it decodes; a window cannot see that, so the pieces then differ from decoding everything at
    each step. Chat streams with special tokens skipped; the clean-up can still rewrite a streamed " ,".)
    """
    ids: list[int] = []
    prefix = read = 0
    emitted: list[str] = []
    for token_id in token_ids:
        ids.append(int(token_id))
        base = tokenizer.decode(ids[prefix:read], skip_special_tokens=skip_special_tokens)
        text = tokenizer.decode(ids[prefix:], skip_special_tokens=skip_special_tokens)
        grown = len(text) > len(base) and text.startswith(base)
        if (grown and not text.endswith("\ufffd")) or len(ids) - read >= STREAM_WINDOW:
            if grown:
                emitted.append(text[len(base) :])
                yield emitted[-1]
            prefix, read = read, len(ids)
    final = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    sent = "".join(emitted)
    common = len(sent) if final.startswith(sent) else _common_prefix(final, sent)
    if final[common:]:
        yield final[common:]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n
