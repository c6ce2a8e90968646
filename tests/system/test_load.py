"""Load: 8 device processes train at once against one dlora-cloud process on this 2-core machine. Every
session finishes, each adapter equals the same session run alone, bit for bit, and the cloud's resident
memory stays bounded (numbers in docs/security.md)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from edge_client.tools.cloud_process import CloudProcess

SESSIONS = 8
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _rss_mb(pid: int, field: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def _train(address: str, model: Path, data: Path, out: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_client.app.cli", "train", "--cloud", address, "--model",
                             str(model), "--data", str(data), "--output", str(out), "--epochs", "2", "--batch-size",
                             "4", "--lr", "1e-2", "--seed", str(seed), "--budget", "2", "--revive", "1",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, timeout_s: float = 900) -> None:
    _, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err.strip().splitlines()[-1:] or proc.returncode


@pytest.mark.slow
def test_eight_sessions_at_once_finish_and_equal_their_solo_runs(tiny_dir, data_file, tmp_path):
    """Equality is exact (torch.equal): a session's arithmetic on the cloud is the same ops on the same
    inputs whether or not other sessions' micro-batches run beside it in other threads (each op's
    thread split depends on torch's intra-op pool size, not on what else runs), and the device side is
    a process of its own. So any difference is a bug (state shared between sessions), not round-off."""
    model = tiny_dir("llama", layers=4)
    cloud = CloudProcess(model, extra=["--state-dir", str(tmp_path / "cloud-state"), "--max-sessions", "16"])
    try:
        idle_mb = _rss_mb(cloud.proc.pid)
        solo = {}
        for seed in range(SESSIONS):
            out = tmp_path / f"solo-{seed}"
            _finish(_train(cloud.address, model, data_file, out, seed))
            solo[seed] = load_file(str(out / "adapter_model.safetensors"))
        after_solo_mb = _rss_mb(cloud.proc.pid)
        started = time.monotonic()
        procs = {seed: _train(cloud.address, model, data_file, tmp_path / f"load-{seed}", seed)
                 for seed in range(SESSIONS)}
        peak_mb = 0.0
        while any(p.poll() is None for p in procs.values()):
            peak_mb = max(peak_mb, _rss_mb(cloud.proc.pid))
            assert time.monotonic() - started < 900, "8 sessions did not finish in 15 minutes"
            time.sleep(0.2)
        for p in procs.values():
            _finish(p)
        seconds = time.monotonic() - started
        for seed in range(SESSIONS):
            got = load_file(str(tmp_path / f"load-{seed}" / "adapter_model.safetensors"))
            assert got.keys() == solo[seed].keys()
            for key, value in solo[seed].items():
                assert torch.equal(got[key], value), f"session {seed}: {key} differs from its solo run"
        # bounded: 8 concurrent tiny sessions add at most this much over the cloud after 8 solo runs
        assert peak_mb - after_solo_mb < 400, (idle_mb, after_solo_mb, peak_mb)
        print(f"\nload: {SESSIONS} sessions in {seconds:.1f}s; cloud RSS idle {idle_mb:.0f} MB, after solo runs "
              f"{after_solo_mb:.0f} MB, peak under load {peak_mb:.0f} MB, VmHWM {_rss_mb(cloud.proc.pid, 'VmHWM'):.0f} MB")
    finally:
        cloud.stop()
