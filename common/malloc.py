"""Keep freed buffers of a few MB for reuse instead of giving them back to the kernel after each use.

A training step allocates and frees the same large buffers every time: activations, gradients and,
in a split, every message (a layer's delta is 6 MB at the bench's shapes). glibc's malloc serves
blocks above its mmap threshold with a fresh mmap and unmaps them on free, and it trims the top of
the heap once more than its trim threshold is free there; its adaptive thresholds only rise to the
largest block freed so far, so two 6 MB blocks freed together still get trimmed. Either way the next
step page-faults the same memory in again and the kernel zeroes it: on dlora's CI machine that was
~8% of the device process's CPU time in a split step. Raising both thresholds keeps those pages:
in paired runs local-train's step took 0.87–0.96x its time and the float32 split's 0.86–0.91x, for
0–6% more peak RSS (docs/benchmarks.md).

Blocks above MMAP_THRESHOLD still get their own mapping and go back on free, and at most
TRIM_THRESHOLD of free memory stays at the top of a heap. glibc only (Linux wheels); a process
where MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a glibc.malloc tunable is set keeps the
user's choice.
"""

from __future__ import annotations

import ctypes
import os
import sys

MMAP_THRESHOLD = 128 << 20  # bytes: blocks up to this size come from the heap
TRIM_THRESHOLD = 256 << 20  # bytes: free memory kept at the top of a heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def keep_freed_buffers() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; False where not glibc or the user chose."""
    if not sys.platform.startswith("linux") or "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        return False
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or "MALLOC_TRIM_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 - only glibc has it (musl's mallopt does nothing)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                        TRIM_THRESHOLD))
