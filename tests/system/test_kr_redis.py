"""Kill-and-Revive through a real Redis server: streams, a cloud SIGKILLed and restarted, two sessions."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import redis
import torch
from safetensors.torch import load_file

from cloud_server.kr_queue import GROUP, REPORTS, commands_key, session_key

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cloud(model_dir: Path, port: int, redis_url: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--redis-url", redis_url, "--claim-idle", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line
    return proc


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def kr_log(out: Path) -> list[dict]:
    path = out / "kr_log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def train_command(port: int, out: Path, common: list[str], flags: list[str]) -> list[str]:
    return [sys.executable, "-m", "edge_client.app.cli", "train", "--cloud", f"127.0.0.1:{port}", "--output", str(out),
            "--connect-timeout", "120", *common, *flags]


def test_cloud_killed_between_epochs_continues_both_sessions(tiny_dir, redis_url, data_file, tmp_path):
    """Two sessions lose their cloud to SIGKILL (a between epochs, b in the middle of one) and end with
    exactly what the same runs give without the kill: the same adapter bits, losses and KR decisions.

    Why exact equality holds on any CPU: the reference is the same command (`dlora train`, the same
    edge and cloud code, the same flags and threads) run without the kill, and a redone step repeats
    the same float operations on the same inputs (the trainer restores the RNG and zeroes the grads
    first). CPU kernels of torch are deterministic for a given shape and thread count, so two such
    runs agree to the bit on any one machine. Comparing with local-train instead would be a
    comparison across summation orders, and after 32 AdamW steps that is not exact: AdamW divides by
    sqrt(v), so an element whose gradient is itself float32 round-off moves by +-lr per step by its
    sign, and two correct runs may end up to 2 x lr x steps (~2 here) apart there. Split == PEFT is
    proven step by step in test_golden_peft.py; this test proves that a lost cloud changes nothing.
    """
    model_dir = tiny_dir("llama", layers=24)  # ~5 s of training per run: far longer than the edges' start-up skew
    port = free_port()
    runs = {"a": ["--budget", "2", "--revive", "1"], "b": ["--budget", "3", "--revive", "2", "--kill-mode", "frozen"]}
    common = ["--model", str(model_dir), "--data", str(data_file), "--epochs", "4", "--batch-size", "2",
              "--lr", "3e-2", "--lora-dropout", "0", "--no-progress"]
    edges = {name: subprocess.Popen(train_command(port, tmp_path / name, common, flags), stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=ENV)
             for name, flags in runs.items()}
    # the edges wait for the cloud while it loads: both start training together, not one
    # several seconds after the other as their imports on a busy machine would have it
    cloud = start_cloud(model_dir, port, redis_url)
    refs: dict[str, subprocess.Popen] = {}
    try:
        # both streams open (b may still be importing torch when a finishes its first epoch), a between epochs
        wait_for(lambda: len(kr_log(tmp_path / "a")) >= 1 and steps_done(tmp_path / "b") >= 1, 120,
                 "epoch 1 of session a and a step of session b")
        cloud.send_signal(signal.SIGKILL)
        cloud.wait()
        cloud = start_cloud(model_dir, port, redis_url)
        results = {name: e.communicate(timeout=240) for name, e in edges.items()}
        for name, e in edges.items():
            assert e.returncode == 0, results[name][1][-2000:]
            assert "retrying" in results[name][1], f"session {name} never lost its stream to the kill"
        # the same runs without a kill, both at once on the restarted cloud
        refs = {name: subprocess.Popen(train_command(port, tmp_path / f"{name}-ref", common, flags),
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
                for name, flags in runs.items()}
        ref_results = {name: e.communicate(timeout=240) for name, e in refs.items()}
        for name, e in refs.items():
            assert e.returncode == 0, ref_results[name][1][-2000:]
            assert "retrying" not in ref_results[name][1]
    finally:
        cloud.kill()
        for e in [*edges.values(), *refs.values()]:
            e.kill()
    for name in runs:
        run, ref = tmp_path / name, tmp_path / f"{name}-ref"
        assert len(kr_log(run)) == 4
        assert kr_log(run) == kr_log(ref)  # active sets, deltas, decisions
        rows, ref_rows = (metrics(p) for p in (run, ref))
        assert [(r["step"], r["loss"], r["active_modules"]) for r in rows] == \
            [(r["step"], r["loss"], r["active_modules"]) for r in ref_rows]
        a = load_file(str(run / "adapter_model.safetensors"))
        b = load_file(str(ref / "adapter_model.safetensors"))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), f"session {name}: {k} differs from the run without the kill"
    assert all(len(d["active"]) == 2 for d in kr_log(tmp_path / "a")[1:])
    assert all(len(d["active"]) == 3 for d in kr_log(tmp_path / "b")[1:])

    # the streams hold every report and command; the scheduler acked everything
    r = redis.Redis.from_url(redis_url)
    reports = [f for _, f in r.xrange(REPORTS)]
    sessions = {f[b"session"].decode() for f in reports}
    assert len(sessions) >= 2
    for sid in sessions:
        epochs = sorted({int(f[b"epoch"]) for f in reports if f[b"session"].decode() == sid})
        if epochs == [1, 2, 3, 4]:
            commands = [json.loads(f[b"decision"]) for _, f in r.xrange(commands_key(sid))]
            assert [c["epoch"] for c in commands] == [1, 2, 3, 4]
            assert r.ttl(session_key(sid)) > 0
    assert r.xpending(REPORTS, GROUP)["pending"] == 0


def test_stopping_the_cloud_stops_its_embedded_redis(tiny_dir, tmp_path):
    """Without --redis-url the cloud runs its own redis-server child; a clean stop ends it, even while the
    cloud's threads hold pooled connections, and leaves its AOF in the state dir. (A SIGKILLed cloud:
    tests/system/test_redis_faults.py.)"""
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig

    model = tiny_dir("llama")
    server = CloudServer(DecoderStack(model), ServeConfig(model=model, port=0, state_dir=tmp_path / "state"))
    pid = server.redis.embedded.pid

    def hold_a_connection() -> None:
        try:
            server.redis.blpop(["dlora:test:never"], timeout=2)
        except (redis.RedisError, OSError, ValueError):
            pass  # cut off by the shutdown

    busy = threading.Thread(target=hold_a_connection)
    busy.start()
    wait_for(lambda: len(server.redis.client_list()) >= 3, 10, "the worker's and the thread's connections")
    os.kill(pid, 0)  # running
    server.stop(0)
    busy.join()
    wait_for(lambda: not pid_alive(pid), 10, f"redis-server {pid} to exit")
    assert (tmp_path / "state" / "appendonly.aof").exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited
