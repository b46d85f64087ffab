"""Mono-InternVL's FFN visual experts: two SwiGLU MLPs per decoder layer, and every token uses exactly one.

Mirrors the feed-forward half of `InternLM2DecoderLayer` in Mono-InternVL's `modeling_internlm2_ve.py`
(github OpenGVLab/Mono-InternVL @ 5b17ab45; the Hugging Face remote code of Mono-InternVL-2B; lmdeploy's
`internlm2_ve.py`). Attention, both RMSNorms, the embeddings and the head are shared by all tokens; only the
FFN has a visual copy, `feed_forward_ve` (w1/w3/w2 of the same shapes as the text `feed_forward`).

Routing is static, with no learned router: a token is visual exactly when its id is <IMG_CONTEXT>
(`visual_mask = input_ids == img_context_token_id`, computed by the model's `visual_mask(input_ids)` and
passed to the decoder, which hands it to every layer's FFN). <img>, </img>, newlines and all text go to the
text FFN.

How upstream computes it, and why minisail's routing gives the same numbers:

- In a forward without a KV cache, upstream runs *both* experts on every token and blends them with the 0/1
  mask: `feed_forward(x) * (1 - m) + feed_forward_ve(x) * m`. For m in {0, 1} that is exactly the chosen
  expert's output whenever the other expert's output is finite (x*1 + y*0 = x). The Hub file has gathered
  the visual rows instead (index form) since 2024-10-11, as lmdeploy and vLLM do: same numbers.
- In any step that has a KV cache, upstream ignores the mask and runs the text FFN on every token. Its
  generate() prefills without a cache and only decodes with one, and a decoded token is text in practice,
  so there the text FFN is what the mask asks for too.
- minisail always routes by the mask: it gathers the visual rows, runs the visual expert on them alone,
  runs the text expert on the rest, and scatters both back. Each token's FFN is computed once. This agrees
  with upstream in every case upstream supports (full forwards; cached decoding of text tokens), and it
  stays right where upstream's rule would not: a prefill split into chunks over image tokens (upstream would
  send the later chunks' image tokens through the text FFN), or a decoded <IMG_CONTEXT> (upstream uses the
  text FFN for it when decoding with a cache, the visual one when the same sequence is replayed without).
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.layers import SwiGLU


class VisualExpertMLP(nn.Module):
    """`forward(x [B, T, H], visual_mask [B, T] bool | None) -> [B, T, H]`: text or visual SwiGLU per token."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.text = SwiGLU(hidden_size, intermediate_size)  # official `feed_forward`
        self.visual = SwiGLU(hidden_size, intermediate_size)  # official `feed_forward_ve`

    def forward(self, x: torch.Tensor, visual_mask: torch.Tensor | None = None) -> torch.Tensor:
        if visual_mask is None:  # no routing information: every token is text
            return self.text(x)
        visual = visual_mask.to(device=x.device, dtype=torch.bool)  # [B, T]
        if visual.shape != x.shape[:-1]:
            raise ValueError(f"visual_mask has shape {tuple(visual.shape)}, expected {tuple(x.shape[:-1])}")
        if torch.compiler.is_compiling():
            # Under torch.compile a Python branch on tensor values would break the graph; torch.cond keeps the
            # decode step one graph: text rows only (the usual case), or both experts chosen row by row.
            def mixed(x, visual):
                return torch.where(visual[..., None], self.visual(x), self.text(x))

            return torch.cond(visual.any(), mixed, lambda x, visual: self.text(x), (x, visual))
        # The common cases skip the gather: text-only prompts and decode steps, and all-image chunks.
        if not visual.any():
            return self.text(x)
        if visual.all():
            return self.visual(x)
        out = torch.empty_like(x)
        out[visual] = self.visual(x[visual])  # [n_visual, H] rows, in order
        out[~visual] = self.text(x[~visual])  # [n_text, H]
        return out
