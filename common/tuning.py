"""Process tuning every dlora entry point runs first, before anything imports torch: `tune_process()`.

Two settings, both measured on dlora's CI machine (2 shared cores; docs/benchmarks.md), both left
alone where the user already chose.

**How long torch's idle OpenMP threads spin before they sleep** (processes that mostly wait on a link).
GNU OpenMP (libgomp, the runtime of torch's Linux CPU wheels) lets a thread that has finished its
share of a parallel op spin GOMP_SPINCOUNT times (default 300,000; ~8 ms of a core on dlora's CI
machine) before it sleeps. A split step alternates between the cloud and the device dozens of times
(one round trip per layer and direction), so each process goes idle dozens of times per step and its
spinning threads take cores from the other process, which is exactly when that one computes. 30,000
spins (~1–2 ms) still cover the gaps between one process's own ops. Measured on 2 cores: the float32
split over 127.0.0.1 took 1.37–1.57x local-train's step with the default (median 1.47x) and
1.24–1.38x with 30,000 (median 1.32x); local-train alone is the same either way (0.97–1.03x).
libgomp reads the variable once, when torch loads it, so this must run before `import torch`: the
entry points call it first thing, and their modules import torch only inside functions. The variable
is inherited by child processes. An explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.

**Keep freed buffers of a few MB for reuse instead of giving them back to the kernel after each use.**
A training step allocates and frees the same large buffers every time: activations, gradients and,
in a split, every message (a layer's delta is 6 MB at the bench's shapes). glibc's malloc serves
blocks above its mmap threshold with a fresh mmap and unmaps them on free, and it trims the top of
the heap once more than its trim threshold is free there; its adaptive thresholds only rise to the
largest block freed so far, so two 6 MB blocks freed together still get trimmed. Either way the next
step page-faults the same memory in again and the kernel zeroes it: on dlora's CI machine that was
~8% of the device process's CPU time in a split step. Raising both thresholds keeps those pages:
in paired runs local-train's step took 0.87–0.96x its time and the float32 split's 0.86–0.91x, for
0–6% more peak RSS. Blocks above MMAP_THRESHOLD still get their own mapping and go back on free, and
at most TRIM_THRESHOLD of free memory stays at the top of a heap. glibc only (Linux wheels); a
process where MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_ or a glibc.malloc tunable is set keeps
the user's choice. mallopt is per process: every entry point (children included) sets it itself.
"""

from __future__ import annotations

import ctypes
import os
import sys

SPIN_COUNT = "30000"  # GOMP_SPINCOUNT: ~1-2 ms of spinning instead of libgomp's ~8 ms
MMAP_THRESHOLD = 128 << 20  # bytes: blocks up to this size come from the heap
TRIM_THRESHOLD = 256 << 20  # bytes: free memory kept at the top of a heap
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>


def tune_process() -> None:
    """Shorten OpenMP's idle spinning and keep freed buffers for reuse in this process, each unless the
    user chose otherwise. Call it first thing in an entry point, before anything imports torch."""
    _quiet_idle_threads()
    _keep_freed_buffers()


def _quiet_idle_threads() -> bool:
    """GOMP_SPINCOUNT for this process (and its children); False where the user chose a policy or torch
    is already loaded (too late: libgomp has read the variable)."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return False
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
    return True


def _keep_freed_buffers() -> bool:
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
