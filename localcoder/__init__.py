"""localcoder: a local, offline runtime for Qwen3-Coder-Next (GGUF arch `qwen3next`)."""

import os as _os

# OpenBLAS worker threads spin for ~2**28 cycles after each call (its THREAD_TIMEOUT), taking the cores
# from the Numba kernels that run between BLAS calls in prompt processing (measured, 2 cores: pp128 59 -> 89
# tokens/s with 2**4). Read when numpy loads OpenBLAS, so it must be set before the first `import numpy`.
_os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from .memory import keep_freed_memory as _keep_freed_memory  # noqa: E402

_keep_freed_memory()  # freed prompt temporaries stay in the heap for the next ones (see localcoder.memory)

# OpenBLAS starts its threads when numpy loads: load it with SIGINT blocked so that they never take Ctrl-C
# (see localcoder.threads)
from .threads import sigint_blocked as _sigint_blocked  # noqa: E402

with _sigint_blocked():
    import numpy  # noqa: E402,F401

__version__ = "0.1.0"


def load(path, backend="auto", n_ctx=None, **options):
    """localcoder.load(path, backend="auto", n_ctx=None, expert_cache=None, ...) -> Model (see localcoder.model)."""
    from .model import load as _load

    return _load(path, backend=backend, n_ctx=n_ctx, **options)


__all__ = ["load", "__version__"]
