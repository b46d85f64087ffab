"""Hostile config.json files: every value the math depends on is read and checked before the model is built.

A config may come from anywhere (a hand edit, a converter, a fuzzer): minisail must either load it and compute
what it says, or refuse it with a MinisailError naming the key and the accepted values. Never a TypeError from
deep inside torch, never a model that silently computes something else (a gelu decoder run as SiLU), never
minutes of building for a config asking for 10**9 layers.

The checkpoints are the golden cases' (tiny, official layout): each test hard-links (or copies) their weight files
into a temporary folder next to an edited config.json (not symbolic links: minisail refuses links out of a folder).
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import GOLDEN, golden_config, golden_tensors, write_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minisail
from minisail.errors import CheckpointError, ConfigError, MinisailError
from minisail.loading import read_model_config

QWEN2, INTERNLM2, MONO, SAILVL2, YIVL = (
    "internvl-qwen2-tiny",
    "internvl-internlm2-tiny",
    "mono-internvl-tiny",
    "sail-vl2-tiny",
    "yi-vl-tiny",
)
CASES = [QWEN2, INTERNLM2, MONO, SAILVL2, YIVL]
YIVL_VIT = "vit/clip-vit-tiny-p14-yi-vl-56"


def case_folder(case: str, folder: Path, config: dict | None = None, vit_config: dict | None = None) -> Path:
    """`folder` holding hard links to (or copies of) the golden case's weights and the given config.json
    (default: the case's own).
    Yi-VL's vision folder is rebuilt the same way, with `vit_config` as its config.json."""
    source = GOLDEN / case / "checkpoint"
    folder.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.is_file() and path.name != "config.json":
            _place(path, folder / path.name)
    (folder / "config.json").write_text(json.dumps(config if config is not None else golden_config(case)))
    if case == YIVL:
        vit = folder / YIVL_VIT
        vit.mkdir(parents=True)
        for path in (source / YIVL_VIT).iterdir():
            if path.name != "config.json":
                _place(path, vit / path.name)
        if vit_config is None:
            vit_config = json.loads((source / YIVL_VIT / "config.json").read_text())
        (vit / "config.json").write_text(json.dumps(vit_config))
    return folder


def _place(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)


def vit_config() -> dict:
    return json.loads((GOLDEN / YIVL / "checkpoint" / YIVL_VIT / "config.json").read_text())


def llm_section(case: str, config: dict) -> dict:
    """The language model's config: llm_config, or the top level for Yi-VL (a Llama config plus mm_* keys)."""
    return config if case == YIVL else config["llm_config"]


def load_edited(tmp_path, case: str, edit=None, edit_vit=None):
    config, vit = golden_config(case), vit_config() if case == YIVL else None
    if edit is not None:
        edit(config)
    if edit_vit is not None:
        edit_vit(vit)
    return minisail.load(case_folder(case, tmp_path / "ckpt", config, vit))


# --- activations: read everywhere the math depends on them ------------------------------------------------------


@pytest.mark.parametrize("case", [QWEN2, INTERNLM2, MONO, SAILVL2, YIVL])
@pytest.mark.parametrize("act", ["gelu", "relu", "gelu_pytorch_tanh", 1, None])
def test_decoder_hidden_act_must_be_silu(tmp_path, case, act):
    def edit(config):
        llm_section(case, config)["hidden_act"] = act

    if act is None:  # null or absent: the class default, silu
        assert load_edited(tmp_path, case, edit) is not None
        return
    with pytest.raises(ConfigError, match=r"hidden_act.*(not supported: accepted 'silu', 'swish'|wrong type)"):
        load_edited(tmp_path, case, edit)


@pytest.mark.parametrize(
    ("case", "act", "accepted"),
    [
        (QWEN2, "gelu_pytorch_tanh", "'gelu'"),  # InternViT: exact GELU only
        (INTERNLM2, "quick_gelu", "'gelu'"),
        (SAILVL2, "gelu", "'silu'"),  # SAIL-ViT: the SwiGLU is SiLU in upstream's code, whatever a config says
    ],
)
def test_vision_hidden_act_is_checked(tmp_path, case, act, accepted):
    with pytest.raises(ConfigError, match=f"vision_config.hidden_act {act!r} is not supported: accepted {accepted}"):
        load_edited(tmp_path, case, lambda c: c["vision_config"].update(hidden_act=act))


def test_clip_hidden_act_is_checked(tmp_path):
    with pytest.raises(ConfigError, match="hidden_act 'relu' is not supported: accepted 'gelu', 'quick_gelu'"):
        load_edited(tmp_path, YIVL, edit_vit=lambda v: v.update(hidden_act="relu"))


def test_mono_patch_model_ignores_the_vit_fields_it_has_no_use_for(tmp_path):
    # no MLP, no norm, no layers: upstream ignores these keys, so does minisail
    edit = {"hidden_act": "relu", "layer_norm_eps": -1, "num_hidden_layers": 10**9}
    assert load_edited(tmp_path, MONO, lambda c: c["vision_config"].update(edit)) is not None


# --- decoder switches the decoder does not implement -------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        (QWEN2, {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window = true is not supported"),
        (SAILVL2, {"use_sliding_window": True}, "use_sliding_window = true is not supported"),
        (QWEN2, {"use_sliding_window": "false"}, "use_sliding_window = 'false' has the wrong type"),
        (SAILVL2, {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types must be 2 x 'full_attention'"),
        (QWEN2, {"layer_types": ["full_attention"]}, "layer_types must be 2 x 'full_attention'"),
        (QWEN2, {"layer_types": [["full_attention"], ["full_attention"]]}, "layer_types must be 2 x 'full_attention'"),
        (YIVL, {"mlp_bias": True}, "mlp_bias = true is not supported"),
        (YIVL, {"attention_bias": True}, "attention_bias = true is not supported"),
        (SAILVL2, {"attention_bias": True}, "attention_bias = true is not supported"),
        (INTERNLM2, {"bias": True}, "bias = true"),
        (QWEN2, {"partial_rotary_factor": 0.5}, "partial_rotary_factor = 0.5 is not supported"),
        (INTERNLM2, {"head_dim": 8}, "head_dim 8 != hidden_size 64 / 4 heads"),
        (QWEN2, {"head_dim": 15}, "head_dim 15 x 4 heads is not supported"),
        (QWEN2, {"hidden_size": 66}, "hidden_size 66 is not divisible by 4 heads"),
        (QWEN2, {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "type 'linear' is not supported"),
        (QWEN2, {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "type 'yarn' is not supported"),
        (INTERNLM2, {"rope_scaling": {"type": "dynamic", "factor": 1e308}}, "factor = 1e[+]?308 is out of range"),
    ],
)
def test_unimplemented_decoder_switches_are_refused(tmp_path, case, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_edited(tmp_path, case, lambda c: llm_section(case, c).update(edit))


def test_harmless_decoder_keys_are_accepted(tmp_path):
    """Keys that do not change inference (see minisail/config.py): dropout, Llama's pretraining_tp, Qwen2's
    sliding_window / max_window_layers while use_sliding_window is false, all-full layer_types."""
    edit = {"attention_dropout": 0.1, "sliding_window": 7, "max_window_layers": 1}
    edit["layer_types"] = ["full_attention"] * 2
    assert load_edited(tmp_path / "q", QWEN2, lambda c: c["llm_config"].update(edit))
    assert load_edited(tmp_path / "y", YIVL, lambda c: c.update(pretraining_tp=4, attention_dropout=0.5))


def test_transformers_5_rope_parameters_are_read():
    config = golden_config(INTERNLM2)
    llm = config["llm_config"]
    del llm["rope_theta"], llm["rope_scaling"]
    llm["rope_parameters"] = {"rope_type": "dynamic", "factor": 3.0, "rope_theta": 123456.0}
    parsed = read_model_config_of(INTERNLM2, config).llm
    assert (parsed.rope_theta, parsed.rope_dynamic_factor) == (123456.0, 3.0)
    llm["rope_parameters"] = {"rope_type": "default", "rope_theta": 5e5}
    parsed = read_model_config_of(INTERNLM2, config).llm
    assert (parsed.rope_theta, parsed.rope_dynamic_factor) == (5e5, None)


def test_qwen3_without_head_dim_uses_the_class_default():
    config = golden_config(SAILVL2)
    del config["llm_config"]["head_dim"]
    assert read_model_config_of(SAILVL2, config).llm.head_dim == 128  # Qwen3Config's default, not 64 / 4


def read_model_config_of(case: str, config: dict):
    with tempfile.TemporaryDirectory() as tmp:
        return read_model_config(case_folder(case, Path(tmp) / "ckpt", config)).parsed


# --- numbers: finite, in range, of the right JSON type ----------------------------------------------------------

NON_FINITE = [math.nan, math.inf, -math.inf]


@pytest.mark.parametrize("value", [0, -1.0, 10**400, *NON_FINITE])
def test_rope_theta_must_be_finite_and_positive(tmp_path, value):
    with pytest.raises(ConfigError, match=r"rope_theta = .* is out of range: accepted a finite number > 0"):
        load_edited(tmp_path, QWEN2, lambda c: c["llm_config"].update(rope_theta=value))


@pytest.mark.parametrize(
    ("case", "section", "key"),
    [
        (QWEN2, "llm_config", "rms_norm_eps"),
        (YIVL, None, "rms_norm_eps"),
        (QWEN2, "vision_config", "layer_norm_eps"),
        (INTERNLM2, "vision_config", "layer_norm_eps"),
        (SAILVL2, "vision_config", "rms_norm_eps"),
    ],
)
@pytest.mark.parametrize("value", [0, -1e-6, *NON_FINITE])
def test_norm_epsilons_must_be_finite_and_positive(tmp_path, case, section, key, value):
    def edit(config):
        (config[section] if section else config)[key] = value

    with pytest.raises(ConfigError, match=rf"{key} = .* is out of range: accepted a finite number > 0"):
        load_edited(tmp_path, case, edit)


@pytest.mark.parametrize("value", [0, -1e-5, *NON_FINITE])
def test_clip_layer_norm_eps(tmp_path, value):
    with pytest.raises(ConfigError, match=r"layer_norm_eps = .* is out of range"):
        load_edited(tmp_path, YIVL, edit_vit=lambda v: v.update(layer_norm_eps=value))


@pytest.mark.parametrize("factor", [1.0, 0.5, 0, -2, *NON_FINITE])
def test_dynamic_ntk_factor_must_exceed_one(tmp_path, factor):
    with pytest.raises(ConfigError, match=r"rope_scaling.factor = .* accepted a finite number > 1"):
        load_edited(tmp_path, INTERNLM2, lambda c: c["llm_config"]["rope_scaling"].update(factor=factor))


@pytest.mark.parametrize("ratio", [0, -0.5, 1.5, 0.3, 1 / 3, 1 / 16, 5e-324, 10**400, *NON_FINITE])
def test_downsample_ratio_must_be_one_over_a_divisor_of_the_grid(tmp_path, ratio):
    # the tiny case has an 8x8 patch grid (112 px / 14): k = 3 or 16 does not divide it
    with pytest.raises(ConfigError, match=r"downsample_ratio = .* (is out of range|is not supported for a 8x8)"):
        load_edited(tmp_path, QWEN2, lambda c: c.update(downsample_ratio=ratio))


def test_json_integers_too_long_to_parse_are_a_config_error(tmp_path):
    folder = case_folder(QWEN2, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"select_layer": ' + "9" * 5000 + "}")  # Python caps int() at 4300 digits
    with pytest.raises(ConfigError, match="not valid JSON"):
        minisail.load(folder)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("hidden_size", True),
        ("hidden_size", 64.0),
        ("vocab_size", "400"),
        ("num_attention_heads", False),
        ("intermediate_size", -128),
        ("num_key_value_heads", 0),
        ("max_position_embeddings", 2**63),
        ("vocab_size", 10**18),
        ("hidden_size", 10**400),
    ],
)
def test_sizes_are_whole_bounded_numbers(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"llm_config.{key} = .* (has the wrong type|is out of range)"):
        load_edited(tmp_path, QWEN2, lambda c: c["llm_config"].update({key: value}))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"image_size": 10**6}, "image_size = 1000000 is out of range: accepted 1 .. 32768"),
        ({"patch_size": 200}, "patch_size 200 is larger than image_size 112"),
        ({"qkv_bias": "true"}, "qkv_bias = 'true' has the wrong type"),
        ({"norm_type": ["rms_norm"]}, "norm_type = \\['rms_norm'\\] has the wrong type"),
    ],
)
def test_vision_fields(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_edited(tmp_path, QWEN2, lambda c: c["vision_config"].update(edit))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"force_image_size": -112}, "force_image_size = -112 is out of range"),
        ({"force_image_size": 7}, "force_image_size 7 is smaller than one 14-pixel patch"),
        ({"max_dynamic_patch": 0}, "max_dynamic_patch = 0 is out of range"),
        ({"use_thumbnail": 1}, "use_thumbnail = 1 has the wrong type"),
        ({"template": 5}, "template = 5 has the wrong type"),
    ],
)
def test_chat_level_fields(tmp_path, edit, message):
    with pytest.raises(ConfigError, match=message):
        load_edited(tmp_path, QWEN2, lambda c: c.update(edit))


