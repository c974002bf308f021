"""This process's peak resident memory, as bench and /stats report it; how the C heap hands memory back."""

from __future__ import annotations

import ctypes
import os
import re
import resource
import sys

# glibc returns freed blocks of more than 128 KiB to the system at once (and trims the heap's free top past
# twice its adaptive mmap threshold), so a prompt chunk's 4-16 MB temporaries arrive as fresh pages that the
# kernel zeroes on first touch: `python benchmarks/profile_ops.py --prefill 512` on the Zen 5 VM spent 180 ms in
# conv1d and 102 ms in silu of a 2121 ms prefill, 87 and 44 of 1902 ms with these settings (blocks up to 32 MiB
# from the heap, and up to 512 MiB of free heap kept for reuse).
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 512 << 20


def keep_freed_memory() -> bool:
    """Tune glibc's malloc as above (Linux with glibc; not when the user set MALLOC_* or GLIBC_TUNABLES)."""
    user_set = any(k.startswith("MALLOC_") or k == "GLIBC_TUNABLES" for k in os.environ)
    if not sys.platform.startswith("linux") or user_set:
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def peak_rss_bytes() -> int:
    """The most resident memory this process has held, in bytes.

    On Linux this is VmHWM from /proc/self/status, the high-water mark of this process's own address space:
    ru_maxrss is carried across exec, so a process started by a large one (a test runner, a wrapper script)
    would report its parent's peak. macOS gives ru_maxrss in bytes, Linux in KiB."""
    try:
        with open("/proc/self/status") as f:
            m = re.search(r"VmHWM:\s+(\d+) kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024
