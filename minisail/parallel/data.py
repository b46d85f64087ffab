"""Data parallel: many independent jobs (golden cases, prompts) split across ranks, the results gathered.

Each rank holds a whole model (or loads its own); unlike tensor parallel (tensor.py) the ranks never talk while
they work, only once at the end: `map_over_ranks` gives item i to rank i % world_size (round robin, so the long
and short ones mix), runs `function` on its own items, and returns every result in the original order on every
rank (the CLI prints them on rank 0). A job that raises on any rank is carried back as its exception, and
raised on every rank after the gather, so one bad case cannot leave the others waiting for it.

Under one process (no torchrun) it is a plain loop.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch.distributed as dist

from minisail.parallel.launch import collective, rank, world_size

Item = TypeVar("Item")
Result = TypeVar("Result")


def share(items: Sequence[Item], of_rank: int | None = None, ranks: int | None = None) -> list[tuple[int, Item]]:
    """(index, item) of the items rank `of_rank` (default: this one) runs: every `ranks`-th, from its own."""
    of_rank = rank() if of_rank is None else of_rank
    ranks = world_size() if ranks is None else ranks
    return [(i, item) for i, item in enumerate(items) if i % ranks == of_rank]


def map_over_ranks(
    function: Callable[[Item], Result], items: Sequence[Item], on_result: Callable[[Result], None] | None = None
) -> list[Result]:
    """[function(item) for item in items], the items split across the ranks; every rank gets the whole list.

    `on_result(result)` is called on this rank as each of its own results is ready (e.g. to print progress).
    The first exception any rank raised (in item order) is raised on every rank once all have finished."""
    mine: list[tuple[int, object, BaseException | None]] = []
    for index, item in share(items):
        try:
            result = function(item)
        except Exception as error:  # carried to the other ranks; re-raised below
            mine.append((index, None, error))
            continue
        mine.append((index, result, None))
        if on_result is not None:
            on_result(result)
    if world_size() == 1:
        everything = [mine]
    else:
        everything = [None] * world_size()
        with collective():
            dist.all_gather_object(everything, mine)  # within MINISAIL_DIST_TIMEOUT of the last rank's finish
    done = sorted((entry for part in everything for entry in part), key=lambda entry: entry[0])
    for _index, _result, error in done:
        if error is not None:
            raise error
    return [result for _index, result, _error in done]
