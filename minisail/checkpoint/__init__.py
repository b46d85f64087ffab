"""Reading official checkpoints: files (safetensors, sharded), key maps per family, and the strict loader."""
