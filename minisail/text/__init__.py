"""Text side of the models: tokenizers (`tokenizer.py`, `sentencepiece.py`), conversation templates
(`templates.py`) and chat() prompt assembly (`prompt.py`)."""

from minisail.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
