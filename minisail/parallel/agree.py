"""Do the tensor-parallel ranks hold parts of one model? Checked once per load, before any weight is filled.

Each rank opens the checkpoint folder it was given and picks a dtype (from `dtype=`, the checkpoint, or, in the
CLI, from its own machine's bf16 support and free memory). Ranks that disagree would still run: the same shapes
with other weights give wrong logits on every rank, another dtype ends in a gloo abort ("received data size
doesn't match") with no word on the cause. So every rank hashes what it is about to load, in parts, and the ranks
compare them in one all-gather:

- config: config.json as read (and completed by the family: Yi-VL's vision folder);
- dtype: the dtype the weights will have;
- tensors: every stored tensor's name, dtype and shape (the headers);
- values: the first and last 16 elements of every stored tensor (two pages each: a different checkpoint of the
  same shapes shows here, not a full read of the weights).
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
        flat = source.view(name).reshape(-1)
        ends = torch.cat([flat[:SAMPLE], flat[-SAMPLE:]]) if flat.numel() > 2 * SAMPLE else flat
        values.update(ends.contiguous().view(torch.uint8).numpy().tobytes())
    text = json.dumps(config, sort_keys=True, default=str)
    return {
        "config": hashlib.sha256(text.encode()).hexdigest()[:16],
        "dtype": str(dtype),
        "tensors": headers.hexdigest()[:16],
        "values": values.hexdigest()[:16],
    }


def check_ranks_agree(mine: dict[str, str], group=None) -> None:
    """A ParallelError on every rank unless every rank's fingerprint equals rank 0's, naming what differs."""
    size = dist.get_world_size(group)
    everyone: list = [None] * size
    with collective():
        dist.all_gather_object(everyone, mine, group=group)
    first = everyone[0]
    for rank, theirs in enumerate(everyone):
        differs = [part for part in first if theirs.get(part) != first[part]]
        if differs:
            dtypes = f" (rank 0: {first['dtype']}, rank {rank}: {theirs['dtype']})" if "dtype" in differs else ""
            raise ParallelError(
                f"rank {rank} is loading another model than rank 0: {', '.join(differs)} "
                f"{'differ' if len(differs) > 1 else 'differs'}{dtypes}; every rank "
                "must load the same checkpoint folder contents in the same dtype (pass --dtype / dtype= explicitly)"
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
