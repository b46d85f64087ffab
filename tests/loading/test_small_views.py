"""Small tensors leave the memory-mapped checkpoint at load, and a released tensor gives back the 2 MiB-aligned span
of the file around it (minisail/fast/memory.py `CopySmallViews`, checkpoint/safetensors_mmap.py `release`).

Reading one mapped byte maps the page cache's whole folio around it (up to 2 MiB on Linux 6.x), so a small view
the model keeps would hold ~2 MiB of its neighbours resident; measured on SAIL-VL-2B, 0.17 GB. The numbers stay the
same: a copy is the bytes, and released pages come back from the file when read again."""

from __future__ import annotations

import torch
from helpers.checkpoints import GOLDEN
from safetensors.torch import save_file

import minisail
from minisail.checkpoint import safetensors_mmap
from minisail.checkpoint.safetensors_mmap import FOLIO, SafetensorsFile
from minisail.fast import memory

CASE = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"


def mapped(tensor: torch.Tensor) -> bool:
    return memory.file_backing(tensor.data_ptr()) is not None


def test_small_tensors_are_copied_and_large_ones_stay_views(monkeypatch):
    monkeypatch.setattr(memory, "SMALL_VIEW_BYTES", 20_000)  # the tiny model's tensors on both sides of it
    model = minisail.load(CASE)  # float32 as stored: every tensor taken as it is, unless small
    reference = minisail.load(CASE, dtype=torch.float64)  # every tensor converted: the stored values
    sizes = {name: p.numel() * p.element_size() for name, p in model.named_parameters()}
    large = {name for name, size in sizes.items() if size >= 20_000}
    assert large and len(large) < len(sizes)
    fused = ("qkv", "gate_up")  # joined at load from several official tensors: never views
    for name, p in model.named_parameters():
        if not any(f in name for f in fused):
            assert mapped(p) == (name in large), name
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(p.double(), q), name


def test_by_default_the_tiny_models_hold_no_mapped_tensor():
    model = minisail.load(CASE)
    assert not any(mapped(p) for p in model.parameters())


def test_release_gives_back_the_aligned_span_within_the_file(tmp_path, monkeypatch):
    tensors = {name: torch.ones(1_500_000 // 4) for name in ("a", "b", "c")}  # 1.5 MB each: across 2 MiB lines
    tensors["d"] = torch.ones(10)
    save_file(tensors, tmp_path / "model.safetensors")
    file = SafetensorsFile(tmp_path / "model.safetensors")
    released = []
    monkeypatch.setattr(safetensors_mmap, "release_pages", lambda address, nbytes: released.append((address, nbytes)))
    views = {name: file.view(name) for name in tensors}
    base = file._bytes.data_ptr()
    for name in tensors:
        _, _, begin, end = file.entries[name]
        released.clear()
        file.release(name)
        [(address, nbytes)] = released
        start = address - base
        assert start % FOLIO == 0 and start <= begin < start + FOLIO  # the folio line at or before the tensor
        assert start + nbytes >= end and start + nbytes <= file.file_size  # past its end, never past the file
        assert start + nbytes == min(-(-end // FOLIO) * FOLIO, file.file_size)
    monkeypatch.undo()
    for name in tensors:  # for real: the values come back from the file
        file.release(name)
        assert torch.equal(views[name], tensors[name]), name
