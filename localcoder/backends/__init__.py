"""Backends: the op set the model file is written over, and get_backend()."""

from __future__ import annotations

from ..errors import LocalcoderError

BACKENDS = ("auto", "numpy", "numba", "mlx")


def get_backend(name: str = "auto"):
    """The backend called `name`; "auto" picks the fastest one installed for this machine."""
    if name not in BACKENDS:
        raise LocalcoderError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    if name in ("auto", "numpy"):
        from .numpy_ref import NumpyBackend
        return NumpyBackend()
    raise LocalcoderError(f"backend {name!r} is not available in this build; use --backend numpy")
