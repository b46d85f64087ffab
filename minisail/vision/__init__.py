"""Vision encoders: InternViT (SAIL-VL-2B, InternVL-Chat-V1-5), SAIL-ViT (SAIL-VL2), CLIP ViT (Yi-VL) and
Mono-InternVL's patch embedding (its vision lives in the language model)."""
