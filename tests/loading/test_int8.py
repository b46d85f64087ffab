"""Int8 weights: the Int8Linear kernels, bitsandbytes LLM.int8 checkpoints, and quantize="int8" at load.

The int8 checkpoints are made here from golden cases' float weights: every decoder-layer Linear weight is quantised
with bitsandbytes' row-wise absmax rule (written out below, independently of minisail.fast.int8) into `X.weight` int8 +
`X.SCB` float32, next to a bnb-like `quantization_config` (InternVL-Chat-V1-5-Int8 layout). The float reference is
the same checkpoint with the dequantised weights `weight * SCB / 127` written as ordinary float tensors.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import GOLDEN, golden_config, golden_tensors, write_checkpoint
from torch import nn

import minisail
from minisail.checkpoint.export import to_official_state_dict
from minisail.errors import CheckpointError, ConfigError
from minisail.fast import int8 as int8_kernels
from minisail.fast.int8 import Int8Linear, int8_linear, quantize_rows, reference_int8_linear
from minisail.generate import greedy_generate
from minisail.models.registry import detect_family
from minisail.parity import image_token_id, read_tensors

INTERNLM2, QWEN2 = "internvl-internlm2-tiny", "internvl-qwen2-tiny"
BNB_CONFIG = {
    "quant_method": "bitsandbytes",
    "load_in_8bit": True,
    "load_in_4bit": False,
    "llm_int8_threshold": 6.0,
    "llm_int8_skip_modules": None,
    "llm_int8_has_fp16_weight": False,
}
DECODER_LINEAR = re.compile(r"language_model\.model\.layers\.\d+\..+\.weight")  # 2-D ones only (norms are 1-D)


def bnb_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' LLM.int8 weight rule: SCB = row absmax, int8 = round(w * 127 / SCB)."""
    absmax = w.float().abs().amax(dim=1)
    return torch.round(w.float() * (127 / absmax.clamp_min(1e-30))[:, None]).to(torch.int8), absmax


