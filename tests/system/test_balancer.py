"""Three `dlora-cloud serve` workers on one Redis behind a real L4 balancer (HAProxy from Debian, TCP mode):
six devices train through its one address while one worker is SIGKILLed and another drained (SIGTERM).

Every session finishes; each adapter and Kill-and-Revive log equals, bit for bit, the same session run
undisturbed (a redone step repeats the same float32 operations on the same numbers: the keyed dropout masks
and the gradient order do not depend on which worker runs it); each session's Kill-and-Revive command stream
holds one decision per epoch (none made twice); the killed worker's registration expires. Needs haproxy
(`apt-get install haproxy`, which the CI setup does); slow.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from safetensors.torch import load_file

from cloud_server.kr_queue import commands_key
from cloud_server.workers import TTL_S, list_workers
from edge_client.tools.cloud_process import CloudProcess

SESSIONS, WORKERS, EPOCHS = 6, 3, 3
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}

HAPROXY = """global
  maxconn 256
defaults
  mode tcp
  timeout connect 2s
  timeout client 10m
  timeout server 10m
  retries 3
  option redispatch
frontend devices
  bind 127.0.0.1:{port}
  default_backend workers
backend workers
  balance leastconn
{servers}
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(address: str, model: Path, data: Path, out: Path, seed: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edge_client.app.cli", "--log-level", "INFO", "train", "--cloud",
                             address, "--model",
                             str(model), "--data", str(data), "--output", str(out), "--epochs", str(EPOCHS),
                             "--batch-size", "2", "--lr", "1e-2", "--seed", str(seed), "--budget", "2", "--revive", "1",
                             "--micro-batches", "2", "--protocol", "adapter" if seed % 2 else "layerwise",
                             "--no-progress"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)


def _finish(proc: subprocess.Popen, timeout_s: float = 900) -> tuple[str, int]:
    """Wait for a `dlora train`: the cloud session it used (every reconnect must resume that one), and how many
    times it retried a step."""
    _, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, err.strip().splitlines()[-3:] or proc.returncode
    sessions = set(re.findall(r"session ([0-9a-f]{32}) on ", err))
    assert len(sessions) == 1, sessions
    return sessions.pop(), err.count("; retrying in ")


def _steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("haproxy") is None, reason="needs haproxy (apt-get install haproxy)")
def test_sessions_survive_a_killed_and_a_drained_worker_behind_haproxy(tiny_dir, data_file, redis_url, tmp_path):
    model = tiny_dir("llama", layers=4)
    client = redis.Redis.from_url(redis_url)
    workers = [CloudProcess(model, extra=["--redis-url", redis_url, "--max-sessions", "16", "--drain-timeout", "30"])
               for _ in range(WORKERS)]
    port = _free_port()
    servers = "\n".join(f"  server w{i} {w.address} check inter 300ms fall 2 rise 1" for i, w in enumerate(workers))
    (tmp_path / "haproxy.cfg").write_text(HAPROXY.format(port=port, servers=servers))
    balancer = subprocess.Popen(["haproxy", "-f", str(tmp_path / "haproxy.cfg"), "-db"], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    address = f"127.0.0.1:{port}"
    try:
        time.sleep(1.0)
        assert balancer.poll() is None, balancer.stderr.read() if balancer.stderr else ""
        solo = {}
        for seed in range(SESSIONS):  # undisturbed, one at a time, through the same balancer
            out = tmp_path / f"solo-{seed}"
            assert _finish(_train(address, model, data_file, out, seed))[1] == 0
            solo[seed] = out
        procs = {seed: _train(address, model, data_file, tmp_path / f"run-{seed}", seed) for seed in range(SESSIONS)}
        outs = {seed: tmp_path / f"run-{seed}" for seed in range(SESSIONS)}
        deadline = time.monotonic() + 300
        while min(_steps_done(o) for o in outs.values()) < 2:  # every session under way
            assert time.monotonic() < deadline, "the sessions did not start"
            time.sleep(0.05)
        while True:  # the workers' next beats (every TTL/3) say which serve sessions
            busy = sorted(list_workers(client), key=lambda w: -len(w.sessions))
            if len(busy) == WORKERS and busy[1].sessions:
                break
            assert time.monotonic() < deadline, [(w.address, w.sessions) for w in busy]
            time.sleep(0.2)
        assert max(_steps_done(o) for o in outs.values()) < 3 * EPOCHS * 8 // 2, "too late: half the run is done"
        by_address = {w.address: w for w in workers}
        killed, drained = by_address[busy[0].address], by_address[busy[1].address]
        killed.proc.send_signal(signal.SIGKILL)
        drained.proc.send_signal(signal.SIGTERM)
        finished = {seed: _finish(proc) for seed, proc in procs.items()}
        sessions = {seed: session for seed, (session, _) in finished.items()}
        retried = [seed for seed, (_, tries) in finished.items() if tries]
        assert retried, "no session was on the killed or the drained worker"
        for seed in retried:  # the cost of moving: the slowest step against the run's median
            steps = sorted(json.loads(line)["step_s"] for line in (outs[seed] / "metrics.jsonl").read_text().splitlines())
            print(f"\nsession {seed}: {finished[seed][1]} retries; median step {steps[len(steps) // 2]:.3f} s, "
                  f"slowest {steps[-1]:.3f} s")
        assert drained.proc.wait(timeout=60) == 0
        for seed in range(SESSIONS):
            got = load_file(str(outs[seed] / "adapter_model.safetensors"))
            want = load_file(str(solo[seed] / "adapter_model.safetensors"))
            assert got.keys() == want.keys() and all(bool((got[k] == want[k]).all()) for k in want), seed
            assert (outs[seed] / "kr_log.jsonl").read_text() == (solo[seed] / "kr_log.jsonl").read_text(), seed
            epochs = [int(fields[b"epoch"]) for _, fields in client.xrange(commands_key(sessions[seed]))]
            assert sorted(epochs) == list(range(1, EPOCHS + 1)), (seed, epochs)  # one decision per epoch
        time.sleep(TTL_S + 1)
        alive = {w.address for w in list_workers(client)}
        assert killed.address not in alive and drained.address not in alive
    finally:
        balancer.terminate()
        for w in workers:
            if w.proc.poll() is None:
                w.proc.kill()