def test_deeply_nested_json_is_a_config_error(tmp_path):
    folder = case_folder(QWEN2, tmp_path / "ckpt")
    (folder / "config.json").write_text('{"a": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(ConfigError, match="nests too deeply"):
        minisail.load(folder)


# --- layer counts: the checkpoint's own keys, before anything is built ------------------------------------------


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        (QWEN2, ("llm_config", "num_hidden_layers"), "llm_config.num_hidden_layers = 1000000"),
        (QWEN2, ("vision_config", "num_hidden_layers"), "vision_config.num_hidden_layers = 1000000"),
        (INTERNLM2, ("llm_config", "num_hidden_layers"), "under 'language_model.model.layers.{i}.'"),
        (SAILVL2, ("vision_config", "num_hidden_layers"), "numbers 4 under 'vision_model.trunk.blocks.{i}.'"),
        (MONO, ("llm_config", "num_hidden_layers"), "but the checkpoint numbers 2"),
        (YIVL, (None, "num_hidden_layers"), "num_hidden_layers = 1000000, but the checkpoint numbers 2 under "),
    ],
)
def test_layer_counts_are_checked_against_the_checkpoint_before_the_build(tmp_path, case, edit, message):
    section, key = edit

    def change(config):
        (config[section] if section else config)[key] = 10**6

    start = time.perf_counter()
    with pytest.raises(CheckpointError, match=message.replace("{", r"\{").replace("}", r"\}")):
        load_edited(tmp_path, case, change)
    assert time.perf_counter() - start < 10  # nothing was built for a million layers


