"""Backends: the op set the model file is written over, and get_backend()."""

from __future__ import annotations

import platform
import sys
from typing import Any, NamedTuple

from ..errors import LocalcoderError


class SharedExpert(NamedTuple):
    """The shared expert of a MoE layer as moe() takes it: SwiGLU weights and each token's weight (T, 1)
    (sigmoid of the shared gate). Added after the routed experts: y = routed + weight * swiglu(x)."""
    gate: Any
    up: Any
    down: Any
    weight: Any

BACKENDS = ("auto", "numpy", "numba", "mlx")
COMPILE_NOTICE = ("compiling the CPU kernels: about a minute, once after an install or upgrade "
                  "(`localcoder warmup` does it ahead of time)")


def announce_compiles(backend: str, say) -> None:
    """Before loading a model: where the backend may be Numba's, call say(COMPILE_NOTICE) once if this
    process compiles a kernel (Numba's cache lacks it: the first run after an install or an upgrade), so that
    a minute of compiling is said, not silent. A run that loads its kernels from the cache says nothing."""
    if backend not in ("auto", "numba"):
        return
    try:
        from .numba_cpu import on_first_compile
    except Exception:  # noqa: BLE001 - no usable numba: get_backend says so, and nothing compiles
        return
    on_first_compile(lambda: say(COMPILE_NOTICE))


def _numba_backend(threads: int | None = None):
    from .numba_cpu import NumbaBackend
    return NumbaBackend(threads)


def check_threads(threads: int | None) -> None:
    """A thread count from the command line or the API: None (every core) or at least 1."""
    if threads is not None and threads < 1:
        raise LocalcoderError(f"--threads {threads}: give at least 1 (or leave it out to use every core)")


def get_backend(name: str = "auto", threads: int | None = None, expert_budget: int | None = None):
    """The backend called `name`; "auto" picks the fastest one installed for this machine (Numba on x86).
    threads: the numba backend's CPU threads (default: every core; more than the machine has are capped).
    expert_budget: bytes of the MLX backend's own cache of converted experts (default: from free memory); the
    other backends read experts through the model's expert store."""
    if name not in BACKENDS:
        raise LocalcoderError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    check_threads(threads)
    if name == "numba":
        try:
            return _numba_backend(threads)
        except ImportError as e:
            raise LocalcoderError(f"backend 'numba' needs the numba package ({e}); pip install numba, "
                                  "or use --backend numpy") from e
    if name == "mlx" or (name == "auto" and sys.platform == "darwin" and platform.machine() == "arm64"):
        try:
            from .mlx_backend import MLXBackend
        except ImportError as e:
            if name == "mlx":
                raise LocalcoderError(f"backend 'mlx' needs MLX ({e}); pip install 'localcoder[mlx]'") from None
        else:
            return MLXBackend(expert_budget=expert_budget)
    if name == "auto" and platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
        try:
            return _numba_backend(threads)
        except ImportError as e:
            print(f"localcoder: numba is not importable ({e}); using the slow NumPy backend "
                  "(pip install numba for the fast one)", file=sys.stderr)
    if name in ("auto", "numpy"):
        from .numpy_ref import NumpyBackend
        return NumpyBackend()
    raise LocalcoderError(f"backend {name!r} is not available in this build; use --backend numpy")
