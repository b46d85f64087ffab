"""Per-rank memory of tensor-parallel loading on a large random checkpoint (issue 18), measured, not asserted.

    python -m bench.tp_memory write [--preset NAME]                     # the random checkpoint, once
    python -m bench.tp_memory run [--preset NAME] [--dtype bf16]        # one process
    torchrun --nproc-per-node 2 -m bench.tp_memory run --tp 2 [...]     # two ranks

Presets: `sail-vl-2b` (bench/presets.py: InternViT-300M + Qwen2.5-1.5B) and `v1-5-slice`: InternVL-Chat-V1-5 at
its real widths with fewer layers (InternViT-6B: 3200 wide, 25 heads, qk-norm, 6 of its 45 layers; InternLM2-20B:
6144 wide, 48 / 8 heads, 16384 MLP, 3 of its 48 layers, its 92553-token vocabulary), so a layer's split is the real
one and the full model's figures extrapolate per layer. Each rank prints its parameter bytes and its resident
memory (VmRSS now, VmHWM peak) after loading and after a forward pass over an image plus 8 greedy tokens
(the weights are memory-mapped: a page counts once it is touched).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.checkpoints import is_complete, write_official
from bench.presets import INTERNLM2_1_8B_VE, PRESETS, Preset, _chat_level, _intern_vit

CACHE = Path.home() / ".cache" / "minisail" / "bench"
INTERNLM2_20B = {
    **INTERNLM2_1_8B_VE,
    "architectures": ["InternLM2ForCausalLM"],
    "hidden_size": 6144,
    "num_attention_heads": 48,
    "num_key_value_heads": 8,
    "intermediate_size": 16384,
}
V1_5_SLICE = Preset(
    "v1-5-slice",
    _chat_level(
        _intern_vit(hidden=3200, layers=6, heads=25, intermediate=12800, six_b=True),
        {**INTERNLM2_20B, "num_hidden_layers": 3},
        "internlm2-chat",
    ),
    image_token_id=92546,
    about="InternVL-Chat-V1-5 widths, 6 ViT + 3 LLM layers",
)


def preset(name: str) -> Preset:
    return V1_5_SLICE if name == V1_5_SLICE.name else PRESETS[name]


def folder_of(p: Preset) -> Path:
    return CACHE / f"tp-{p.name}" / "official"


def memory() -> dict:
    """VmRSS and VmHWM of this process, in GB (Linux /proc/self/status)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = round(int(value.split()[0]) / 1e6, 2)
    return fields


def run(args) -> None:
    import minisail
    from minisail.generate import greedy_generate
    from minisail.parallel import launch

    launch.start(args.tp)
    p, rank = preset(args.preset), launch.rank()
    start = time.perf_counter()
    model = minisail.load(folder_of(p), dtype=args.dtype, tp=args.tp if args.tp and args.tp > 1 else None)
    loaded = time.perf_counter() - start
    report = {"rank": rank, "ranks": launch.world_size(), "preset": p.name, "dtype": args.dtype}
    report["parameter_GB"] = round(sum(t.numel() * t.element_size() for t in model.parameters()) / 1e9, 2)
    report["load_s"], report["after_load"] = round(loaded, 1), memory()
    model.image_token_id = p.image_token_id
    tokens = model.config.tokens_per_tile  # one 448 px tile's image tokens
    ids = torch.tensor([[1] * 4 + [p.image_token_id] * tokens + [2] * 4])
    pixels = torch.randn(1, 3, 448, 448, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    with torch.inference_mode(), launch.peers_failing():
        out = greedy_generate(model, ids, torch.ones_like(ids), pixels, max_new_tokens=8)
    report["generate_s"], report["after_generate"] = round(time.perf_counter() - start, 1), memory()
    report["tokens"] = out[0].tolist()
    with torch.inference_mode():  # the first token's logits: how close its top two are (bf16 ties flip)
        last = model(ids, torch.ones_like(ids), pixels)[0, -1]
    report["top2_logits"] = [round(v, 4) for v in last.topk(2).values.tolist()]
    if args.save:
        if rank == 0:
            torch.save(last, args.save)
    launch.stop()
    if rank == 0:
        print(json.dumps(report), flush=True)
    if rank != 0:  # rank 0's stdout is the only one shown: the others write theirs to stderr
        import sys

        print(json.dumps(report), file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.tp_memory", description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("write", "run"))
    parser.add_argument("--preset", default=V1_5_SLICE.name)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--tp", type=int)
    parser.add_argument("--save", metavar="FILE", help="save the first token's logits here (rank 0)")
    args = parser.parse_args()
    if args.action == "write":
        p = preset(args.preset)
        folder = folder_of(p)
        if not is_complete(folder):
            write_official(p, folder)
            (folder / "COMPLETE").write_text("{}")
        print(folder)
    else:
        run(args)


if __name__ == "__main__":
    main()
