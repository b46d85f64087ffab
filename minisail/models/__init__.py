"""Model families, each composing the shared parts; `registry.py` picks one from a config.json."""
