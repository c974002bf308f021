"""localcoder: a local, offline runtime for Qwen3-Coder-Next (GGUF arch `qwen3next`)."""

__version__ = "0.1.0"


def load(path, backend="auto", n_ctx=None, **options):
    """localcoder.load(path, backend="auto", n_ctx=None, expert_cache=None, ...) -> Model (see localcoder.model)."""
    from .model import load as _load

    return _load(path, backend=backend, n_ctx=n_ctx, **options)


__all__ = ["load", "__version__"]
