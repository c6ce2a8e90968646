"""Process tuning (common/tuning.py) runs first in every dlora entry point, before torch loads: the entry
modules import without torch, and once main has started the process has GOMP_SPINCOUNT set and glibc
keeps freed buffers for reuse, each unless the user chose otherwise."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# entry module -> a call of its main that returns (SystemExit) right after the tuning: --help, or no arguments
ENTRIES = {
    "edge_client.app.cli": "main(['--help'])",  # dlora
    "cloud_server.cli": "main(['--help'])",  # dlora-cloud
    "edge_client.app.daemon": "main(['--help'])",  # dlora-edge
    "edge_client.app.session_runner": "main([])",  # one daemon session's process
    "edge_client.tools.bench_worker": "main([])",  # one dlora bench configuration's process
}

_AFTER_MAIN = """
import ctypes, os, resource, sys
import {module} as entry
try:
    entry.{call}
except SystemExit:
    pass
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes, libc.memset.argtypes = [ctypes.c_void_p], [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
n = 6 << 20
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):  # two blocks freed together, as a step frees its messages and activations
    a, b = libc.malloc(n), libc.malloc(n)
    libc.memset(a, 1, n)
    libc.memset(b, 1, n)
    libc.free(a)
    libc.free(b)
faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 20
print("tuning:", os.environ.get("GOMP_SPINCOUNT"), faults, "torch" in sys.modules)
"""
_PAGES = (6 << 20) // 4096  # pages of one 6 MB block
_USER_SETTINGS = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY", "GLIBC_TUNABLES")


def _after_main(module: str, env: dict[str, str] | None = None) -> tuple[str, float, bool]:
    """(GOMP_SPINCOUNT, page faults per 6 MB block malloc'd and freed, torch loaded) once main has started."""
    clean = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS and not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", _AFTER_MAIN.format(module=module, call=ENTRIES[module])],
                         env={**clean, **(env or {})}, capture_output=True, text=True, check=True, timeout=120).stdout
    _, spin, faults, torch_loaded = out.strip().splitlines()[-1].split()
    return spin, float(faults), torch_loaded == "True"


@pytest.mark.parametrize("module", ENTRIES)
def test_entry_module_imports_without_torch(module: str) -> None:
    """libgomp reads GOMP_SPINCOUNT when torch loads it: an entry module that imported torch would tune too late."""
    out = subprocess.run([sys.executable, "-c", f"import {module}, sys; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True, timeout=120).stdout
    assert out.strip() == "False"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
@pytest.mark.parametrize("module", ENTRIES)
def test_entry_point_tunes_the_process_first(module: str) -> None:
    spin, faults, torch_loaded = _after_main(module)
    assert spin == "30000" and not torch_loaded
    assert faults < _PAGES / 4, faults  # freed 6 MB blocks are reused, not faulted in again


@pytest.mark.parametrize(("env", "expected"), [({"GOMP_SPINCOUNT": "5"}, "5"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "None")])
def test_a_users_openmp_policy_wins(env: dict[str, str], expected: str) -> None:
    assert _after_main("edge_client.app.cli", env)[0] == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_users_malloc_tunable_wins() -> None:
    _, faults, _ = _after_main("cloud_server.cli", {"GLIBC_TUNABLES": "glibc.malloc.perturb=0"})
    assert faults > _PAGES / 2, faults  # glibc's own thresholds: the blocks are unmapped and faulted in again


def test_too_late_once_torch_is_loaded() -> None:
    """After `import torch` libgomp has read its settings: tune_process leaves GOMP_SPINCOUNT alone rather than
    pretend."""
    code = "import os, torch\nfrom common.tuning import tune_process\ntune_process()\nprint(os.environ.get('GOMP_SPINCOUNT'))"
    clean = {k: v for k, v in os.environ.items() if k not in _USER_SETTINGS}
    out = subprocess.run([sys.executable, "-c", code], env=clean, capture_output=True, text=True, check=True,
                         timeout=120).stdout
    assert out.strip() == "None"
