"""Record your own golden case from a real checkpoint and its official remote code.

minisail's parity on real weights is one command away for anyone who has the checkpoint and can run the
official code (transformers 4.37-4.51 with trust_remote_code; the remote code breaks from 4.52). This script
runs the OFFICIAL model on one image and question and writes a case folder in the format of
tests/golden/README.md, which `python -m minisail parity CASE_DIR` then checks:

    pip install "transformers==4.51.3" timm einops   # in a separate environment, for the official code
    python tests/tools/record_golden.py --model weights/SAIL-VL-2B --image photo.jpg \
        --question "Describe the image." --out cases/sail-vl-2b-photo --max-tiles 6 --tokens 16
    python -m minisail parity cases/sail-vl-2b-photo        # in minisail's environment

Covers the InternVL-style remote-code models (SAIL-VL-2B, InternVL-Chat-V1-5, Mono-InternVL-2B, SAIL-VL2):
the prompt is assembled with the checkpoint's own conversation template (get_conv_template from its
remote-code module) as chat() does; pixel_values come from minisail's preprocessing, which reproduces the
model cards' load_image bit for bit (tests/unit/test_preprocess.py). `checkpoint` in the case folder is a symlink
to the model folder, so nothing is copied. Run in float32 for a 1e-4 comparison (the default here).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_case(out: Path, checkpoint: Path, inputs: dict, expected: dict, meta: dict) -> Path:
    """A case folder: checkpoint/ (symlink), inputs.safetensors, expected.safetensors, meta.json."""
    out.mkdir(parents=True, exist_ok=True)
    link = out / "checkpoint"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(checkpoint.resolve(), target_is_directory=True)
    save_file({k: v.contiguous() for k, v in inputs.items()}, out / "inputs.safetensors")
    save_file({k: v.contiguous() for k, v in expected.items()}, out / "expected.safetensors")
    (out / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False))
    return out


def build_query(model, question: str, num_patches: int) -> str:
    """The text chat() builds for one image and no history, with the checkpoint's own template."""
    get_conv_template = sys.modules[type(model).__module__].get_conv_template
    template = get_conv_template(model.template)
    template.system_message = getattr(model, "system_message", template.system_message)
    if "<image>" not in question:
        question = "<image>\n" + question
    template.append_message(template.roles[0], question)
    template.append_message(template.roles[1], None)
    query = template.get_prompt()
    image_tokens = "<img>" + "<IMG_CONTEXT>" * (model.num_image_token * num_patches) + "</img>"
    return query.replace("<image>", image_tokens, 1)


def reference_config(folder: Path):
    """The checkpoint's config with the official code put on its plain reference paths.

    - eager attention in the LLM: SAIL-VL2's remote Qwen3 replaces the global sdpa kernel with an Ascend-NPU
      function when llm_config says "sdpa", and from_pretrained(attn_implementation=...) does not reach it;
    - no flash-attn in InternViT (`use_flash_attn`), so the ViT takes its naive attention path;
    - SAIL-VL2's forward() calls torch.distributed.get_rank() unconditionally: a one-process gloo group on the
      loopback address satisfies it.
    """
    import os

    import torch.distributed as dist
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    for sub in ("llm_config", "text_config"):
        llm = getattr(config, sub, None)
        if llm is not None:
            llm.attn_implementation = "eager"
            llm._attn_implementation = "eager"
    vision = getattr(config, "vision_config", None)
    if vision is not None and hasattr(vision, "use_flash_attn"):
        vision.use_flash_attn = False
    if dist.is_available() and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29511")
        dist.init_process_group("gloo", rank=0, world_size=1)
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="official checkpoint folder with its remote code")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--max-tiles", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens to record (K)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)

    import transformers
    from transformers import AutoModel, AutoTokenizer

    from minisail.image.preprocess import internvl_pixel_values

    dtype = getattr(torch, args.dtype)
    model = AutoModel.from_pretrained(
        args.model, config=reference_config(args.model), torch_dtype=dtype, trust_remote_code=True
    ).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True, use_fast=False)
    size = model.config.force_image_size or model.config.vision_config.image_size
    pixel_values = internvl_pixel_values(args.image, max_tiles=args.max_tiles, image_size=size).to(dtype)
    query = build_query(model, args.question, pixel_values.shape[0])
    encoded = tokenizer(query, return_tensors="pt")
    context_id = tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")
    model.img_context_token_id = context_id
    image_flags = torch.ones(pixel_values.shape[0], dtype=torch.long)
    with torch.no_grad():
        logits = model(
            pixel_values=pixel_values,
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            image_flags=image_flags,
        ).logits.float()
        vision = model.extract_feature(pixel_values).float()
        generated = model.generate(
            pixel_values=pixel_values,
            input_ids=encoded.input_ids,
            attention_mask=encoded.attention_mask,
            max_new_tokens=args.tokens,
            min_new_tokens=args.tokens,
            do_sample=False,
            num_beams=1,
        )
    generated = generated[:, -args.tokens :]  # some versions prepend a BOS column: keep the K new tokens
    meta = {
        "case": args.out.name,
        "recorded_by": "tests/tools/record_golden.py",
        "checkpoint": str(args.model.resolve()),
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "dtype": args.dtype,
        "question": args.question,
        "image": str(args.image),
        "max_tiles": args.max_tiles,
        "image_tokens": {"IMG_CONTEXT_id": context_id, "num_patches_per_image": [pixel_values.shape[0]]},
        "generation": {"K": args.tokens},
    }
    inputs = {
        "input_ids": encoded.input_ids,
        "attention_mask": encoded.attention_mask,
        "pixel_values": pixel_values.float(),
        "image_flags": image_flags,
    }
    expected = {"logits": logits, "generated_ids": generated, "vision_embeds": vision}
    write_case(args.out, args.model, inputs, expected, meta)
    print(f"wrote {args.out}: check it with  python -m minisail parity {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
