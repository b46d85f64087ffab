"""Int4 prefill: the CPU kernel's weight layout read back (fast/int4_layout.py) and the many-row path of
fast/int4.py that dequantises it block by block.

Every candidate layout is written here by a test-side packer that follows the layout's description, so each one is
tested on any machine (the running torch writes only one); the packer is checked against torch's own where the
kernel runs. The many-row path is compared bit for bit with the plain path (the same blocks, the same dequantised
weights, the same F.linear calls), its float32 branch with the same blocks computed in float32.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from helpers.checkpoints import GOLDEN

import minisail
from minisail.fast import int4 as int4_kernels
from minisail.fast import int4_layout
from minisail.fast.int4 import (
    GROUP_SIZE,
    Int4Linear,
    blocked_int4_matmul,
    dequantize,
    kernel_layout_matmul,
    quantize_groups,
)
from minisail.fast.int4_layout import CANDIDATES, KernelLayout, find_kernel_layout, unpack_codes, unpack_kernel_rows
from minisail.fast.packing import PackingSupport
from minisail.parity import image_token_id, read_tensors

CASE = "sail-vl2-tiny"
# out = whole 64-row blocks + a partial one of 16/32/48 rows (or none); 1120 = 17920 / 16 and 96 = 1536 / 16 rows,
# 2112 crosses the 1024-row packing blocks
SHAPES = [(16, 128), (48, 64), (64 * 3 + 16, 128), (64 * 2 + 32, 192), (112, 64), (1120, 128), (96, 576), (2112, 64)]


@pytest.fixture(autouse=True)
def fresh_decisions():
    int4_kernels._int4pack_checked.clear()
    yield
    int4_kernels._int4pack_checked.clear()


def pack_as(q: torch.Tensor, layout: KernelLayout) -> torch.Tensor:
    """Codes uint8 [out, in] (0..15) -> bytes [out, in/2] in `layout`, from its description: blocks of B rows, each
    an array [in, B/2]; in a full block byte j holds rows (j, j + B/2) (halves) or (2j, 2j + 1); a partial last
    block in pairs."""
    out, columns = q.shape
    step = layout.block_rows
    pieces = []
    for start in range(0, out, step):
        block = q[start : start + step]
        if block.shape[0] == step and layout.halves:
            low, high = block[: step // 2], block[step // 2 :]
        else:
            low, high = block[0::2], block[1::2]
        pieces.append((low | (high << 4)).t().reshape(-1))  # [in, rows/2]: one run of bytes per input
    return torch.cat(pieces).view(out, columns // 2)


def random_codes(out: int, columns: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (out, columns), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def plain_bytes(q: torch.Tensor) -> torch.Tensor:
    return q[:, 0::2] | (q[:, 1::2] << 4)


# --- the layouts -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", CANDIDATES, ids=["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("shape", SHAPES, ids=[f"{o}x{i}" for o, i in SHAPES])
def test_each_layout_unpacks_back_to_its_codes_and_is_found(layout, shape):
    q = random_codes(*shape, seed=shape[0])
    packed = pack_as(q, layout)
    signed = unpack_kernel_rows(packed, layout, torch.empty(shape, dtype=torch.float32))
    assert torch.equal(signed, q.float() - 8)
    # a slice of whole blocks reads the same rows
    rows = slice(layout.block_rows, shape[0])
    part = unpack_kernel_rows(packed[rows], layout, torch.empty(q[rows].shape, dtype=torch.int8))
    assert torch.equal(part, q[rows].to(torch.int8) - 8)
    found = find_kernel_layout(plain_bytes(q), packed)
    assert found is not None
    # the layout found reads this weight right (a 16-row weight is one partial block: every candidate reads it)
    assert torch.equal(unpack_kernel_rows(packed, found, torch.empty(shape)), q.float() - 8)
    if shape[0] >= 64:
        assert found == layout


@pytest.mark.parametrize("layout", CANDIDATES, ids=["avx512", "avx2", "scalar"])
def test_regular_codes_at_both_ends_are_decided_by_every_row(layout):
    q = torch.full((4 * int4_layout.CHECK_BLOCK_ROWS, 64), 8, dtype=torch.uint8)  # code 8 (= zero) at both ends
    middle = slice(int4_layout.CHECK_BLOCK_ROWS, 3 * int4_layout.CHECK_BLOCK_ROWS)
    q[middle] = random_codes(2 * int4_layout.CHECK_BLOCK_ROWS, 64)
    assert find_kernel_layout(plain_bytes(q), pack_as(q, layout)) == layout


def test_no_layout_is_found_for_bytes_no_candidate_wrote():
    q = random_codes(256, 128)
    scrambled = pack_as(q, CANDIDATES[0]).flip(0)  # the blocks in reverse order
    assert find_kernel_layout(plain_bytes(q), scrambled) is None
    assert find_kernel_layout(plain_bytes(q)[:40], pack_as(q, CANDIDATES[0])[:40]) is None  # not whole 16-row blocks


@pytest.mark.parametrize("out", [64 * 3 + 16, 64 * 2 + 32, 64 + 48, 1120, 2112])
def test_torch_writes_one_of_the_candidates(out):
    q = random_codes(out, 128, seed=out)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    except (RuntimeError, AttributeError):
        pytest.skip("this torch cannot pack int4 weights for the CPU kernel")
    layout = find_kernel_layout(plain_bytes(q), packed)
    assert layout is not None
    assert torch.equal(pack_as(q, layout), packed)  # the packer above describes torch's layout exactly


# --- the many-row path -----------------------------------------------------------------------------------------


def weights(out: int, columns: int, seed: int = 0):
    """(plain codes, scale_zeros [in/G, out, 2]) of a random float weight."""
    codes, scale_zeros = quantize_groups(torch.randn(out, columns, generator=torch.Generator().manual_seed(seed)))
    return codes, scale_zeros.transpose(0, 1).contiguous()


@pytest.fixture
def small_blocks(monkeypatch):
    """64-row blocks for 3-group rows: several blocks and a partial one on small weights."""
    monkeypatch.setattr(int4_kernels, "BLOCK_BYTES", 64 * 3 * GROUP_SIZE * 4)


def native_bf16(monkeypatch, available: bool) -> None:
    monkeypatch.setattr(int4_kernels, "packing_support", lambda: PackingSupport(available, "forced by the test"))


@pytest.mark.parametrize("layout", CANDIDATES, ids=["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("out", [64 * 4 + 16, 64 * 5 + 48, 1120])
def test_many_row_path_is_the_plain_path_bit_for_bit(monkeypatch, small_blocks, layout, out):
    native_bf16(monkeypatch, True)
    codes, scale_zeros = weights(out, 3 * GROUP_SIZE, seed=out)
    packed = pack_as(unpack_codes(codes), layout)
    x = torch.randn(37, 3 * GROUP_SIZE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = kernel_layout_matmul(x, packed, scale_zeros, layout)
    assert y.dtype == torch.bfloat16 and y.shape == (37, out)
    assert torch.equal(y, blocked_int4_matmul(x, codes, scale_zeros))


@pytest.mark.parametrize("layout", CANDIDATES, ids=["avx512", "avx2", "scalar"])
def test_without_native_bf16_the_blocks_and_products_stay_float32(monkeypatch, small_blocks, layout):
    native_bf16(monkeypatch, False)
    codes, scale_zeros = weights(64 * 4 + 32, 3 * GROUP_SIZE)
    packed = pack_as(unpack_codes(codes), layout)
    x = torch.randn(37, 3 * GROUP_SIZE, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = kernel_layout_matmul(x, packed, scale_zeros, layout)
    rows = int4_kernels.block_rows(3 * GROUP_SIZE)
    pairs = scale_zeros.transpose(0, 1)
    blocks = range(0, codes.shape[0], rows)
    parts = [F.linear(x.float(), dequantize(codes[s : s + rows], pairs[s : s + rows])) for s in blocks]
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, torch.cat(parts, -1).to(torch.bfloat16))  # float32 sums, rounded once


def an_int4_linear(layout: KernelLayout | None, out: int = 64 * 2 + 16) -> tuple[Int4Linear, torch.Tensor]:
    codes, scale_zeros = weights(out, 2 * GROUP_SIZE)
    linear = Int4Linear(2 * GROUP_SIZE, out)
    linear.weight.data = pack_as(unpack_codes(codes), layout or CANDIDATES[0])
    linear.scale_zeros = scale_zeros
    linear.kernel_layout, linear.kernel_unpack = True, layout
    return linear, codes


@pytest.fixture
def calls(monkeypatch):
    """Which path each call took: the kernel (replaced by a recorder returning zeros) or the many-row path."""
    taken = []

    def kernel(x, weight, group, scale_zeros):
        taken.append(("kernel", x.shape[0]))
        return torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype)

    many_rows = int4_kernels.kernel_layout_matmul

    def spy(x, *args):
        taken.append(("many", x.shape[0]))
        return many_rows(x, *args)

    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", kernel)
    monkeypatch.setattr(int4_kernels, "kernel_layout_matmul", spy)
    return taken


def test_the_number_of_rows_picks_the_path(monkeypatch, calls):
    native_bf16(monkeypatch, True)
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 6)
    linear, codes = an_int4_linear(CANDIDATES[0])
    x = torch.randn(2, 3, 2 * GROUP_SIZE).to(torch.bfloat16)  # 6 rows: the many-row path
    y = linear(x)
    linear(x[:, :2])  # 4 rows: the kernel
    assert calls == [("many", 6), ("kernel", 4)]
    assert y.shape == (2, 3, linear.out_features)
    assert torch.equal(y.reshape(6, -1), blocked_int4_matmul(x.reshape(6, -1), codes, linear.scale_zeros))


def test_without_an_unpacking_many_rows_keep_the_kernel(monkeypatch, calls):
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 1)
    linear, _ = an_int4_linear(None)
    linear(torch.randn(300, 2 * GROUP_SIZE).to(torch.bfloat16))
    assert calls == [("kernel", 300)]


# --- a model loaded with quantize="int4" -----------------------------------------------------------------------


def prefill_logits() -> tuple[torch.nn.Module, torch.Tensor]:
    model = minisail.load(GOLDEN / CASE / "checkpoint", dtype=torch.bfloat16, quantize="int4")
    model.image_token_id = image_token_id(json.loads((GOLDEN / CASE / "meta.json").read_text()))  # no tokenizer here
    inputs = read_tensors(GOLDEN / CASE / "inputs.safetensors")
    with torch.inference_mode():
        logits = model(inputs["input_ids"], inputs["attention_mask"], inputs.get("pixel_values"))
    return model, logits.float()


def int4_linears(model) -> list[Int4Linear]:
    return [m for m in model.modules() if isinstance(m, Int4Linear)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_a_bf16_int4_model_prefills_as_before_and_as_the_plain_path(monkeypatch):
    native_bf16(monkeypatch, True)  # bf16 blocks even where bf16 is emulated: the plain path's numbers
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 10**9)
    model, kernel_logits = prefill_logits()  # before: every call through the kernel
    linears = int4_linears(model)
    if not all(m.kernel_layout for m in linears):
        pytest.skip("torch's CPU int4 kernel does not run here: its layout is never read back")
    assert all(m.kernel_unpack is not None for m in linears)
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 1)
    _, many_logits = prefill_logits()
    # the kernel keeps the dequantised weights fp32, the many-row path rounds them to bf16, as the plain path does
    assert relative(many_logits, kernel_logits) < 2e-2
    assert float((many_logits.argmax(-1) == kernel_logits.argmax(-1)).float().mean()) >= 0.9
    int4_kernels._int4pack_checked.clear()
    monkeypatch.setattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", lambda *a: (_ for _ in ()).throw(RuntimeError))
    plain_model, plain_logits = prefill_logits()
    assert not any(m.kernel_layout for m in int4_linears(plain_model))
    assert torch.equal(many_logits, plain_logits)  # the same numbers as the plain layout's path, bit for bit


def test_when_no_unpacking_matches_a_loaded_model_keeps_the_kernel(monkeypatch):
    monkeypatch.setattr(int4_layout, "CANDIDATES", ())
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 1)
    model, logits = prefill_logits()
    linears = int4_linears(model)
    if not all(m.kernel_layout for m in linears):
        pytest.skip("torch's CPU int4 kernel does not run here")
    assert not any(m.kernel_unpack for m in linears)
    monkeypatch.setattr(int4_kernels, "MANY_ROWS", 10**9)
    assert torch.equal(prefill_logits()[1], logits)  # the kernel ran, at every row count
