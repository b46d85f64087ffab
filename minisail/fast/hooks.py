"""The hooks `minisail.load` fills a model with, in the order they act on each value.

1. `Int8Weights`: an Int8Linear's weight and scale, stored by bitsandbytes or quantised as read
   (fast/int8_checkpoint.py); `Int4Weights`: an Int4Linear's codes and scale/zero pairs, quantised as read and
   repacked for the CPU kernel where it runs (fast/int4_checkpoint.py);
2. `CastTo`: floats to the load dtype, everything to the device (checkpoint/hooks.py);
3. `CopySmallViews`: a value that would stay a small view into the files is copied out (fast/memory.py);
   `ReleasePages`: a converted or copied value's mapped source pages given back (fast/memory.py);
4. `BackgroundReadAhead`: the files streamed into the page cache meanwhile (fast/readahead.py), counting the views
   the model keeps, so it must come after the conversions.
"""

from __future__ import annotations

import torch

from minisail.checkpoint.hooks import CastTo, LoadHook
from minisail.fast.int4_checkpoint import Int4Weights
from minisail.fast.int8_checkpoint import Int8Weights
from minisail.fast.memory import CopySmallViews, ReleasePages
from minisail.fast.readahead import BackgroundReadAhead


def load_hooks(dtype: torch.dtype, device=None) -> list[LoadHook]:
    """Fresh hooks for one `fill_from_checkpoint` (they hold per-load state)."""
    return [
        Int8Weights(),
        Int4Weights(dtype, device),
        CastTo(dtype, device),
        CopySmallViews(),
        ReleasePages(),
        BackgroundReadAhead(),
    ]
