"""The cloud's Redis message queue for Kill-and-Revive, and the session records a restart needs.

Keys (all expire after the session's idle TTL, refreshed on every use):
- `dlora:session:{id}` (hash): `record` (JSON: what the Hello fixed), `kr_config`, `kr_state` (JSON),
  `owner` (the name of the device token that opened it; "" under --auth none).
- `dlora:kr:reports` (stream, shared): one entry per epoch report {session, epoch, deltas}.
- `dlora:kr:commands:{id}` (stream): one entry per decision {epoch, decision}.
- `dlora:kr:dead` (stream, shared): reports the scheduler gave up on, with the reason (dead letters).
The reports and dead-letter streams are trimmed to about --reports-maxlen entries (XADD MAXLEN ~).

The gRPC service publishes a report and waits for the command; a SchedulerWorker (one per cloud
process, all in one consumer group) reads reports with XREADGROUP, runs the pure policy of
common/scheduler.py, writes the new state and appends the command in one MULTI/EXEC, then XACKs.
Entries left pending by a dead consumer are taken over with XAUTOCLAIM. A report is idempotent by
epoch, so a device that re-sends one after a cloud restart gets the same decision.

Faults: a report that fails the scheduler --report-max-tries times (or whose consumers died that often
holding it) goes to the dead-letter stream, is acked and logged once, and its session gets an error
decision; no error ends the worker. When Redis has lost its data (NOGROUP) the worker recreates its
group. A Redis error on the request path (SessionStore, KRQueue) is an UnavailableError: the device
sees UNAVAILABLE and retries.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import redis

from cloud_server.redis_server import EmbeddedRedis, redact_url
from common.config import ServeConfig, field_default
from common.errors import ConfigError, SessionError, UnavailableError, first_line
from common.scheduler import Decision, KRConfig, KRState, decide, initial_state

log = logging.getLogger(__name__)

REPORTS = "dlora:kr:reports"
DEAD = "dlora:kr:dead"
GROUP = "kr-scheduler"
WATCH_TRIES = 10  # a session changed under the scheduler's WATCH this often in a row: give up on the report
REDIS_TIMEOUT_S = 30.0  # longest wait for one Redis reply (the queue's blocking reads last at most 1 s)
P = ParamSpec("P")
T = TypeVar("T")


def session_key(session_id: str) -> str:
    return f"dlora:session:{session_id}"


def commands_key(session_id: str) -> str:
    return f"dlora:kr:commands:{session_id}"


class CloudRedis(redis.Redis):
    """A client of the cloud's Redis; `embedded` is the server this process runs for it (None: --redis-url's)."""

    embedded: EmbeddedRedis | None = None


def connect(redis_url: str | None, state_dir: Path) -> tuple[CloudRedis, str]:
    """A Redis client: the server at redis_url, else an embedded Redis server this process starts on state_dir.

    Returns the client and a description of where it lives, for the log (any password redacted).

    Raises:
        ConfigError: the server cannot be reached, or the embedded one cannot start.
    """
    if not redis_url:
        server = EmbeddedRedis(state_dir)
        client = CloudRedis(unix_socket_path=str(server.socket), socket_connect_timeout=5,
                            socket_timeout=REDIS_TIMEOUT_S)
        client.embedded = server
        return client, f"the embedded Redis server (pid {server.pid}) on {server.socket}, data in {server.state_dir}"
    where = redact_url(redis_url)
    tcp = {} if redis_url.startswith("unix:") else {"socket_keepalive": True}  # a unix socket takes no keepalive
    client: CloudRedis = CloudRedis.from_url(  # type: ignore[assignment]
        redis_url, socket_connect_timeout=5, socket_timeout=REDIS_TIMEOUT_S, **tcp)
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise ConfigError(f"--redis-url: cannot use Redis at {where} ({first_line(e)}); start Redis or fix the URL") from None
    return client, where


def disconnect(client: redis.Redis) -> None:
    """Close the idle connections of `client`, and stop the embedded server it talks to, if this process runs one.

    A connection another thread is using (a session ending as the cloud stops) is left to that thread: closing
    its socket under it would raise ValueError there, not the redis.ConnectionError it handles.
    """
    client.connection_pool.disconnect(inuse_connections=False)
    if isinstance(client, CloudRedis) and client.embedded is not None:
        client.embedded.stop()


def unavailable_on_redis_error(fn: Callable[P, T]) -> Callable[P, T]:
    """fn, with a Redis failure raised as UnavailableError: the device sees UNAVAILABLE and retries."""

    @functools.wraps(fn)
    def call(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except redis.RedisError as e:
            log.warning("Redis failed in %s: %s", fn.__qualname__, first_line(e))
            raise UnavailableError(f"the cloud's Redis is unavailable ({type(e).__name__}); retry shortly") from e

    return call


class SessionStore:
    """Per-session records in Redis, so that any cloud process can continue a session."""

    def __init__(self, client: redis.Redis, ttl_s: float) -> None:
        self.r, self.ttl = client, max(1, int(ttl_s))

    @unavailable_on_redis_error
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

    @unavailable_on_redis_error
    def load(self, session_id: str, touch: bool = True) -> dict[str, str] | None:
        """The session's record, its TTL refreshed unless touch is False; None if unknown or expired."""
        raw = self.r.hgetall(session_key(session_id))
        if not raw:
            return None
        if touch:
            self.touch(session_id)
        return {k.decode(): v.decode() for k, v in raw.items()}

    @unavailable_on_redis_error
    def touch(self, session_id: str) -> None:
        with self.r.pipeline(transaction=False) as p:
            p.expire(session_key(session_id), self.ttl)
            p.expire(commands_key(session_id), self.ttl)
            p.execute()


