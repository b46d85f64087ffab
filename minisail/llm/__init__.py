"""The language-model side: one decoder core for Qwen2, Qwen3, InternLM2 and Llama (Yi)."""
