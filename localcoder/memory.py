"""This process's peak resident memory, as bench and /stats report it."""

from __future__ import annotations

import re
import resource
import sys


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
