"""Workers register in Redis with a heartbeat (cloud_server/workers.py), and `dlora-cloud status` lists them."""

from __future__ import annotations

import json
import time

import redis

from cloud_server.cli import main as cloud_main
from cloud_server.workers import WORKERS, WorkerRegistry, list_workers, worker_key
from common.config import TrainConfig
from edge_client.remote.split_engine import SplitEngine


def test_two_workers_on_one_redis_list_each_other_and_their_sessions(tiny_dir, cloud, redis_url, data_file, tmp_path,
                                                                     capsys):
    model_dir = tiny_dir("llama", layers=2)
    first, second = cloud(model_dir), cloud(model_dir)
    client = redis.Redis.from_url(redis_url)
    workers = {w.address: w for w in list_workers(client)}
    assert {first, second} <= set(workers)
    assert workers[first].fingerprint == workers[second].fingerprint and workers[first].model_type == "llama"
    engine = SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=second, progress=False))
    try:
        deadline = time.monotonic() + 2  # a session opening makes its worker beat at once (not at the next 5 s)
        while engine.session_id not in {w.address: w for w in list_workers(client)}[second].sessions:
            assert time.monotonic() < deadline, "the session never showed in its worker's registration"
            time.sleep(0.2)
        assert cloud_main(["status", "--redis-url", redis_url]) == 0
        out = capsys.readouterr().out
        assert first in out and second in out and f"session {engine.session_id}" in out
        assert cloud_main(["status", "--redis-url", redis_url, "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert {r["address"]: r["sessions"] for r in rows}[second] == [engine.session_id]
    finally:
        engine.close()


def test_a_worker_that_stops_beating_drops_out_and_a_clean_stop_removes_it_at_once(redis_url):
    client = redis.Redis.from_url(redis_url)
    dead = WorkerRegistry(client, "10.0.0.1:1", "llama", "f" * 16, lambda: [], ttl_s=0.6)
    clean = WorkerRegistry(client, "10.0.0.2:2", "llama", "f" * 16, lambda: ["s1"], ttl_s=0.6)
    assert {"10.0.0.1:1", "10.0.0.2:2"} <= {w.address for w in list_workers(client)}
    dead._stop.set()  # as if its process died: no more beats, nothing removed
    dead._thread.join()
    clean.stop()
    assert "10.0.0.2:2" not in {w.address for w in list_workers(client)}  # at once
    time.sleep(1.0)
    assert "10.0.0.1:1" not in {w.address for w in list_workers(client)}
    assert client.zscore(WORKERS, dead.worker_id) is None and not client.exists(worker_key(dead.worker_id))


def test_status_without_a_reachable_redis_is_one_line(tmp_path, capsys):
    assert cloud_main(["status", "--state-dir", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "cannot reach" in err
