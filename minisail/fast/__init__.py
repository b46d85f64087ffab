"""The fast paths, kept beside the model: int8 and int4 weights, int8 on integer dot products, packed bf16 Linears,
bf16 computed in float32 where it is not native, bf16 vision attention, huge pages, page release, read-ahead
(`cpu.speed_up_on_cpu` says which run on this machine, and why).

Nothing in layers.py, vision/, llm/ or models/ imports this package (tests/loading/test_fast_is_a_hook.py): the model is
the plain math, and what makes loading it smaller or running it faster is added from here, as loader hooks
(checkpoint/hooks.py) or as module swaps on a built model.
"""
