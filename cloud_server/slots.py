"""Live sessions, counted in Redis so that --max-sessions and --max-sessions-per-token hold across workers.

Keys (times are Redis's own clock, in ms, so workers' clocks need not agree):
- `dlora:live` (sorted set): session id -> when its lease ends.
- `dlora:live:holder` (hash): session id -> "OWNER<TAB>NONCE" of the stream that holds the session.
- `dlora:live:owner:{owner}` (sorted set, only for a device token, owner != ""): the same leases, per token.

A stream acquires its session's slot after the Hello (`acquire`), every worker renews the leases of its
streams every lease/3 (`SessionSlots` runs that heartbeat on a thread), and a stream gives its slot back
when it ends (`release`). The holder entry is the session's fencing token: before every step and
Kill-and-Revive report a stream checks it still holds its session (`check`), so a stream a newer one
has replaced, on another worker too, ends (ABORTED) before it runs anything twice. A worker that dies stops renewing: its sessions stop counting one lease later.
A slot is per session, not per stream: a device that comes back on a new stream with the same token
takes its session's slot over (the old stream's release is then a no-op), so a reconnect is never
refused for the slot its own half-open stream still holds. Under --auth none every device is owner ""
and only --max-sessions applies.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass

import redis

from common.errors import LimitError, SupersededError, UnavailableError

log = logging.getLogger(__name__)

LIVE = "dlora:live"
HOLDERS = "dlora:live:holder"
LEASE_S = 30.0  # a slot whose worker stopped renewing it counts this much longer

# KEYS: live, holders, owner's set; ARGV: session id, owner, nonce, lease ms, max sessions, max per owner.
# Returns 1 (acquired), 0 (live and another owner's: left alone, the session record refuses the stream),
# -1 (over max sessions), -2 (over max per owner).
_ACQUIRE = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local sid, owner, lease = ARGV[1], ARGV[2], tonumber(ARGV[4])
for _, dead in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
  redis.call('HDEL', KEYS[2], dead)
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if owner ~= '' then redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now) end
local holder = redis.call('HGET', KEYS[2], sid)
if holder then
  if string.sub(holder, 1, #owner + 1) ~= owner .. '\\t' then return 0 end
else
  if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[5]) then return -1 end
  if owner ~= '' and redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[6]) then return -2 end
end
redis.call('ZADD', KEYS[1], now + lease, sid)
redis.call('HSET', KEYS[2], sid, owner .. '\\t' .. ARGV[3])
if owner ~= '' then
  redis.call('ZADD', KEYS[3], now + lease, sid)
  redis.call('PEXPIRE', KEYS[3], 2 * lease)
end
return 1
"""

# KEYS: live, holders, owner's set; ARGV: session id, owner, nonce, lease ms. Renews the lease of a slot
# this stream holds (re-adding it if its lease ran out meanwhile, e.g. over a Redis outage: the session is
# live); 0 when another stream has taken the session over.
_RENEW = """
redis.replicate_commands()
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local me = ARGV[2] .. '\\t' .. ARGV[3]
local holder = redis.call('HGET', KEYS[2], ARGV[1])
if holder and holder ~= me then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], me)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
if ARGV[2] ~= '' then
  redis.call('ZADD', KEYS[3], now + tonumber(ARGV[4]), ARGV[1])
  redis.call('PEXPIRE', KEYS[3], 2 * tonumber(ARGV[4]))
end
return 1
"""

