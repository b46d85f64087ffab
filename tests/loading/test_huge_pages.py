"""Weights moved into transparent huge pages (minisail/fast/huge_pages.py): the same values and sharing, on 2 MiB
boundaries; nothing moved where THP is off or madvise refuses (forced here, so every machine runs that path)."""

from __future__ import annotations

import torch
from helpers.checkpoints import GOLDEN

import minisail
from minisail.fast import huge_pages
from minisail.fast.huge_pages import HUGE_PAGE, huge_page_empty, to_huge_pages


def model_with_a_tied_head():
    torch.manual_seed(0)
    model = torch.nn.ModuleDict(
        {
            "embed": torch.nn.Embedding(3000, 1024, dtype=torch.bfloat16),  # 6 MB
            "head": torch.nn.Linear(1024, 3000, bias=False, dtype=torch.bfloat16),
            "small": torch.nn.Linear(64, 64, dtype=torch.bfloat16),  # below min_bytes: stays
        }
    )
    model["head"].weight = model["embed"].weight
    model.register_buffer("scales", torch.rand(1024, 1024))  # a 4 MB buffer moves too
    return model


def test_large_tensors_move_with_their_values_and_sharing():
    model = model_with_a_tied_head()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    small = model["small"].weight
    moved = to_huge_pages(model)
    if not huge_pages.huge_pages_support()[0]:
        assert moved == 0
        return
    assert moved == 3000 * 1024 * 2 + 1024 * 1024 * 4  # the tied weight once
    assert model["head"].weight is model["embed"].weight  # still one parameter
    assert model["embed"].weight.data_ptr() % HUGE_PAGE == 0 and model.scales.data_ptr() % HUGE_PAGE == 0
    assert isinstance(model["embed"].weight, torch.nn.Parameter) and not model["embed"].weight.requires_grad
    assert model["small"].weight is small
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    moved_once = model["embed"].weight
    assert to_huge_pages(model) == 0 and model["embed"].weight is moved_once  # a second call copies nothing again


def test_nothing_moves_where_thp_is_off(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_support", lambda: (False, "transparent huge pages are off"))
    model = model_with_a_tied_head()
    weight = model["embed"].weight
    assert to_huge_pages(model) == 0 and model["embed"].weight is weight


def test_nothing_moves_where_madvise_refuses(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_support", lambda: (True, "forced"))
    monkeypatch.setattr(huge_pages, "madvise", lambda: lambda *args: -1)
    assert huge_page_empty(torch.empty(HUGE_PAGE)) is None
    model = model_with_a_tied_head()
    weight = model["embed"].weight
    assert to_huge_pages(model) == 0 and model["embed"].weight is weight


def test_the_setting_is_read_from_the_kernel(monkeypatch, tmp_path):
    huge_pages.huge_pages_support.cache_clear()
    try:
        for setting, expected in (("always [madvise] never", True), ("always madvise [never]", False)):
            (tmp_path / "enabled").write_text(setting + "\n")
            monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "enabled")
            huge_pages.huge_pages_support.cache_clear()
            if huge_pages.sys.platform.startswith("linux"):
                assert huge_pages.huge_pages_support()[0] is expected
        monkeypatch.setattr(huge_pages, "THP_SETTING", tmp_path / "missing")
        huge_pages.huge_pages_support.cache_clear()
        assert huge_pages.huge_pages_support()[0] is False
    finally:
        huge_pages.huge_pages_support.cache_clear()


def test_a_loaded_model_gives_the_same_logits_from_huge_pages():
    case = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"
    plain, moved = minisail.load(case), minisail.load(case)
    to_huge_pages(moved.language_model, min_bytes=1)  # the tiny model's tensors are small: move them all
    ids = torch.tensor([[5, 17, 3, 99, 42]])
    with torch.inference_mode():
        logits = plain.language_model(plain.language_model.embed(ids), torch.arange(5)[None])
        again = moved.language_model(moved.language_model.embed(ids), torch.arange(5)[None])
    assert torch.equal(logits, again)


def test_an_embedding_table_that_is_not_a_head_stays(monkeypatch):
    """A step reads one row of it: copying would make the whole table resident for nothing."""
    monkeypatch.setattr(huge_pages, "huge_pages_support", lambda: (True, "forced"))
    model = model_with_a_tied_head()
    model["head"].weight = torch.nn.Parameter(model["embed"].weight.detach().clone())  # untied
    table = model["embed"].weight
    to_huge_pages(model)
    assert model["embed"].weight is table and model["head"].weight.data_ptr() % HUGE_PAGE == 0


def test_the_copy_goes_chunk_by_chunk_and_the_heap_is_trimmed(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_support", lambda: (True, "forced"))
    monkeypatch.setattr(huge_pages, "COPY_CHUNK", 1000)  # many chunks, the last one partial
    released, trims = [], []
    monkeypatch.setattr(huge_pages, "release_mapped_pages", lambda t: released.append(t.numel()))
    monkeypatch.setattr(huge_pages, "trim_heap", lambda: trims.append(1))
    model = model_with_a_tied_head()
    before = model["head"].weight.detach().clone()
    to_huge_pages(model)
    assert torch.equal(model["head"].weight, before)
    assert sum(released) == 3000 * 1024 + 1024 * 1024 and max(released) == 500  # 1000 bytes of bf16, fp32: 250
    assert len(trims) == 2  # after each tensor moved
