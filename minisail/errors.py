"""The errors minisail raises on bad input.

Every failure a user can cause (a corrupt checkpoint, a wrong config, an unreadable image, a prompt
longer than the context) ends in one of these, with a message that says what is wrong and what to do.
Catch `MinisailError` to catch them all.
"""


class MinisailError(Exception):
    """Base class of every error minisail raises on purpose."""


class ImageError(MinisailError, ValueError):
    """An image that cannot be read, is absurdly large or small, or a nonsensical tiling request."""


class CheckpointError(MinisailError):
    """A checkpoint folder that is missing files, truncated, corrupt, or does not match the model."""


class ConfigError(MinisailError, ValueError):
    """A config.json that is missing a required key or describes an unsupported model."""


class TokenizerError(MinisailError):
    """Tokenizer files that are missing or cannot be read."""


class PromptError(MinisailError, ValueError):
    """A prompt that cannot be built or run: unknown template, image count mismatch, too long for the context."""


class NumericsError(MinisailError, ArithmeticError):
    """A model that computes NaN or infinite logits: NaN/Inf weights in the checkpoint, or a dtype that overflows."""


class ParallelError(MinisailError):
    """A multi-process run that cannot go on: --tp and the launcher disagree, or another rank failed or timed out."""


class MinisailWarning(UserWarning):
    """Something the caller should know that is not an error: e.g. a chat() reply cut at the model's context end."""