# KEYS: live, holders, owner's set; ARGV: session id, owner, nonce. Frees the slot if this stream holds it.
_RELEASE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] .. '\\t' .. ARGV[3] then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if ARGV[2] ~= '' then redis.call('ZREM', KEYS[3], ARGV[1]) end
return 1
"""


# KEYS: holders; ARGV: session id, owner, nonce. The fence a stream passes before each step and each
# Kill-and-Revive report: 1 while it holds its session (taking it back if the holder entry is gone, e.g.
# after a Redis restart), 0 once a newer stream, on any worker, holds it.
_FENCE = """
local me = ARGV[2] .. '\t' .. ARGV[3]
local holder = redis.call('HGET', KEYS[1], ARGV[1])
if holder and holder ~= me then return 0 end
if not holder then redis.call('HSET', KEYS[1], ARGV[1], me) end
return 1
"""


def redis_now_ms(client: redis.Redis) -> int:
    """Redis's own clock in ms: what the leases here and the worker registry count in (workers' clocks may differ)."""
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def owner_key(owner: str) -> str:
    return f"dlora:live:owner:{owner}"


@dataclass(frozen=True)
class Slot:
    """One stream's hold on its session's slot."""

    session_id: str
    owner: str  # the device token's name; "" under --auth none
    nonce: str  # tells this stream from a newer one of the same session


class SessionSlots:
    """The live-session counts of every worker on one Redis, and this worker's heartbeat.

    Raises (acquire, release):
        LimitError: over --max-sessions or --max-sessions-per-token (acquire).
        UnavailableError: Redis failed.
    """

    def __init__(self, client: redis.Redis, max_sessions: int, max_per_owner: int, lease_s: float = LEASE_S) -> None:
        self.r, self.max_sessions, self.max_per_owner = client, max_sessions, max_per_owner
        self.lease_ms = max(1, int(lease_s * 1000))
        self._acquire, self._renew, self._release, self._fence = (client.register_script(s) for s in
                                                                  (_ACQUIRE, _RENEW, _RELEASE, _FENCE))
        self._held: set[Slot] = set()  # this worker's streams, renewed by the heartbeat
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="dlora-slots")
        self._beat.start()

    def acquire(self, session_id: str, owner: str) -> Slot:
        """Count this stream's session as live, or refuse it over a limit (before anything else is written).

        Raises:
            LimitError: --max-sessions live sessions on all workers, or --max-sessions-per-token of this token.
            UnavailableError: Redis failed.
        """
        slot = Slot(session_id, owner, secrets.token_hex(8))
        try:
            got = int(self._acquire(keys=[LIVE, HOLDERS, owner_key(owner)],
                                    args=[session_id, owner, slot.nonce, self.lease_ms, self.max_sessions,
                                          self.max_per_owner]))
        except redis.RedisError as e:
            raise UnavailableError(f"the cloud's Redis failed counting sessions ({type(e).__name__}); retry") from e
        if got == -1:
            raise LimitError(f"this cloud already serves {self.max_sessions} sessions (--max-sessions); "
                             "retry later or use another cloud")
        if got == -2:
            raise LimitError(f"device token {owner!r} already holds {self.max_per_owner} live sessions "
                             "(--max-sessions-per-token); end one first")
        if got == 1:
            with self._lock:
                self._held.add(slot)
        return slot

    def release(self, slot: Slot) -> None:
        """Stop counting the stream's session, unless a newer stream holds it. Never raises: a slot that
        cannot be freed now (Redis down) stops counting when its lease runs out."""
        with self._lock:
            self._held.discard(slot)
        try:
            self._release(keys=[LIVE, HOLDERS, owner_key(slot.owner)], args=[slot.session_id, slot.owner, slot.nonce])
        except redis.RedisError as e:
            log.warning("session %s: could not free its slot in Redis (%s); it expires within %.0fs",
                        slot.session_id, e, self.lease_ms / 1000)

    def check(self, slot: Slot) -> None:
        """The fence: pass only while this stream holds its session, so that of two streams of one session, on
        one worker or two, only the newer runs steps and Kill-and-Revive reports (one Redis call).

        Raises:
            SupersededError: a newer stream holds the session (ABORTED).
            UnavailableError: Redis failed.
        """
        try:
            held = int(self._fence(keys=[HOLDERS], args=[slot.session_id, slot.owner, slot.nonce]))
        except redis.RedisError as e:
            raise UnavailableError(f"the cloud's Redis failed checking session {slot.session_id} ({type(e).__name__}); "
                                   "retry") from e
        if not held:
            raise SupersededError(f"session {slot.session_id} continues on a newer stream (this worker or another); "
                                  "this one ends")

    def live(self, owner: str | None = None) -> int:
        """Live sessions on all workers (of one token when owner is given), expired leases not counted.

        Raises:
            redis.RedisError: Redis failed.
        """
        now = redis_now_ms(self.r)
        return int(self.r.zcount(LIVE if owner is None else owner_key(owner), f"({now}", "+inf"))

    def stop(self) -> None:
        """End the heartbeat; the leases of streams still open run out on their own."""
        self._stop.set()
        self._beat.join(timeout=5)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.lease_ms / 3000):
            with self._lock:
                held = list(self._held)
            for slot in held:
                try:
                    kept = int(self._renew(keys=[LIVE, HOLDERS, owner_key(slot.owner)],
                                           args=[slot.session_id, slot.owner, slot.nonce, self.lease_ms]))
                except redis.RedisError as e:  # the next beat tries again; the lease covers two misses
                    log.warning("could not renew the live sessions' leases in Redis: %s", e)
                    break
                if not kept:
                    with self._lock:
                        self._held.discard(slot)


class Gate:
    """A count of things this process holds at once (streams waiting for their Hello, live session
    streams), with a cap; `enter` never blocks: over the cap it says no, and the caller refuses at once."""

    def __init__(self, cap: int) -> None:
        self.cap, self.count = cap, 0
        self._lock = threading.Lock()

    def enter(self) -> bool:
        with self._lock:
            if self.count >= self.cap:
                return False
            self.count += 1
            return True

    def leave(self) -> None:
        with self._lock:
            self.count -= 1
