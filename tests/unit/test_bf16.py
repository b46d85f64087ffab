"""bfloat16: where minisail rounds, and how close it stays to the reference implementation in bf16.

What "parity" means in bf16. Norm statistics, the rotary tables and the SwiGLU MLP round at exactly the
points transformers' Qwen2 classes round (checked bit for bit below): RMSNorm normalises in float32 and casts
back before the weight; cos/sin are computed in float32 and cast; logits are upcast. Attention goes through
`F.scaled_dot_product_attention`, whose bf16 kernel accumulates differently from an eager
matmul-softmax-matmul, so whole-model bf16 logits agree with the reference's bf16 logits only to bf16
rounding. The test below pins that: minisail's bf16 error against the float32 reference may not exceed
the reference's own bf16 error by more than half again. float32 is the logit-for-logit mode (golden tests).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from transformers import Qwen2Config  # noqa: E402
from transformers.models.qwen2 import modeling_qwen2  # noqa: E402

import minisail  # noqa: E402
from minisail import layers  # noqa: E402
from minisail.layers import RMSNorm, Rotary  # noqa: E402

CONFIG = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


def test_rmsnorm_rope_and_mlp_round_where_transformers_rounds():
    torch.manual_seed(0)
    x = (torch.randn(2, 30, 64) * 3).bfloat16()
    config = Qwen2Config(**CONFIG, rope_theta=1e6, rms_norm_eps=1e-6)

    reference_norm = modeling_qwen2.Qwen2RMSNorm(64, eps=1e-6)
    reference_norm.weight.data = 1 + 0.1 * torch.randn(64)
    reference_norm = reference_norm.bfloat16()
    norm = RMSNorm(64, 1e-6)
    norm.weight = torch.nn.Parameter(reference_norm.weight.data.clone())
    assert torch.equal(norm(x), reference_norm(x))

    positions = torch.arange(30)[None].expand(2, -1)
    cos, sin = modeling_qwen2.Qwen2RotaryEmbedding(config)(x, positions)
    ours = Rotary(16, 1e6, max_positions=32768).tables(positions, kv_length=30, dtype=torch.bfloat16)
    assert torch.equal(ours[0], cos) and torch.equal(ours[1], sin)

    reference_mlp = modeling_qwen2.Qwen2MLP(config).bfloat16()
    mlp = layers.SwiGLU(64, 96).bfloat16()
    mlp.gate_up.weight.data = torch.cat([reference_mlp.gate_proj.weight, reference_mlp.up_proj.weight]).data
    mlp.down.weight.data = reference_mlp.down_proj.weight.data
    assert torch.equal(mlp(x), reference_mlp(x))


@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_bf16_logits_stay_within_the_references_own_bf16_error(tmp_path, implementation):
    from helpers.hf_checkpoints import qwen2_checkpoint

    hf, folder = qwen2_checkpoint(tmp_path, tie=False)
    hf.config._attn_implementation = implementation
    ids = torch.randint(0, 360, (2, 48), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        exact = hf(input_ids=ids).logits.float()
        reference_bf16 = hf.to(torch.bfloat16)(input_ids=ids).logits.float()
        ours_bf16 = minisail.load(folder, dtype=torch.bfloat16)(ids)
    reference_error = (reference_bf16 - exact).abs().max().item()
    our_error = (ours_bf16 - exact).abs().max().item()
    assert 0 < our_error <= 1.5 * reference_error, (our_error, reference_error)
    assert (ours_bf16 - reference_bf16).abs().max().item() <= 1.5 * reference_error