def test_yivl_vision_layers_and_projector_depth_are_counted(tmp_path):
    with pytest.raises(CheckpointError, match=r"vit folder's num_hidden_layers = 1000000, but .* numbers 4"):
        load_edited(tmp_path / "a", YIVL, edit_vit=lambda v: v.update(num_hidden_layers=10**6))
    with pytest.raises(CheckpointError, match=r"mlpNx_gelu_Norm\) = 3, but the checkpoint numbers 2"):
        load_edited(tmp_path / "b", YIVL, lambda c: c.update(mm_projector_type="mlp3x_gelu_Norm"))
    with pytest.raises(CheckpointError, match=r"mlpNx_gelu_Norm\) = 4000000, but the checkpoint numbers 2"):
        load_edited(tmp_path / "c", YIVL, lambda c: c.update(mm_projector_type="mlp4000000x_gelu_Norm"))


@pytest.mark.parametrize(
    ("case", "edit", "message"),
    [
        (QWEN2, lambda c: c["llm_config"].update(num_hidden_layers=10**9), "num_hidden_layers = 1000000000 is out"),
        (YIVL, lambda c: c.update(mm_projector_type="mlp999999999x_gelu_Norm"), "mm_projector_type"),
    ],
)
def test_absurd_counts_fail_at_once(tmp_path, case, edit, message):
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message):
        load_edited(tmp_path, case, edit)
    assert time.perf_counter() - start < 10


