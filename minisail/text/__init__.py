"""Text side of the models: tokenizers (`tokenizer.py`, which reads its files through `tokenizer_reader.py`;
`sentencepiece_model.py` and `sentencepiece.py` for tokenizer.model), conversation templates (`templates.py`),
chat() prompt assembly (`prompt.py`, with the image tokens of `image_tokens.py`) and the replies
(`streaming.py`, `replies.py`)."""

from minisail.text.tokenizer import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
