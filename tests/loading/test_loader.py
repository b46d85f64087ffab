"""Strict loading: every tensor consumed, every parameter filled, shapes checked, clear errors, no half-loads."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from helpers.checkpoints import GOLDEN, golden_config, golden_tensors, write_checkpoint

import minisail
from minisail.checkpoint.export import to_official_state_dict
from minisail.checkpoint.keymaps import internlm2_wqkv
from minisail.errors import CheckpointError, ConfigError
from minisail.llm.decoder import DecoderConfig
from minisail.loading import QUANTIZE
from minisail.models.registry import FAMILIES, FAMILY_API, detect_family, family_of

CASE = "internvl-qwen2-tiny"


def copy_case(tmp_path, case=CASE):
    return shutil.copytree(GOLDEN / case / "checkpoint", tmp_path / case)


def test_load_defaults_to_the_checkpoint_dtype_and_is_zero_copy(views_of_any_size):
    model = minisail.load(GOLDEN / CASE / "checkpoint")
    assert model.language_model.embed.weight.dtype == torch.float32
    assert not any(p.requires_grad for p in model.parameters())
    assert not model.training
    # A tensor taken as stored is a view into the memory-mapped file, not a copy.
    assert model.language_model.embed.weight.untyped_storage().nbytes() > model.language_model.embed.weight.nbytes


def test_load_casts_to_the_requested_dtype():
    model = minisail.load(GOLDEN / CASE / "checkpoint", dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    for dtype in ("float8", torch.int8, torch.float8_e4m3fn):  # a torch.dtype too: only float16 to float64 run
        with pytest.raises(ConfigError, match="unknown dtype"):
            minisail.load(GOLDEN / CASE / "checkpoint", dtype=dtype)


def test_converted_and_fused_weights_do_not_keep_their_mapped_sources_resident(
    tmp_path, monkeypatch, views_of_any_size
):
    """Conversions and joins read the zero-copy views, then give their pages back (and only theirs)."""
    from minisail.checkpoint.safetensors_mmap import SafetensorsFile

    released = []
    real = SafetensorsFile.release
    monkeypatch.setattr(SafetensorsFile, "release", lambda self, name: (released.append(name), real(self, name)))
    stored = golden_tensors(CASE)
    model = minisail.load(GOLDEN / CASE / "checkpoint")  # float32 as stored: fused q/k/v and gate/up only
    fused = {n for n in released}
    assert fused and all(any(p in n for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")) for n in fused)
    assert len(fused) == len(released)  # each official tensor once
    layer = model.language_model.layers[0]
    prefix = "language_model.model.layers.0."
    want = torch.cat([stored[prefix + f"mlp.{k}_proj.weight"] for k in ("gate", "up")])
    assert torch.equal(layer.mlp.gate_up.weight, want)  # values intact after the sources' pages were dropped
    released.clear()
    model = minisail.load(GOLDEN / CASE / "checkpoint", dtype=torch.bfloat16)  # everything converted
    assert set(released) == set(stored)
    assert torch.equal(model.language_model.embed.weight, stored["language_model.model.embed_tokens.weight"].bfloat16())


def test_sharded_checkpoint_loads_the_same(tmp_path):
    config, tensors = golden_config(CASE), golden_tensors(CASE)
    folder = write_checkpoint(tmp_path / "sharded", config, tensors, shards=3)
    a = minisail.load(GOLDEN / CASE / "checkpoint")
    b = minisail.load(folder)
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_tensor_is_named(tmp_path):
    tensors = golden_tensors(CASE)
    del tensors["language_model.model.layers.1.self_attn.k_proj.bias"]
    folder = write_checkpoint(tmp_path / "c", golden_config(CASE), tensors)
    with pytest.raises(CheckpointError, match=r"layers\.1\.self_attn\.k_proj\.bias"):
        minisail.load(folder)


def test_unused_tensor_is_named(tmp_path):
    tensors = golden_tensors(CASE)
    tensors["language_model.model.layers.1.mlp.extra_proj.weight"] = torch.zeros(4, 4)
    folder = write_checkpoint(tmp_path / "c", golden_config(CASE), tensors)
    with pytest.raises(CheckpointError, match=r"not used.*layers\.1\.mlp\.extra_proj"):
        minisail.load(folder)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    config = golden_config(CASE)
    config["llm_config"]["intermediate_size"] = 100  # the weights say 128
    folder = write_checkpoint(tmp_path / "c", config, golden_tensors(CASE))
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight.*\(128, 64\)"):
        minisail.load(folder)


def test_untied_head_missing_is_an_error(tmp_path):
    tensors = golden_tensors(CASE)
    del tensors["language_model.lm_head.weight"]
    folder = write_checkpoint(tmp_path / "c", golden_config(CASE), tensors)
    with pytest.raises(CheckpointError, match="lm_head"):
        minisail.load(folder)


def test_truncated_shard_is_reported(tmp_path):
    folder = copy_case(tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        minisail.load(folder)


@pytest.mark.parametrize("content", [b"", b"\x01\x02", b"\xff" * 64])
def test_corrupt_file_is_reported(tmp_path, content):
    folder = copy_case(tmp_path)
    (folder / "model.safetensors").write_bytes(content)
    with pytest.raises(CheckpointError):
        minisail.load(folder)


def test_missing_shard_is_named(tmp_path):
    folder = shutil.copytree(GOLDEN / "internvl-internlm2-tiny" / "checkpoint", tmp_path / "c")
    (folder / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00003-of-00004.safetensors"):
        minisail.load(folder)


def test_index_pointing_at_the_wrong_shard(tmp_path):
    folder = shutil.copytree(GOLDEN / "internvl-internlm2-tiny" / "checkpoint", tmp_path / "c")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    key = next(iter(index["weight_map"]))
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][key]})
    index["weight_map"][key] = others[0]
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="does not hold it"):
        minisail.load(folder)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        minisail.load(tmp_path / "nowhere")
    (tmp_path / "a").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        minisail.load(tmp_path / "a")
    folder = copy_case(tmp_path)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        minisail.load(folder)
    config = golden_config(CASE)
    del config["llm_config"]["num_hidden_layers"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        minisail.load(folder)
    config = golden_config(CASE)
    config["vision_config"]["architectures"] = ["SomethingElse"]
    config["vision_config"]["model_type"] = "other"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="does not support"):
        detect_family(config)


def test_every_family_module_exports_the_same_names():
    for family in FAMILIES:
        missing = [name for name in FAMILY_API if not hasattr(family, name)]
        assert not missing, f"{family.__name__} lacks {missing}"
    assert len({family.NAME for family in FAMILIES}) == len(FAMILIES)


@pytest.mark.parametrize("case", ["internvl-qwen2-tiny", "mono-internvl-tiny", "sail-vl2-tiny", "yi-vl-tiny"])
def test_a_loaded_model_knows_its_family_and_chats_through_real_methods(case):
    model = minisail.load(GOLDEN / case / "checkpoint")
    config = json.loads((GOLDEN / case / "checkpoint" / "config.json").read_text())
    assert family_of(model) is detect_family(config) and family_of(model).NAME == model.family
    assert not {"chat", "batch_chat", "family"} & vars(model).keys()  # class attributes, nothing patched on


@pytest.mark.parametrize("case", [CASE, "internvl-internlm2-tiny"])
def test_weight_map_round_trips_to_the_official_keys(case):
    model = minisail.load(GOLDEN / case / "checkpoint")
    family = detect_family(golden_config(case))
    official = to_official_state_dict(model, family.weight_map(model.config))
    stored = golden_tensors(case)
    assert official.keys() == stored.keys()
    for name, value in stored.items():
        assert torch.equal(official[name], value), name


def test_internlm2_wqkv_grouping():
    """Rows of wqkv: per kv head, its g query heads, then k, then v; query head h*g + j uses kv head h."""
    config = DecoderConfig(
        vocab_size=8, hidden_size=4, num_layers=1, num_heads=6, num_kv_heads=2, head_dim=3,
        intermediate_size=4, rms_norm_eps=1e-5, rope_theta=1e4, max_position_embeddings=8,
    )  # fmt: skip
    g, d = 3, 3
    rows = torch.arange(2 * (g + 2) * d, dtype=torch.float32)[:, None].expand(-1, 4)  # row r holds the value r
    fused = internlm2_wqkv(config).join([rows])
    q, k, v = fused[:, 0].split([6 * d, 2 * d, 2 * d])
    group = g + 2
    assert q.tolist() == [float(h * group * d + j * d + i) for h in range(2) for j in range(g) for i in range(d)]
    assert k.tolist() == [float(h * group * d + g * d + i) for h in range(2) for i in range(d)]
    assert v.tolist() == [float(h * group * d + (g + 1) * d + i) for h in range(2) for i in range(d)]
    assert torch.equal(internlm2_wqkv(config).split(fused)[0], rows)


def test_select_layer_outside_the_vit_is_a_config_error(tmp_path):
    config = golden_config(CASE)
    config["select_layer"] = -8  # the tiny ViT has 6 layers: hidden_states has 7 entries
    folder = write_checkpoint(tmp_path / "c", config, golden_tensors(CASE))
    with pytest.raises(ConfigError, match="select_layer -8 is outside a 6-layer InternViT"):
        minisail.load(folder)


@pytest.mark.parametrize("folder", ["sail-vl2", "internvl-qwen2.5", "internvl-internlm2"])
def test_image_token_id_comes_from_the_checkpoint_tokenizer(folder, request):
    from minisail.loading import image_token_id_from_tokenizer

    tokenizer_dir = request.getfixturevalue(
        {"sail-vl2": "sailvl2_tokenizer_dir", "internvl-qwen2.5": "qwen25_tokenizer_dir"}.get(
            folder, "internlm2_tokenizer_dir"
        )
    )
    expected = minisail.load_tokenizer(tokenizer_dir).token_to_id("<IMG_CONTEXT>")
    assert image_token_id_from_tokenizer(tokenizer_dir, None) == expected
    assert expected in (151671, 151667, 92546)


def test_loaded_models_have_the_upstream_chat_methods():
    model = minisail.load(GOLDEN / CASE / "checkpoint")
    assert callable(model.chat) and callable(model.batch_chat)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda c: c.update(select_layer="x"), "select_layer = 'x' has the wrong type"),
        (lambda c: c["llm_config"].update(rope_theta="abc"), "rope_theta = 'abc' has the wrong type"),
        (lambda c: c["llm_config"].update(rope_scaling={"type": "dynamic"}), "no 'factor'"),
        (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 2}), "'yarn' is not supported"),
        (lambda c: c.update(vision_config="oops"), "vision_config is str, not an object"),
        (lambda c: c["llm_config"].update(num_key_value_heads=3), "not a multiple of 3 kv heads"),
        (lambda c: c.update(max_dynamic_patch=True), "max_dynamic_patch = True has the wrong type"),
    ],
)
def test_malformed_config_values_are_config_errors(tmp_path, edit, message):
    config = golden_config(CASE)
    edit(config)
    folder = write_checkpoint(tmp_path / "c", config, golden_tensors(CASE))
    with pytest.raises(ConfigError, match=message):
        minisail.load(folder)


def test_bad_device_is_refused_before_loading():
    with pytest.raises(ConfigError, match="unknown device 'foo'"):
        minisail.load(GOLDEN / CASE / "checkpoint", device="foo")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="not available"):
            minisail.load(GOLDEN / CASE / "checkpoint", device="cuda")
    with pytest.raises(ConfigError, match="device meta holds no values"):  # it loaded, then nothing could run
        minisail.load(GOLDEN / CASE / "checkpoint", device="meta")


def test_tp_1_is_the_plain_model():  # one rank: nothing to shard, no process group needed (as the CLI's --tp 1)
    model = minisail.load(GOLDEN / CASE / "checkpoint", tp=1)
    assert model.tensor_parallel is None


@pytest.mark.parametrize(("tp", "message"), [(0, "at least 1"), (2, "launch.start")])
def test_tensor_parallel_without_a_process_group_is_refused_in_words(tp, message):
    with pytest.raises(ConfigError, match=message):
        minisail.load(GOLDEN / CASE / "checkpoint", tp=tp)


def test_a_tied_head_shares_the_embedding_tensor(tmp_path):
    config = golden_config(CASE)
    config["llm_config"]["tie_word_embeddings"] = True
    tensors = golden_tensors(CASE)
    tensors["language_model.lm_head.weight"] = tensors["language_model.model.embed_tokens.weight"]
    del tensors["language_model.lm_head.weight"]
    folder = write_checkpoint(tmp_path / "c", config, tensors)
    for dtype in (torch.float32, torch.bfloat16):  # as stored (a view) and converted (a copy)
        model = minisail.load(folder, dtype=dtype)
        assert model.language_model.lm_head.weight is model.language_model.embed.weight


def test_the_parameter_count_is_the_checkpoints_whatever_int8_or_int4_make_of_it():
    from safetensors import safe_open

    folder = GOLDEN / CASE / "checkpoint"
    with safe_open(folder / "model.safetensors", "pt") as file:
        stored = sum(math.prod(file.get_slice(key).get_shape()) for key in file.keys())
    counts = {quantize: minisail.load(folder, quantize=quantize).checkpoint_parameters for quantize in QUANTIZE}
    assert set(counts.values()) == {stored}  # int4 once counted its packed bytes, a quantised tied head twice
    for case in ("yi-vl-tiny", "sail-vl2-tiny"):  # the keys a weight map ignores are not counted (Yi-VL has some)
        model = minisail.load(GOLDEN / case / "checkpoint", dtype=torch.float32)
        assert model.checkpoint_parameters == sum(p.numel() for p in model.parameters())
