"""Vision encoders: InternViT (SAIL-VL-2B, InternVL-Chat-V1-5)."""
