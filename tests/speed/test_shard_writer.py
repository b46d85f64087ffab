"""The benchmark's shard-by-shard checkpoint writer (bench/shard_writer.py), at toy widths of three layouts.

- its files are byte for byte those of the whole-model writer it replaces (build the model in bf16, fill it in
  state_dict order, write `to_official_state_dict`), so the cached FORMAT 2 checkpoints stay valid;
- they load strictly with `minisail.load` (every tensor used, every shape checked);
- while writing it holds one shard's tensors and nothing more: counted by instrumenting `save_file` (every live bf16
  tensor's storage, found through the garbage collector), not by timing or RSS;
- the SAIL-VL2-8B preset has the real shapes: its builder gives SAIL-VL2-2B's published parameter count.
"""

from __future__ import annotations

import gc

import pytest
import torch

import minisail
from bench import presets, shard_writer
from bench.models import build_on_meta
from bench.presets import QWEN3_8B, Preset, _sail_vl2, get_preset
from minisail.checkpoint.export import to_official_state_dict
from minisail.checkpoint.files import open_safetensors_folder
from minisail.models.registry import detect_family

TOY = {"hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 128}
SAIL_VL2_TOY = Preset(  # embeddings of 270000 x 64 > 2^24 values: cut from the pool at two offsets
    "sail-vl2-toy",
    _sail_vl2(
        {**QWEN3_8B, **TOY, "vocab_size": 270_000, "num_hidden_layers": 3, "head_dim": 32},
        vit_hidden=64,
        vit_layers=2,
        vit_heads=4,
        vit_intermediate=128,
    ),
    image_token_id=999,
)
MONO = get_preset("mono-internvl-2b").config
MONO_TOY = Preset(  # InternLM2's wqkv, regrouped per key/value head: a Join that is not a plain split of rows
    "mono-toy",
    {
        **MONO,
        "vision_config": {**MONO["vision_config"], "hidden_size": 64},
        "llm_config": {**presets.INTERNLM2_1_8B_VE, **TOY, "vocab_size": 1000, "num_hidden_layers": 2},
    },
    image_token_id=999,
)
TOYS = [get_preset("tiny"), SAIL_VL2_TOY, MONO_TOY]


def whole_model_checkpoint(preset: Preset, folder, seed: int, shard_bytes: int) -> None:
    """The writer the streaming one replaces (FORMAT 2): the whole model in bf16, filled in state_dict order from a
    pool of 2^24 samples at seeded offsets, scaled, written through to_official_state_dict."""
    model, keymap = build_on_meta(preset)
    model = model.to(torch.bfloat16).to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(1 << 24, generator=generator)
    pool = torch.cat([pool, pool])
    with torch.no_grad():
        for name, p in model.state_dict().items():
            flat = p.view(-1)
            for start in range(0, flat.numel(), 1 << 24):
                chunk = flat[start : start + (1 << 24)]
                offset = int(torch.randint(0, 1 << 24, (1,), generator=generator))
                chunk.copy_(pool[offset : offset + chunk.numel()])
            if p.ndim == 1 and "norm" in name and name.endswith("weight"):
                p.mul_(0.1).add_(1.0)
            elif p.ndim >= 2:
                p.mul_(p.shape[-1] ** -0.5)
            else:
                p.mul_(0.1)
    folder.mkdir()
    shard_writer.write_shards(folder, to_official_state_dict(model, keymap), shard_bytes)


def total_bytes(preset: Preset) -> int:
    model, _ = build_on_meta(preset)
    return sum(p.numel() for p in model.state_dict().values()) * 2


@pytest.mark.parametrize("preset", TOYS, ids=lambda p: p.name)
def test_shards_are_the_whole_model_writers_and_load_strictly(preset, tmp_path):
    shard_bytes = 1 << 16  # several shards, fused parameters cut across them
    whole_model_checkpoint(preset, tmp_path / "whole", seed=7, shard_bytes=shard_bytes)
    shard_writer.write_official(preset, tmp_path / "streamed", seed=7, shard_bytes=shard_bytes)
    files = sorted(f.name for f in (tmp_path / "streamed").iterdir())
    assert sum(name.endswith(".safetensors") for name in files) >= 5
    assert files == sorted([*(f.name for f in (tmp_path / "whole").iterdir()), "config.json"])
    for name in files:
        if name != "config.json":
            assert (tmp_path / "streamed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    model = minisail.load(tmp_path / "streamed")  # strict: every tensor used, every shape checked
    tensors = open_safetensors_folder(tmp_path / "streamed")
    official = to_official_state_dict(model, detect_family(preset.config).weight_map(model.config))
    assert set(official) == set(tensors.keys()) and {tensors.dtype(n) for n in official} == {torch.bfloat16}
    assert all(torch.equal(official[name], tensors.read(name)) for name in official)


def live_bf16_bytes() -> int:
    """Bytes of every bf16 storage a live Python tensor holds on the CPU (each storage once: views share theirs).
    Only plain strided tensors: other tests leave fake and functional tensors (torch.compile) and opaque oneDNN
    tensors (packed Linears) behind, with no storage."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) or obj.layout != torch.strided:
            continue
        if obj.dtype == torch.bfloat16 and obj.device.type == "cpu" and not obj.is_mkldnn:
            try:
                storage = obj.untyped_storage()
            except (NotImplementedError, RuntimeError):  # an opaque tensor whose layout says strided
                continue
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_the_writer_holds_one_shard_at_a_time(tmp_path, monkeypatch):
    """At every save_file call the bf16 tensors alive are exactly that shard's (no other shard's, no fused parameter
    kept whole by a view of one part), and none are left after the last one."""
    real_save, held, written = shard_writer.save_file, [], []

    def instrumented_save(tensors, filename, metadata=None):
        gc.collect()
        held.append(live_bf16_bytes() - baseline)
        written.append(sum(t.numel() * t.element_size() for t in tensors.values()))
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(shard_writer, "save_file", instrumented_save)
    total, shard_bytes = total_bytes(SAIL_VL2_TOY), 1 << 16
    gc.collect()
    baseline = live_bf16_bytes()
    shard_writer.write_official(SAIL_VL2_TOY, tmp_path, seed=1, shard_bytes=shard_bytes)
    gc.collect()
    assert live_bf16_bytes() == baseline  # nothing kept after writing
    assert len(written) >= 8 and sum(written) == total  # every tensor written once
    assert held == written  # one shard's tensors at a time, and nothing else
    largest = max(p.numel() * 2 for p in build_on_meta(SAIL_VL2_TOY)[0].state_dict().values())
    assert all(size <= max(shard_bytes, largest) for size in written)  # only a single oversized tensor goes over


def test_sail_vl2_8b_preset_has_the_real_shapes():
    """SAIL-ViT-Huge + Qwen3-8B; the same builder with Qwen3-1.7B gives SAIL-VL2-2B's published count
    (FACTS.md 6: total_size 5,461,130,240 B / 2), and its official keys follow the golden sail-vl2 layout."""
    qwen3_1_7b = {
        **QWEN3_8B,
        "hidden_size": 2048,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "intermediate_size": 6144,
    }
    assert total_bytes(Preset("sail-vl2-2b", _sail_vl2(qwen3_1_7b), 151671)) // 2 == 2_730_565_120
    preset = get_preset("sail-vl2-8b")
    assert total_bytes(preset) // 2 == pytest.approx(8.915e9, rel=1e-3)
    _slots, layout = shard_writer.official_layout(preset)
    assert "language_model.lm_head.weight" in layout and "mlp1.1.weight" in layout  # untied head, the projector
    assert tuple(layout["mlp1.1.weight"][3].shape) == (4096, 6144)
    assert "language_model.model.layers.35.self_attn.k_norm.weight" in layout
    assert "vision_model.trunk.blocks.23.mlp.fc3.weight" in layout
