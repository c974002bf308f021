"""Keeping Ctrl-C on the main thread.

A process-directed SIGINT may be handed by the kernel to any thread that does not block it. When it lands on a
helper thread, Python notes it, but the main thread, blocked in input() or another system call, is not woken,
so Ctrl-C at the chat prompt would do nothing. Every helper thread therefore blocks SIGINT: ours call
background_thread() first; threads that libraries create (OpenBLAS at numpy's import, Numba's thread pool at
its first parallel kernel) inherit the mask of the thread that creates them, so those are created inside
sigint_blocked().
"""

from __future__ import annotations

import contextlib
import signal

_HAVE_MASK = hasattr(signal, "pthread_sigmask")


def background_thread() -> None:
    """Call first in a helper thread: it no longer takes SIGINT."""
    if _HAVE_MASK:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})


@contextlib.contextmanager
def sigint_blocked():
    """Threads started in this block (by this thread or by libraries) never take SIGINT; a Ctrl-C that
    arrives meanwhile is delivered when the block ends."""
    if not _HAVE_MASK:
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
