"""Errors a user can cause. The CLI prints their message as one line and exits with status 2."""


class LocalcoderError(Exception):
    """Bad input: the message names the problem and the fix."""


class GGUFError(LocalcoderError):
    """The file is missing, not a GGUF, truncated, or not a model we can run."""


class UnsupportedQuantType(GGUFError):
    """A tensor uses a ggml type we have no kernels for."""


class ContextOverflow(LocalcoderError):
    """The prompt does not fit in the context window."""
