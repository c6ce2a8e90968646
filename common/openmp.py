"""How long torch's idle OpenMP threads spin before they sleep, for processes that mostly wait on a link.

GNU OpenMP (libgomp, the runtime of torch's Linux CPU wheels) lets a thread that has finished its
share of a parallel op spin GOMP_SPINCOUNT times (default 300,000; ~8 ms of a core on dlora's CI
machine) before it sleeps. A split step alternates between the cloud and the device dozens of times
(one round trip per layer and direction), so each process goes idle dozens of times per step and its
spinning threads take cores from the other process, which is exactly when that one computes. 30,000
spins (~1–2 ms) still cover the gaps between one process's own ops. Measured on 2 cores
(docs/benchmarks.md): the float32 split over 127.0.0.1 took 1.37–1.57x local-train's step with the
default (median 1.47x) and 1.24–1.38x with 30,000 (median 1.32x); local-train alone is the same either
way (0.97–1.03x).

libgomp reads the variable once, when torch loads it, so this must run before `import torch`: the
edge and cloud packages call it first thing. An explicit GOMP_SPINCOUNT or OMP_WAIT_POLICY wins.
"""

from __future__ import annotations

import os
import sys

SPIN_COUNT = "30000"


def quiet_idle_threads() -> None:
    """Shorten OpenMP's idle spinning for this process (and its children), unless the user chose a
    policy or torch is already loaded."""
    if "torch" in sys.modules or "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return
    os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT
