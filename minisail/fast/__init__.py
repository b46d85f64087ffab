"""The fast paths, kept beside the model: int8 weights, packed bf16 Linears, page release, read-ahead.

Nothing in layers.py, vision/, llm/ or models/ imports this package (tests/loading/test_fast_is_a_hook.py): the model is
the plain math, and what makes loading it smaller or running it faster is added from here, as loader hooks
(checkpoint/hooks.py) or as module swaps on a built model.
"""
