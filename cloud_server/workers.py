"""Workers as peers: every `dlora-cloud serve` on one Redis registers itself there, with a heartbeat.

Keys (times are Redis's own clock, in ms, so workers' clocks need not agree):
- `dlora:workers` (sorted set): worker id -> when its registration ends (a worker that stops beating
  drops out of `list_workers` one TTL later, and its entry is removed by the next worker that looks);
- `dlora:worker:{id}` (hash, expiring with it): address, model fingerprint and type, host, pid, start
  time, and its load at the last beat: the sessions it serves and their ids.

A worker beats every TTL/3 on a thread of its own (`WorkerRegistry`), and at once when one of its sessions
opens or ends (`nudge`), and removes its entry when it stops cleanly. `dlora-cloud status` reads them (`list_workers`, `render`). Sessions' own state (records, the
Kill-and-Revive streams, the live slots and their fencing tokens) lives in Redis already, so any worker
can continue any session; this registry is what an operator and a balancer's health checks look at.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from cloud_server.slots import redis_now_ms

log = logging.getLogger(__name__)

WORKERS = "dlora:workers"
TTL_S = 15.0  # a worker that stopped beating is gone this much later


def worker_key(worker_id: str) -> str:
    return f"dlora:worker:{worker_id}"


@dataclass(frozen=True)
class WorkerInfo:
    """One registered worker, as its last beat left it."""

    worker_id: str
    address: str
    model_type: str
    fingerprint: str
    host: str
    pid: int
    started: float  # Unix time
    sessions: tuple[str, ...]  # session ids it serves
    seen_ms_ago: int  # since its last beat, by Redis's clock


class WorkerRegistry:
    """This worker's registration, beaten every ttl/3 until `stop`. `load` says, at each beat, the ids of the
    sessions it serves. Redis failures are logged and retried at the next beat (the TTL covers two misses)."""

    def __init__(self, client: redis.Redis, address: str, model_type: str, fingerprint: str,
                 load: Callable[[], list[str]], ttl_s: float = TTL_S) -> None:
        self.r, self.load = client, load
        self.worker_id = f"{socket.gethostname()}-{os.getpid()}-{address.rsplit(':', 1)[-1]}"
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.fixed = {"address": address, "model_type": model_type, "fingerprint": fingerprint,
                      "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
        self._stop = threading.Event()
        self._nudged = threading.Event()  # beat now: a session opened or ended
        self.beat()
        self._thread = threading.Thread(target=self._run, daemon=True, name="dlora-worker-beat")
        self._thread.start()

    def beat(self) -> None:
        """Register (again) with the current load, for one more TTL."""
        try:
            now = redis_now_ms(self.r)
            fields = {**self.fixed, "sessions": json.dumps(sorted(self.load())), "beat_ms": now}
            with self.r.pipeline() as p:
                p.hset(worker_key(self.worker_id), mapping=fields)
                p.pexpire(worker_key(self.worker_id), self.ttl_ms)
                p.zadd(WORKERS, {self.worker_id: now + self.ttl_ms})
                p.execute()
        except redis.RedisError as e:
            log.warning("could not renew this worker's registration in Redis: %s", e)

    def nudge(self) -> None:
        """Beat now, on the beat's own thread (the caller never waits for Redis): the sessions changed."""
        self._nudged.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._nudged.wait(self.ttl_ms / 3000)
            self._nudged.clear()
            if not self._stop.is_set():
                self.beat()

    def stop(self) -> None:
        """Stop beating and remove the registration (a worker that dies instead drops out one TTL later)."""
        self._stop.set()
        self._nudged.set()
        self._thread.join(timeout=5)
        try:
            with self.r.pipeline() as p:
                p.delete(worker_key(self.worker_id))
                p.zrem(WORKERS, self.worker_id)
                p.execute()
        except redis.RedisError as e:
            log.warning("could not remove this worker's registration from Redis (%s); it expires by itself", e)


def list_workers(client: redis.Redis) -> list[WorkerInfo]:
    """The workers whose registration has not run out, oldest first; expired entries are removed.

    Raises:
        redis.RedisError: Redis failed.
    """
    now = redis_now_ms(client)
    client.zremrangebyscore(WORKERS, "-inf", now)
    out = []
    for raw_id in client.zrange(WORKERS, 0, -1):
        worker_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        fields = {(k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
                  for k, v in client.hgetall(worker_key(worker_id)).items()}
        if not fields:
            continue
        out.append(WorkerInfo(worker_id, fields.get("address", "?"), fields.get("model_type", "?"),
                              fields.get("fingerprint", "?"), fields.get("host", "?"), int(fields.get("pid", 0)),
                              float(fields.get("started", 0)), tuple(json.loads(fields.get("sessions", "[]"))),
                              max(0, now - int(fields.get("beat_ms", now)))))
    return sorted(out, key=lambda w: w.started)


def render(workers: list[WorkerInfo]) -> str:
    """`dlora-cloud status` as text: one line per worker, then one per session it serves."""
    if not workers:
        return f"no workers registered (none running on this Redis, or all stopped beating over {TTL_S:g} s ago)\n"
    lines = [f"{len(workers)} worker(s), {sum(len(w.sessions) for w in workers)} session(s)",
             f"{'worker':<32} {'address':<22} {'model':<8} {'fingerprint':<14} {'sessions':>8} {'last beat':>10}"]
    for w in workers:
        lines.append(f"{w.worker_id:<32} {w.address:<22} {w.model_type:<8} {w.fingerprint[:14]:<14} "
                     f"{len(w.sessions):>8} {w.seen_ms_ago / 1000:>9.1f}s")
    for w in workers:
        lines += [f"  session {s} on {w.worker_id}" for s in w.sessions]
    return "\n".join(lines) + "\n"