class KRQueue:
    """The service's side: publish a report, wait for its command."""

    def __init__(self, client: redis.Redis, store: SessionStore,
                 maxlen: int = field_default(ServeConfig, "reports_maxlen")) -> None:
        self.r, self.store, self.maxlen = client, store, maxlen

    @unavailable_on_redis_error
    def submit(self, session_id: str, epoch: int, deltas: dict[int, float]) -> None:
        self.r.xadd(REPORTS, {"session": session_id, "epoch": epoch,
                              "deltas": json.dumps({str(k): v for k, v in deltas.items()})},
                    maxlen=self.maxlen, approximate=True)
        self.store.touch(session_id)

    @unavailable_on_redis_error
    def wait_command(self, session_id: str, epoch: int, timeout_s: float) -> dict[str, Any]:
        """The decision for this epoch (scanning the session's command stream), waiting for it if needed.

        Raises:
            SessionError: no decision within timeout_s.
            UnavailableError: Redis failed.
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
                        return json.loads(fields[b"decision"])  # type: ignore[no-any-return,index]


class SchedulerWorker(threading.Thread):
    """Consumes epoch reports in the scheduler consumer group and writes decisions; outlives any error."""

    def __init__(self, client: redis.Redis, store: SessionStore, consumer: str,
                 claim_idle_s: float = field_default(ServeConfig, "claim_idle_s"),
                 max_tries: int = field_default(ServeConfig, "report_max_tries"),
                 maxlen: int = field_default(ServeConfig, "reports_maxlen")) -> None:
        """
        Raises:
            redis.RedisError: the consumer group cannot be created.
        """
        super().__init__(daemon=True, name=f"kr-scheduler-{consumer}")
        self.r, self.store, self.consumer = client, store, consumer
        self.claim_idle_ms = int(claim_idle_s * 1000)
        self.max_tries, self.maxlen = max_tries, maxlen
        self.stop_event = threading.Event()
        self._ensure_group()

    def _ensure_group(self) -> None:
        try:
            self.r.xgroup_create(REPORTS, GROUP, id="0", mkstream=True)
        except redis.ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    def run(self) -> None:
        failing = False  # log the first error of an outage, and its end, not every retry
        while not self.stop_event.is_set():
            try:
                self.poll(block_ms=500)
            except (redis.RedisError, UnavailableError) as e:
                if not failing:
                    log.warning("scheduler: Redis failed (%s); retrying every second", first_line(e))
                failing = True
                self.stop_event.wait(1.0)
                continue
            except Exception:  # noqa: BLE001 - nothing may end the scheduler; the reports stay pending
                log.exception("scheduler: unexpected error; continuing")
                self.stop_event.wait(1.0)
                continue
            if failing:
                log.info("scheduler: Redis answers again")
                failing = False

    def poll(self, block_ms: int = 0) -> int:
        """Handle reclaimed and new reports once; returns how many were taken. Recreates a lost group.

        Raises:
            redis.RedisError, UnavailableError: Redis failed; the reports stay pending.
        """
        try:
            entries = self._claim()
            got = self.r.xreadgroup(GROUP, self.consumer, {REPORTS: ">"}, count=16, block=block_ms or None)
        except redis.ResponseError as e:
            if "NOGROUP" not in str(e):
                raise
            log.warning("scheduler: consumer group %s of %s is gone (Redis lost its data?); recreating it", GROUP, REPORTS)
            self._ensure_group()
            return 0
        entries += [(entry_id, fields, 1) for _, new in got or [] for entry_id, fields in new]
        for entry_id, fields, tries in entries:
            self._process(entry_id, fields, tries)
        return len(entries)

    def _claim(self) -> list[tuple[bytes, dict[bytes, bytes] | None, int]]:
        """Reports pending for claim_idle_s on any consumer (a dead one, or this one after a failure), now
        this one's, each with how often it has been delivered."""
        _, claimed, *_ = self.r.xautoclaim(REPORTS, GROUP, self.consumer, self.claim_idle_ms, "0-0", count=16)
        out = []
        for entry_id, fields in claimed:
            info = self.r.xpending_range(REPORTS, GROUP, min=entry_id, max=entry_id, count=1)
            out.append((entry_id, fields, int(info[0]["times_delivered"]) if info else 1))
        return out

    def _process(self, entry_id: bytes, fields: dict[bytes, bytes] | None, tries: int) -> None:
        """Handle one report and ack it; one that has failed max_tries times goes to the dead letters.

        A report left failing stays pending and comes back through XAUTOCLAIM after claim_idle_s. A
        delivery whose consumer died counts as a failure too: that is how a report that kills its
        consumer is stopped.

        Raises:
            redis.RedisError, UnavailableError: Redis failed; the report stays pending.
        """
        if fields and tries > self.max_tries:
            self._dead_letter(entry_id, fields, tries, f"delivered {tries} times, never acked (its consumers died)")
            return
        try:
            if fields:  # a claimed entry that was deleted meanwhile (trimmed) comes back empty
                self.handle(fields)
        except (redis.RedisError, UnavailableError):
            raise
        except Exception as e:  # noqa: BLE001 - a bad report must not end the scheduler
            if tries >= self.max_tries:
                self._dead_letter(entry_id, fields or {}, tries, f"{type(e).__name__}: {first_line(e)}")
            else:
                log.debug("scheduler: report %s failed (try %d of %d): %s", entry_id, tries, self.max_tries, e)
            return
        self.r.xack(REPORTS, GROUP, entry_id)

    def _dead_letter(self, entry_id: bytes, fields: dict[bytes, bytes], tries: int, reason: str) -> None:
        """Move a report to DEAD with the reason, ack it, log it once, and answer its session with an error
        decision, so that the device is not left waiting for one."""
        session, epoch = fields.get(b"session", b"").decode(errors="replace"), fields.get(b"epoch", b"")
        with self.r.pipeline(transaction=True) as p:
            p.xadd(DEAD, {**fields, "dead_report_id": entry_id, "dead_reason": reason, "dead_tries": tries,
                          "dead_consumer": self.consumer}, maxlen=self.maxlen, approximate=True)
            if session and epoch.isdigit():
                p.xadd(commands_key(session), {"epoch": int(epoch), "decision": json.dumps(
                    {"error": f"the cloud's scheduler gave up on this report ({reason})"})})
                p.expire(commands_key(session), self.store.ttl)
            p.xack(REPORTS, GROUP, entry_id)
            p.execute()
        log.error("scheduler: report %s (session %s, epoch %s) moved to %s after %d deliveries: %s",
                  entry_id.decode(), session or "?", epoch.decode(errors="replace") or "?", DEAD, tries, reason)

    def handle(self, fields: dict[bytes, bytes]) -> Decision | None:
        """Decide one report: the new state and the command in one MULTI/EXEC that WATCHes the session. A
        report decided meanwhile by another consumer (a slow one whose report was taken over) is thus not
        decided twice; a report for an epoch already decided changes nothing.

        Raises:
            KeyError, ValueError, RuntimeError: a malformed report, or a session that keeps changing (the
                caller counts it towards the dead letters).
            redis.RedisError, UnavailableError: Redis failed.
        """
        session_id, epoch = fields[b"session"].decode(), int(fields[b"epoch"])
        for _ in range(WATCH_TRIES):
            with self.r.pipeline(transaction=True) as p:
                p.watch(session_key(session_id))
                try:
                    decision = self._decide(p, session_id, epoch, fields)
                except redis.WatchError:
                    continue  # the session changed (decided elsewhere, or its TTL refreshed): look again
            if decision is not None:
                self.store.touch(session_id)
                log.info("session %s epoch %d: next active %s (killed %s, revived %s)", session_id, epoch,
                         list(decision.next_active), list(decision.killed), list(decision.revived))
            return decision
        raise RuntimeError(f"session {session_id} changed under each of {WATCH_TRIES} tries to decide epoch {epoch}")

    def _decide(self, p: redis.client.Pipeline, session_id: str, epoch: int, fields: dict[bytes, bytes]) -> Decision | None:
        """The decision for a report on a pipeline WATCHing its session; None when there is none to make.

        Raises:
            redis.WatchError: the session changed before EXEC.
        """
        rec = {k.decode(): v.decode() for k, v in p.hgetall(session_key(session_id)).items()}
        if not rec:
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
        p.multi()
        p.hset(session_key(session_id), "kr_state", new_state.to_json())
        p.xadd(commands_key(session_id), {"epoch": epoch, "decision": json.dumps(decision.to_json())})
        p.execute()
        return decision