def dequantize(weight: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    return weight.float() * scb[:, None] / 127


def quantized_tensors(case: str, extra_int8: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """The case's tensors with every decoder Linear weight (and the `extra_int8` weight keys) as bnb int8 + SCB."""
    tensors = golden_tensors(case)
    for key in [k for k, t in tensors.items() if (DECODER_LINEAR.fullmatch(k) and t.ndim == 2) or k in extra_int8]:
        tensors[key], tensors[key.removesuffix("weight") + "SCB"] = bnb_quantize(tensors[key])
    return tensors


def dequantized(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(".SCB") or key.endswith(".weight_format"):
            continue
        scb = tensors.get(key.removesuffix("weight") + "SCB")
        out[key] = dequantize(tensor, scb) if scb is not None else tensor
    return out


def bnb_config(case: str) -> dict:
    return {**golden_config(case), "quantization_config": BNB_CONFIG}


@dataclass
class Int8Case:
    case: str
    int8: Path  # bnb LLM.int8 layout
    reference: Path  # the same weights dequantised, as a float checkpoint


@pytest.fixture(scope="module", params=[INTERNLM2, QWEN2])
def int8_case(request, tmp_path_factory):
    case = request.param
    root = tmp_path_factory.mktemp(case)
    tensors = quantized_tensors(case)
    # Some bnb versions also write `weight_format` (0 = row-major): include it for one weight.
    first = next(k for k in sorted(tensors) if k.endswith(".SCB"))
    tensors[first.removesuffix("SCB") + "weight_format"] = torch.tensor(0, dtype=torch.uint8)
    return Int8Case(
        case,
        write_checkpoint(root / "int8", bnb_config(case), tensors, shards=3),
        write_checkpoint(root / "reference", golden_config(case), dequantized(tensors), shards=2),
    )


def run(folder, case: str, *, new_tokens: int = 0, **load_options):
    """(model, logits at the real positions, greedy tokens) for the case's inputs."""
    model = minisail.load(folder, **load_options)
    if model.image_token_id is None:  # the golden checkpoints carry no tokenizer: the case's meta says
        model.image_token_id = image_token_id(json.loads((GOLDEN / case / "meta.json").read_text()))
    inputs = read_tensors(GOLDEN / case / "inputs.safetensors")
    args = inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values")
    with torch.inference_mode():
        logits = model(*args)[inputs["attention_mask"].bool()]
        tokens = greedy_generate(model, *args, max_new_tokens=new_tokens) if new_tokens else None
    return model, logits, tokens


def decoder_linears(model) -> list[nn.Module]:
    return [m for m in model.language_model.layers.modules() if isinstance(m, (nn.Linear, Int8Linear))]


# --- bitsandbytes checkpoints -----------------------------------------------------------------------------------


def test_prequantised_checkpoint_equals_its_dequantised_float_reference(int8_case, views_of_any_size):
    model, logits, tokens = run(int8_case.int8, int8_case.case, new_tokens=4, dtype=torch.float32)
    _, reference, reference_tokens = run(int8_case.reference, int8_case.case, new_tokens=4, dtype=torch.float32)
    linears = decoder_linears(model)
    assert linears and all(isinstance(m, Int8Linear) and m.weight.dtype == torch.int8 for m in linears)
    assert all(m.scale.dtype == torch.float32 for m in linears)
    # An int8 weight taken as stored (plain rename) stays a view into the memory-mapped shard, like float ones.
    o = model.language_model.layers[0].attn.o.weight
    assert o.untyped_storage().nbytes() > o.nbytes
    diff = (logits - reference).abs().max().item()
    print(f"{int8_case.case}: int8 vs dequantised float reference, logits max|diff| {diff:.2e}")
    assert diff <= 1e-4
    assert torch.equal(tokens, reference_tokens)


def test_int8_stays_close_to_the_unquantised_golden(int8_case):
    _, logits, tokens = run(int8_case.int8, int8_case.case, new_tokens=4, dtype=torch.float32)
    expected = read_tensors(GOLDEN / int8_case.case / "expected.safetensors")
    mask = read_tensors(GOLDEN / int8_case.case / "inputs.safetensors")["attention_mask"].bool()
    golden = expected["logits"][mask]
    diff = (logits - golden).abs().max().item()
    golden_tokens = expected["generated_ids"][:, : tokens.shape[1]]
    same = torch.equal(tokens, golden_tokens)
    # Greedy tokens may legitimately differ from the float model's: int8 moves logits by ~1% of their range.
    print(
        f"{int8_case.case}: int8 vs float golden, logits max|diff| {diff:.3e} of max|logit| "
        f"{golden.abs().max().item():.2f}; greedy tokens {'equal' if same else 'differ'}"
    )
    assert diff <= 0.03 * golden.abs().max().item()


def test_quantize_int8_at_load_equals_the_prequantised_checkpoint(int8_case):
    # bitsandbytes keeps the head float; quantize="int8" quantises it on top of the stored int8 layers, as it
    # does from the float checkpoint.
    prequantised, logits, _ = run(int8_case.int8, int8_case.case, dtype=torch.float32, quantize="int8")
    quantised, quantised_logits, _ = run(GOLDEN / int8_case.case / "checkpoint", int8_case.case, quantize="int8")
    for a, b in zip(
        [*decoder_linears(prequantised), prequantised.language_model.lm_head],
        [*decoder_linears(quantised), quantised.language_model.lm_head],
        strict=True,
    ):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.scale, b.scale)
    assert (logits - quantised_logits).abs().max().item() <= 1e-6


def test_quantize_int8_keeps_the_vision_tower_projector_and_embedding_float():
    model = minisail.load(GOLDEN / INTERNLM2 / "checkpoint", quantize="int8")
    int8 = {name for name, m in model.named_modules() if isinstance(m, Int8Linear)}
    assert int8 and all(name.startswith("language_model.layers.") for name in int8 - {"language_model.lm_head"})
    assert isinstance(model.language_model.lm_head, Int8Linear)  # streamed whole every step, like the layers
    assert not any(isinstance(m, Int8Linear) for m in model.vision_model.modules())
    assert not any(isinstance(m, Int8Linear) for m in model.projector.modules())
    assert model.language_model.embed.weight.dtype == torch.float32


def test_the_bitsandbytes_checkpoint_keeps_its_float_head_unless_asked(int8_case):
    model = minisail.load(int8_case.int8)
    assert type(model.language_model.lm_head) is nn.Linear


@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_a_tied_head_is_quantised_from_the_embedding_which_stays_float(tmp_path, quantize):
    # A checkpoint without lm_head whose config says tied: the head is int8 rows of the embedding, the embedding
    # itself keeps its float values (it is not tied to the quantised copy).
    case = "sail-vl2-tiny"
    tensors = golden_tensors(case)
    tensors.pop("language_model.lm_head.weight")
    folder = write_checkpoint(tmp_path / "tied", golden_config(case), tensors)
    model = minisail.load(folder, dtype=torch.float32, quantize=quantize)
    head, embed = model.language_model.lm_head, tensors["language_model.model.embed_tokens.weight"]
    assert isinstance(head, Int8Linear)
    assert torch.equal(model.language_model.embed.weight, embed)
    rows, absmax = quantize_rows(embed)
    assert torch.equal(head.weight, rows) and torch.equal(head.scale, absmax / 127)


@pytest.mark.parametrize("case", ["mono-internvl-tiny", "sail-vl2-tiny", "yi-vl-textonly"])
def test_quantize_int8_works_for_every_family(case):
    # Mono's visual-expert FFNs, Qwen3 (SAIL-VL2) and Llama (Yi-VL) decoders: the decoder Linears go int8.
    model, logits, _ = run(GOLDEN / case / "checkpoint", case, dtype=torch.float32, quantize="int8")
    assert all(isinstance(m, Int8Linear) for m in decoder_linears(model))
    golden = read_tensors(GOLDEN / case / "expected.safetensors")["logits"]
    golden = golden[read_tensors(GOLDEN / case / "inputs.safetensors")["attention_mask"].bool()]
    assert (logits - golden).abs().max().item() <= 0.03 * golden.abs().max().item()


def test_int8_modules_are_decided_key_by_key(tmp_path):
    # A checkpoint that also stores the head, a projector Linear and a ViT Linear as int8: they load as int8 too.
    extra = ("language_model.output.weight", "mlp1.1.weight", "vision_model.encoder.layers.0.attn.qkv.weight")
    tensors = quantized_tensors(INTERNLM2, extra_int8=extra)
    for key in extra:
        tensors[key + "_format"] = torch.tensor([0], dtype=torch.uint8)
    int8_dir = write_checkpoint(tmp_path / "int8", bnb_config(INTERNLM2), tensors)
    reference_dir = write_checkpoint(tmp_path / "reference", golden_config(INTERNLM2), dequantized(tensors))
    model, logits, _ = run(int8_dir, INTERNLM2)
    _, reference, _ = run(reference_dir, INTERNLM2)
    for name in ("language_model.lm_head", "projector.fc1", "vision_model.encoder.layers.0.attn.qkv"):
        assert isinstance(model.get_submodule(name), Int8Linear), name
    assert isinstance(model.vision_model.encoder.layers[1].attn.qkv, nn.Linear)
    assert (logits - reference).abs().max().item() <= 1e-4


def test_an_int8_model_writes_the_bitsandbytes_layout_and_reloads(tmp_path):
    model, logits, _ = run(GOLDEN / INTERNLM2 / "checkpoint", INTERNLM2, quantize="int8")
    official = to_official_state_dict(model, detect_family(golden_config(INTERNLM2)).weight_map(model.config))
    scb = official["language_model.model.layers.0.attention.wqkv.SCB"]
    weight = official["language_model.model.layers.0.attention.wqkv.weight"]
    assert weight.dtype == torch.int8 and scb.shape == weight.shape[:1]
    folder = write_checkpoint(tmp_path / "written", bnb_config(INTERNLM2), official, shards=2)
    _, reloaded, _ = run(folder, INTERNLM2)
    assert (logits - reloaded).abs().max().item() <= 1e-5  # SCB = scale * 127 round-trips to 1 ulp


def test_bf16_activations_run_the_int8_decode_kernel(int8_case, monkeypatch):
    _, logits32, _ = run(int8_case.int8, int8_case.case, dtype=torch.float32)
    fits, real_fits = [], int8_kernels._int8pack_fits
    monkeypatch.setattr(int8_kernels, "_int8pack_fits", lambda x, w: fits.append(real_fits(x, w)) or fits[-1])
    model, logits16, tokens = run(int8_case.int8, int8_case.case, new_tokens=3, dtype=torch.bfloat16)
    assert model.language_model.embed.weight.dtype == torch.bfloat16
    assert tokens.shape[1] == 3
    assert True in fits and False in fits  # decode steps used int8pack, the prefill the blocked path
    assert (logits16 - logits32).abs().max().item() <= 0.05 * logits32.abs().max().item()


# --- errors -----------------------------------------------------------------------------------------------------

WQKV = "language_model.model.layers.1.attention.wqkv."
W2 = "language_model.model.layers.0.feed_forward.w2."


def _scb_without_int8_weight(t):
    t[WQKV + "weight"] = dequantize(t[WQKV + "weight"], t[WQKV + "SCB"])


def _weight_missing(t):
    del t[WQKV + "weight"]


def _scb_one_short(t):
    t[WQKV + "SCB"] = t[WQKV + "SCB"][:-1]


def _scb_two_dimensional(t):
    t[WQKV + "SCB"] = t[WQKV + "SCB"][:, None]


def _int8_rows_missing(t):
    t[W2 + "weight"], t[W2 + "SCB"] = t[W2 + "weight"][:-2], t[W2 + "SCB"][:-2]


def _int8_without_scb(t):
    del t[W2 + "SCB"]


def _tile_layout(t):
    t[W2 + "weight_format"] = torch.tensor(2, dtype=torch.uint8)


def _stray_scb(t):
    t["language_model.model.layers.0.attention.wk.SCB"] = torch.ones(4)


def _infinite_scb(t):
    t[W2 + "SCB"][3] = float("inf")


def _negative_scb(t):
    t[W2 + "SCB"][0] = -1.0


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (_scb_without_int8_weight, r"marks .*wqkv\.weight.* as a bitsandbytes int8 weight, but it is stored as"),
        (_weight_missing, r"no tensor .*wqkv\.weight"),
        (_scb_one_short, r"wqkv\.SCB.* needs one float scale per row"),
        (_scb_two_dimensional, r"wqkv\.SCB.* needs one float scale per row"),
        (_int8_rows_missing, r"needs shape \(64, 128\)"),
        (_int8_without_scb, r"w2\.weight.* is torch\.int8.*needs its bitsandbytes scale .*w2\.SCB"),
        (_tile_layout, r"w2\.weight_format.* GPU tile layout"),
        (_stray_scb, r"not used .*wk\.SCB"),
        (_infinite_scb, r"non-finite"),
        (_negative_scb, r"negative"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else "",
)
def test_inconsistent_int8_checkpoints_are_checkpoint_errors(tmp_path, corrupt, message):
    tensors = quantized_tensors(INTERNLM2)
    corrupt(tensors)
    folder = write_checkpoint(tmp_path / "bad", bnb_config(INTERNLM2), tensors)
    with pytest.raises(CheckpointError, match=message):
        minisail.load(folder)


def test_a_fused_layer_stored_part_int8_part_float(tmp_path):
    tensors = golden_tensors(QWEN2)
    gate = "language_model.model.layers.0.mlp.gate_proj."
    tensors[gate + "weight"], tensors[gate + "SCB"] = bnb_quantize(tensors[gate + "weight"])
    folder = write_checkpoint(tmp_path / "mixed", bnb_config(QWEN2), tensors)
    with pytest.raises(CheckpointError, match=r"partly as bitsandbytes int8 and partly as float"):
        minisail.load(folder)
    model = minisail.load(folder, quantize="int8")  # the float up_proj is quantised with the same rule
    quantised = minisail.load(GOLDEN / QWEN2 / "checkpoint", quantize="int8")
    assert torch.equal(
        model.language_model.layers[0].mlp.gate_up.weight, quantised.language_model.layers[0].mlp.gate_up.weight
    )


def test_quantization_options_and_configs(tmp_path):
    folder = GOLDEN / INTERNLM2 / "checkpoint"
    with pytest.raises(ConfigError, match="quantize='int2'"):  # int4 is accepted now (test_int4.py)
        minisail.load(folder, quantize="int2")
    four_bit = write_checkpoint(
        tmp_path / "nf4",
        {
            **golden_config(INTERNLM2),
            "quantization_config": {**BNB_CONFIG, "load_in_8bit": False, "load_in_4bit": True},
        },
        golden_tensors(INTERNLM2),
    )
    with pytest.raises(ConfigError, match="not bitsandbytes 8-bit"):
        minisail.load(four_bit)
    claims_int8 = write_checkpoint(tmp_path / "float", bnb_config(INTERNLM2), golden_tensors(INTERNLM2))
    with pytest.raises(CheckpointError, match=r"no weight has the `\.SCB` scale"):
        minisail.load(claims_int8)


# --- the layer and its kernels --------------------------------------------------------------------------------


def test_quantize_rows_is_the_bitsandbytes_rule():
    generator = torch.Generator().manual_seed(10)  # seed 10 has a value exactly half a step from both neighbours
    w = torch.randn(5, 40, generator=generator) * torch.tensor([1.0, 0.01, 30.0, 0.0, 2.0])[:, None]
    values, absmax = quantize_rows(w.to(torch.bfloat16))
    expected_values, expected_absmax = bnb_quantize(w.to(torch.bfloat16))
    assert torch.equal(values, expected_values) and torch.equal(absmax, expected_absmax)
    assert values.dtype == torch.int8 and absmax.dtype == torch.float32
    assert torch.equal(values[3], torch.zeros(40, dtype=torch.int8)) and absmax[3] == 0
    assert torch.equal(values.abs().amax(dim=1), torch.tensor([127, 127, 127, 0, 127], dtype=torch.int8))
    error = (dequantize(values, absmax) - w.to(torch.bfloat16).float()).abs()
    # at most half a step per row, up to float32 rounding of the dequantisation (a few ulps: a tie lands there)
    assert bool((error <= absmax[:, None] / 254 * (1 + 1e-5)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("in_features", [64, 72])  # 72: not a multiple of 16, int8pack must not be used
@pytest.mark.parametrize("bias", [False, True])
def test_int8_linear_kernels_match_the_reference(monkeypatch, dtype, rows, in_features, bias):
    generator = torch.Generator().manual_seed(rows + in_features)
    weight, absmax = quantize_rows(torch.randn(96, in_features, generator=generator))
    scale = absmax / 127
    x = torch.randn(2, rows, in_features, generator=generator).to(dtype)
    b = torch.randn(96, generator=generator).to(dtype) if bias else None
    expected = reference_int8_linear(x, weight, scale, b).float()
    # bf16 / fp16: the output (and int8pack's or fp16's scaled weights) are rounded to 8 / 11 bits
    tolerance = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 3e-3}[dtype]
    monkeypatch.setattr(int8_kernels, "BLOCK_BYTES", 7 * in_features * x.element_size())  # several blocks, a short last
    for y in (int8_linear(x, weight, scale, b), int8_linear(x[:1, :1], weight, scale, b)):
        assert y.dtype == dtype
        reference = expected[: y.shape[0], : y.shape[1]]
        assert (y.float() - reference).abs().max().item() <= tolerance * reference.abs().max().item()


@pytest.mark.parametrize("native", [True, False], ids=["bf16-native", "bf16-emulated"])
def test_bf16_many_rows_compute_in_float32_where_bf16_is_emulated(monkeypatch, native, request):
    # Where bf16 matrix products are not native (AVX2), the blocked path multiplies float32 blocks and rounds the
    # output once; where they are, it multiplies bf16 blocks. Either way, within bf16's rounding of the reference.
    if not native:
        request.getfixturevalue("onednn_refuses_bf16")
    monkeypatch.setattr(int8_kernels, "packing_support", lambda: SimpleNamespace(available=native))
    generator = torch.Generator().manual_seed(3)
    weight, absmax = quantize_rows(torch.randn(96, 64, generator=generator))
    x = torch.randn(20, 64, generator=generator).to(torch.bfloat16)  # 20 rows: the blocked path
    expected = reference_int8_linear(x.float(), weight, absmax / 127)
    seen = []
    linear = F.linear
    monkeypatch.setattr(int8_kernels.F, "linear", lambda a, w, *b: seen.append((a.dtype, w.dtype)) or linear(a, w, *b))
    y = int8_linear(x, weight, absmax / 127)
    monkeypatch.setattr(int8_kernels.F, "linear", linear)
    assert y.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max().item() <= 1e-2 * expected.abs().max().item()
    compute = torch.bfloat16 if native else torch.float32
    assert seen and all(kinds == (compute, compute) for kinds in seen)
    if not native:  # float32 products rounded once: exactly the float32 definition, rounded
        assert torch.equal(y, (linear(x.float(), weight.float()) * (absmax / 127)).to(torch.bfloat16))


def test_float16_activations_do_not_overflow():
    # True outputs ~ +-2000 from weights ~0.04: the int8 products before scaling reach ~ +-3e5, past float16's 65504.
    weight, absmax = quantize_rows(torch.full((4, 64), 0.04) * torch.tensor([1.0, -1.0, 0.5, 2.0])[:, None])
    x = torch.full((2, 64), 700.0, dtype=torch.float16)
    y = int8_linear(x, weight, absmax / 127)
    expected = reference_int8_linear(x.float(), weight, absmax / 127)
    assert bool(torch.isfinite(y).all())
    assert (y.float() - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()


def test_the_int8pack_kernel_is_used_exactly_where_it_was_measured_correct(monkeypatch):
    calls = []
    real = int8_kernels.blocked_int8_matmul
    monkeypatch.setattr(int8_kernels, "blocked_int8_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    weight, scale = torch.zeros(8, 64, dtype=torch.int8), torch.ones(8)
    int8_linear(torch.ones(1, 64, dtype=torch.bfloat16), weight, scale)  # int8pack
    int8_linear(torch.ones(1, 64), weight, scale)  # fp32: blocked
    int8_linear(torch.ones(int8_kernels.INT8PACK_MAX_ROWS, 64, dtype=torch.bfloat16), weight, scale)  # int8pack
    too_many = int8_kernels.INT8PACK_MAX_ROWS + 1
    int8_linear(torch.ones(too_many, 64, dtype=torch.bfloat16), weight, scale)  # too many rows
    int8_linear(torch.ones(1, 8, dtype=torch.bfloat16), weight[:, :8], scale)  # in_features % 16 != 0
    assert calls == [(1, 64), (int8_kernels.INT8PACK_MAX_ROWS + 1, 64), (1, 8)]


def test_where_int8pack_fails_the_blocked_path_gives_the_numbers(int8pack_fails, monkeypatch):
    """Decided by trying: a kernel that raises on this machine is never used, and the answer is the same."""
    calls = []
    real = int8_kernels.blocked_int8_matmul
    monkeypatch.setattr(int8_kernels, "blocked_int8_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    weight, absmax = quantize_rows(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    y = int8_linear(x, weight, absmax / 127)
    assert calls == [(1, 64)] and int8_kernels._int8pack_checked == {(32, 64): False}
    expected = reference_int8_linear(x, weight, absmax / 127).float()
    assert (y.float() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()


def test_an_int8pack_that_gives_wrong_numbers_is_not_used(monkeypatch):
    from conftest import _reset_fast_path_decisions

    _reset_fast_path_decisions()
    monkeypatch.setattr(torch.ops.aten, "_weight_int8pack_mm", lambda x, w, s: torch.zeros(x.shape[0], w.shape[0]))
    weight, absmax = quantize_rows(torch.randn(32, 64, generator=torch.Generator().manual_seed(1)))
    y = int8_linear(torch.ones(1, 64, dtype=torch.bfloat16), weight, absmax / 127)
    assert int8_kernels._int8pack_checked == {(32, 64): False} and bool((y != 0).any())
    _reset_fast_path_decisions()


def test_int8pack_is_given_only_the_alignment_its_loads_need(monkeypatch):
    # The kernel loads x and, in its 4-row tiles, the weight with aligned loads (torch 2.13: a misaligned one
    # crashed the process). A weight taken as stored sits anywhere in its mapped file; x may be a view.
    calls = []
    real = int8_kernels.blocked_int8_matmul
    monkeypatch.setattr(int8_kernels, "blocked_int8_matmul", lambda *a: calls.append(a[0].shape) or real(*a))
    generator = torch.Generator().manual_seed(6)
    weight, absmax = quantize_rows(torch.randn(32, 4096, generator=generator))  # long rows: never folded
    storage = torch.empty(weight.numel() + 64, dtype=torch.int8)
    start = (-storage.data_ptr() % 16) + 8  # 8 bytes past a 16-byte boundary, as in a file
    shifted = storage[start : start + weight.numel()].view_as(weight).copy_(weight)
    inputs = torch.randn(8 * 4096 + 16, generator=generator).to(torch.bfloat16)
    offset = (-inputs.data_ptr() % 32) // 2 + 8  # 16 bytes past a 32-byte boundary
    for rows, w in [(1, shifted), (3, shifted), (4, shifted), (8, shifted), (1, weight), (4, weight)]:
        x = inputs[offset : offset + rows * 4096].view(rows, 4096)  # a view 16 bytes off
        assert x.data_ptr() % 32 == 16 and (w.data_ptr() % 16 == 8) == (w is shifted)
        y = int8_linear(x, w, absmax / 127)
        expected = reference_int8_linear(x.double(), weight, absmax.double() / 127)
        assert (y.double() - expected).abs().max().item() <= 2e-2 * expected.abs().max().item()
    assert calls == [(4, 4096), (8, 4096)]  # 4 and 8 rows of the shifted weight: the blocked path
