"""minisail: a readable pure-PyTorch reference implementation of the SAIL-VL / InternVL vision-language models.

model = minisail.load("weights/SAIL-VL-2B")          # official checkpoint folder, no transformers
tokenizer = minisail.load_tokenizer("weights/SAIL-VL-2B")
"""

from __future__ import annotations

from minisail.allocator import ask_torch_for_huge_pages

ask_torch_for_huge_pages()  # before anything imports torch: its allocator reads the setting once (allocator.py)

from minisail.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    ImageError,
    MinisailError,
    NumericsError,
    PromptError,
    TokenizerError,
)
from minisail.loading import load  # noqa: E402

__version__ = "0.1.0"


def load_tokenizer(path):
    """The tokenizer of a checkpoint folder (tokenizer.json, or a SentencePiece tokenizer.model)."""
    from minisail.text.tokenizer import load_tokenizer as _load_tokenizer

    return _load_tokenizer(path)


__all__ = [
    "load",
    "load_tokenizer",
    "MinisailError",
    "CheckpointError",
    "ConfigError",
    "ImageError",
    "NumericsError",
    "PromptError",
    "TokenizerError",
    "__version__",
]
