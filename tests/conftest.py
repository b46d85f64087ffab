"""Shared pytest fixtures.

Tokenizers: checkpoint-form tokenizer folders rebuilt once per session from tests/data/tokenizers/ (see
tests/helpers/tokenizer_files.py), and the tokenizers loaded from them (loading the Qwen tokenizer.json takes ~1 s).
"""

from __future__ import annotations

import pytest
from helpers import tokenizer_files

from minisail.text.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.qwen25_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def sailvl2_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.sailvl2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def internlm2_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.internlm2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_tokenizer_dir):
    return load_tokenizer(qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def sailvl2_tokenizer(sailvl2_tokenizer_dir):
    return load_tokenizer(sailvl2_tokenizer_dir)


@pytest.fixture(scope="session")
def internlm2_tokenizer(internlm2_tokenizer_dir):
    return load_tokenizer(internlm2_tokenizer_dir)


# --- forcing the CPU fast paths on or off, whatever this machine's CPU can do ------------------------------------


def _reset_fast_path_decisions():
    from minisail.fast import int8 as int8_kernels
    from minisail.fast import int8_dot, matvec, packing, vit_attention

    packing.packing_support.cache_clear()
    packing._checked.clear()
    matvec._probed.clear()
    int8_kernels._int8pack_checked.clear()
    int8_dot.dot_support.cache_clear()
    int8_dot._checked.clear()
    vit_attention.fast_attention_support.cache_clear()


@pytest.fixture
def onednn_refuses_bf16(monkeypatch):
    """oneDNN's packing ops raise as they do on an AVX2-only CPU (no AVX-512, no AMX, no AVX-NE-CONVERT)."""
    import torch

    def refuse(*args, **kwargs):
        raise RuntimeError(
            "mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw, avx512vl "
            "and avx512dq"
        )

    _reset_fast_path_decisions()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", refuse)
    yield
    _reset_fast_path_decisions()


@pytest.fixture
def onednn_packs_bf16(monkeypatch):
    """oneDNN's packing ops stood in for by plain ones (the "packed" weight is the weight, the product F.linear):
    the packed path's plumbing runs on every machine, where the real kernel may be missing."""
    import torch
    import torch.nn.functional as F

    _reset_fast_path_decisions()
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda weight, batch: weight.clone())
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", lambda x, weight, bias, *attr: F.linear(x, weight, bias))
    yield
    _reset_fast_path_decisions()


@pytest.fixture
def int8pack_fails(monkeypatch):
    """torch's int8 weight-only kernel raises, as a CPU or build without it would."""
    import torch

    def fail(*args, **kwargs):
        raise RuntimeError("_weight_int8pack_mm: not implemented for this CPU")

    _reset_fast_path_decisions()
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", fail)
    yield
    _reset_fast_path_decisions()


@pytest.fixture
def views_of_any_size(monkeypatch):
    """Every tensor taken as stored stays a zero-copy view, however small (minisail copies views under
    SMALL_VIEW_BYTES out of the mapping, fast/memory.py): the tiny golden models' tensors are all small, and these
    tests are about the views themselves."""
    from minisail.fast import memory

    monkeypatch.setattr(memory, "SMALL_VIEW_BYTES", 0)
