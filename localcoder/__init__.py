"""localcoder: a local, offline runtime for Qwen3-Coder-Next (GGUF arch `qwen3next`)."""

__version__ = "0.1.0"