# --- fused weights: every official part has its own shape checked ----------------------------------------------


def test_fused_qkv_parts_with_swapped_sizes_are_refused(tmp_path):
    """q_proj [64, 64] and k_proj [32, 64] swapped: the joined [128, 64] is right, the parts are not."""
    tensors = golden_tensors(QWEN2)
    prefix = "language_model.model.layers.0.self_attn."
    for kind in ("weight", "bias"):
        q, k = tensors[f"{prefix}q_proj.{kind}"], tensors[f"{prefix}k_proj.{kind}"]
        tensors[f"{prefix}q_proj.{kind}"], tensors[f"{prefix}k_proj.{kind}"] = k[:32].clone(), q.clone()
    with pytest.raises(CheckpointError, match=r"needs shape \(64, 64\) \(of \(128, 64\) in all\) from tensor .*q_proj"):
        minisail.load(write_checkpoint(tmp_path / "c", golden_config(QWEN2), tensors))


def test_int8_fused_parts_and_their_scales_are_checked_one_by_one(tmp_path):
    """The same swap in a bitsandbytes int8 checkpoint, each weight with its own per-row scales (SCB)."""
    tensors = golden_tensors(QWEN2)
    prefix = "language_model.model.layers.0.self_attn."
    for name in ("q_proj", "k_proj", "v_proj"):
        weight = tensors[f"{prefix}{name}.weight"]
        absmax = weight.abs().amax(dim=1).clamp(min=1e-8)  # [rows]
        tensors[f"{prefix}{name}.weight"] = torch.round(weight * 127 / absmax[:, None]).to(torch.int8)
        tensors[f"{prefix}{name}.SCB"] = absmax
    for kind in ("weight", "SCB", "bias"):
        q, k = tensors[f"{prefix}q_proj.{kind}"], tensors[f"{prefix}k_proj.{kind}"]
        tensors[f"{prefix}q_proj.{kind}"], tensors[f"{prefix}k_proj.{kind}"] = k, q
    with pytest.raises(CheckpointError, match=r"needs shape \(64, 64\) .* from tensor .*q_proj\.weight.* \(32, 64\)"):
        minisail.load(write_checkpoint(tmp_path / "c", golden_config(QWEN2), tensors))


