"""Do the tensor-parallel ranks hold parts of one model? Checked once per load, before any weight is filled.

Each rank opens the checkpoint folder it was given and picks a dtype (from `dtype=`, the checkpoint, or, in the
CLI, from its own machine's bf16 support and free memory). Ranks that disagree would still run: the same shapes
with other weights give wrong logits on every rank, another dtype ends in a gloo abort ("received data size
doesn't match") with no word on the cause. So every rank hashes what it is about to load, in parts, and the ranks
compare them in one all-gather:

- config: config.json as read (and completed by the family: Yi-VL's vision folder);
- dtype: the dtype the weights will have;
- tensors: every stored tensor's name, dtype and shape (the headers);
- values: the first and last 16 elements of every stored tensor (a different checkpoint of the same shapes shows
  here, not a full read of the weights; through the memory map the OS reads around them: measured 62 MiB more of
  a 3.9 GB checkpoint for a tp=2 rank's whole load, which reads most pages anyway).
"""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from minisail.errors import ParallelError
from minisail.parallel.launch import collective

SAMPLE = 16  # elements read at each end of every tensor


def fingerprint(config: dict, tensors, dtype: torch.dtype) -> dict[str, str]:
    """The parts of what this rank loads, each as a short hash (`tensors`: the source the loader reads, or the
    one a ShardedTensors wraps)."""
    source = getattr(tensors, "base", tensors)  # the whole files, not this rank's slices
    headers, values = hashlib.sha256(), hashlib.sha256()
    for name in sorted(source.keys()):
        headers.update(f"{name}|{source.dtype(name)}|{list(source.shape(name))};".encode())
        values.update(_ends(source.view(name)).view(torch.uint8).numpy().tobytes())
    text = json.dumps(config, sort_keys=True, default=str)
    return {
        "config": hashlib.sha256(text.encode()).hexdigest()[:16],
        "dtype": str(dtype),
        "tensors": headers.hexdigest()[:16],
        "values": values.hexdigest()[:16],
    }


def _ends(tensor: torch.Tensor) -> torch.Tensor:
    """The first and last SAMPLE elements in index order, gathered by index: flattening a tensor stored
    non-contiguous (a transposed one in a .bin file) would copy all of it."""
    n = tensor.numel()
    index = torch.arange(n) if n <= 2 * SAMPLE else torch.cat([torch.arange(SAMPLE), torch.arange(n - SAMPLE, n)])
    if tensor.dim() == 0:
        return tensor.reshape(1)[index].contiguous()
    return tensor[torch.unravel_index(index, tensor.shape)].contiguous()


def check_ranks_agree(mine: dict[str, str], group=None) -> None:
    """A ParallelError on every rank unless every rank's fingerprint equals rank 0's, naming what differs."""
    size = dist.get_world_size(group)
    everyone: list = [None] * size
    with collective():
        dist.all_gather_object(everyone, mine, group=group)
    groups: dict[tuple, list[int]] = {}  # the ranks that load the same thing
    for rank, theirs in enumerate(everyone):
        groups.setdefault(tuple(sorted(theirs.items())), []).append(rank)
    if len(groups) == 1:
        return
    parts = [dict(key) for key in groups]
    differs = [part for part in parts[0] if any(other[part] != parts[0][part] for other in parts)]
    ranks = " | ".join(
        "rank"
        + ("s " if len(r) > 1 else " ")
        + ", ".join(map(str, r))
        + (f" ({part['dtype']})" if "dtype" in differs else "")
        for part, r in zip(parts, groups.values(), strict=True)
    )
    raise ParallelError(
        f"the ranks are loading different models ({', '.join(differs)} {'differ' if len(differs) > 1 else 'differs'}"
        f": {ranks}); every rank must load the same checkpoint folder contents in the same dtype (pass --dtype / "
        "dtype= explicitly)"
    )


def memory_every_rank_has(tp) -> int | None:
    """The smallest memory available on any rank (bytes; None where no rank knows its own), so that every rank
    makes the same KV-cache decision (llm/decoder.py check_cache_fits): a rank on a host with less free memory
    refusing a turn alone would leave the others waiting in the turn's first all-reduce."""
    from minisail.system import available_memory_bytes

    unknown = 1 << 62
    mine = available_memory_bytes()
    smallest = torch.tensor([unknown if mine is None else mine], dtype=torch.int64)
    with collective():
        dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=tp.group)
    return None if int(smallest) == unknown else int(smallest)