# --- fuzz: random edits of the golden configs only ever load or raise a MinisailError ---------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-3, max_value=300)
    | st.sampled_from([0, -1, 2**31, 2**63, 10**9, 10**18, 10**400, -(10**400)])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([0.5, 0.25, 1.0, 1e-6, -1e-6, 1e308, 5e-324])
    | st.text(max_size=6)
    | st.sampled_from(
        ["silu", "gelu", "quick_gelu", "dynamic", "default", "linear", "v1", "v2", "rms_norm", "layer_norm"]
        + ["mlp2x_gelu_Norm", "mlp999999999x_gelu_Norm", "full_attention", "sliding_attention", "patch"]
    )
)
JSON = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)
FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 40))  # per case; raise it for a longer hunt
# keys a config may carry that the golden ones do not: switches the readers must refuse or accept knowingly
EXTRA_KEYS = [
    "rope_parameters",
    "rope_scaling",
    "use_sliding_window",
    "layer_types",
    "head_dim",
    "mlp_bias",
    "attention_bias",
    "partial_rotary_factor",
    "hidden_act",
    "quantization_config",
    "norm_type",
    "num_channels",
]


def numeric_variants(value) -> list:
    """Edits of a number that stay plausible-looking: the boundary cases of every range check."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return [0, -1, math.nan]
    as_float = float(value) if abs(value) < 1e300 else math.inf  # repeated edits can grow an int past float range
    variants = [0, -value, value + 1, value - 1, value * 10**6, as_float, math.nan, math.inf, -math.inf, True]
    return variants + ([value / 3, value * 2.0] if isinstance(value, float) else [10**30])


@st.composite
def edited_config(draw, case: str):
    """(config.json, vit config.json or None) of `case` with one to three random edits."""
    config = copy.deepcopy(golden_config(case))
    vit = vit_config() if case == YIVL else None
    sections = {"top": config}
    for name in ("llm_config", "vision_config"):
        if isinstance(config.get(name), dict):
            sections[name] = config[name]
    if vit is not None:
        sections["vit"] = vit
    for _ in range(draw(st.integers(1, 3))):
        section = sections[draw(st.sampled_from(sorted(sections)))]
        key = draw(st.sampled_from(sorted(section) + EXTRA_KEYS))
        action = draw(st.sampled_from(["delete", "replace", "number", "nest"]))
        if action == "delete":
            section.pop(key, None)
        elif action == "number":
            section[key] = draw(st.sampled_from(numeric_variants(section.get(key))))
        elif action == "nest" and isinstance(section.get(key), dict):
            inner = section[key]
            inner[draw(st.sampled_from(sorted(inner) + ["factor", "type", "rope_type", "rope_theta"]))] = draw(JSON)
        else:
            section[key] = draw(JSON)
    return config, vit


@pytest.mark.parametrize("case", CASES)
@settings(max_examples=FUZZ_EXAMPLES, deadline=20_000, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_random_config_edits_load_or_raise_a_minisail_error(case, data):
    config, vit = data.draw(edited_config(case))
    with tempfile.TemporaryDirectory() as tmp:
        folder = case_folder(case, Path(tmp) / "ckpt", config, vit)
        try:
            minisail.load(folder)
        except MinisailError:
            pass
        # and the prompt command's config half agrees with load on the config alone
        try:
            read_model_config(folder)
        except MinisailError:
            pass
