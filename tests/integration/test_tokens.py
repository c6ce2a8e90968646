"""Device tokens and session ownership against a real cloud (`--auth token`) and a real Redis: who may
open, resume, take over and keep a session, and the `dlora-cloud token` commands."""

from __future__ import annotations

import json
import logging
import queue
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import redis
import torch

from cloud_server.cli import main as cloud_main
from cloud_server.server import CloudServer
from cloud_server.stack import DecoderStack
from cloud_server.tokens import TokenStore, auth_mode
from common.config import ServeConfig
from common.errors import ConfigError
from common.model_files import fingerprint
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.wire import codecs

H, L = 32, 3  # the tiny LLaMA's hidden size and layers


@dataclass
class TokenCloud:
    server: CloudServer
    address: str
    model_dir: Path
    tokens: TokenStore
    r: redis.Redis
    forwards: list[int]  # one entry per forward pass of the frozen stack: the compute a refusal must not reach


@pytest.fixture
def token_cloud(tiny_dir, redis_url) -> Iterator[TokenCloud]:
    """A cloud with --auth token on 127.0.0.1:0, its token store, and a count of the stack's forward passes."""
    model_dir = tiny_dir("llama")
    server = CloudServer(DecoderStack(model_dir), ServeConfig(model=model_dir, redis_url=redis_url, auth="token"))
    forwards: list[int] = []
    server.servicer.stack.model.register_forward_pre_hook(lambda *_: forwards.append(1))
    r = redis.Redis.from_url(redis_url)
    yield TokenCloud(server, f"127.0.0.1:{server.port}", model_dir, TokenStore(r), r, forwards)
    server.stop(0)


class RawSession:
    """A hand-driven session stream with the given token (None: no authorization metadata)."""

    def __init__(self, address: str, token: str | None) -> None:
        self.q: queue.Queue = queue.Queue()
        self.channel = grpc.insecure_channel(address)
        metadata = [("authorization", f"Bearer {token}")] if token else None
        self.replies = pb_grpc.SplitTrainingStub(self.channel).Session(iter(self.q.get, None), timeout=60,
                                                                       metadata=metadata)

    def send(self, **kind) -> None:
        self.q.put(pb.EdgeMessage(**kind))

    def recv(self) -> pb.CloudMessage:
        return next(self.replies)

    def open(self, model_dir: Path, session_id: str = "") -> str:
        self.send(hello=hello(model_dir, session_id))
        return self.recv().welcome.session_id

    def step(self, n: int) -> None:
        """A forward step with every LoRA group absent: Hidden, then StepDone."""
        self.send(step_begin=begin(n))
        assert self.recv().WhichOneof("kind") == "hidden"
        assert self.recv().WhichOneof("kind") == "step_done"

    def close(self) -> None:
        self.q.put(None)
        self.channel.close()


def hello(model_dir: Path, session_id: str = "") -> pb.Hello:
    return pb.Hello(protocol="dlora.v1", model_fingerprint=fingerprint(model_dir), session_id=session_id,
                    targets=["self_attn.q_proj"], codec_up=pb.FLOAT32, codec_down=pb.FLOAT32)


def begin(step: int) -> pb.StepBegin:
    return pb.StepBegin(step=step, layer_roles=[pb.ABSENT] * L,
                        embeddings=codecs.encode(torch.randn(1, 3, H), "float32"),
                        attention_mask=codecs.encode(torch.ones(1, 3), "uint8"))


def snapshot(r: redis.Redis) -> dict[bytes, object]:
    """Every key of the Redis server and its whole value; TTLs and sorted-set scores aside (a live session's
    lease is renewed in the background, which no refusal causes)."""
    read: dict[str, Callable[[bytes], object]] = {
        "string": r.get, "hash": r.hgetall, "list": lambda k: r.lrange(k, 0, -1), "set": r.smembers,
        "zset": lambda k: r.zrange(k, 0, -1), "stream": r.xrange, "none": lambda k: None}
    found = {k: read[r.type(k).decode()](k) for k in r.scan_iter(count=1000)}
    return {k: v for k, v in found.items() if v is not None}  # "none": gone between SCAN and TYPE


def refused(s: RawSession) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        s.recv()
    s.close()
    return err.value


@pytest.mark.parametrize("who", ["missing", "wrong", "revoked", "another's session"])
def test_refusals_compute_nothing_and_write_nothing(who, token_cloud):
    """No token, a wrong one and a revoked one are UNAUTHENTICATED; a valid token resuming another token's
    session is PERMISSION_DENIED. Each sends a Hello and a StepBegin at once, yet the stack never runs a
    forward pass, Redis holds exactly the keys and values it held before, and the owner's stream goes on."""
    c = token_cloud
    owner = None
    if who == "missing":
        token, session_id = None, ""
    elif who == "wrong":
        token, session_id = "dlora_" + "x" * 43, ""
    elif who == "revoked":
        token, session_id = c.tokens.add("gone"), ""
        c.tokens.revoke("gone")
    else:
        owner = RawSession(c.address, c.tokens.add("alice"))
        session_id = owner.open(c.model_dir)
        token = c.tokens.add("mallory")
    before = snapshot(c.r)
    s = RawSession(c.address, token)
    s.send(hello=hello(c.model_dir, session_id))
    s.send(step_begin=begin(0))
    err = refused(s)
    if owner is None:
        assert err.code() == grpc.StatusCode.UNAUTHENTICATED
        assert ("needs a device token" if who == "missing" else "wrong or revoked") in err.details()
    else:
        assert err.code() == grpc.StatusCode.PERMISSION_DENIED and "another device token" in err.details()
    assert c.forwards == [] and snapshot(c.r) == before
    if owner is not None:
        owner.step(0)  # not superseded: the refused stream never took the session
        owner.close()


def test_health_needs_no_token(token_cloud, capsys):
    """`dlora-cloud health` (no token) is answered by a cloud that requires tokens for sessions."""
    assert cloud_main(["health", "--address", token_cloud.address]) == 0
    assert capsys.readouterr().out.startswith("SERVING llama")


def test_a_token_trains_and_owns_its_session(token_cloud, tmp_path, data_file, capsys, caplog):
    """`dlora train --token-file` trains through the cloud, and the session record names the token, while
    neither Redis nor any log line (DEBUG included, both sides) holds the secret; the same command without
    a token fails in one line saying how to pass one (exit 3, the cloud refused)."""
    from edge_client.app.cli import main as dlora_main

    c = token_cloud
    caplog.set_level(logging.DEBUG)
    token_file = tmp_path / "device.token"
    secret = c.tokens.add("jetson-1")
    token_file.write_text(secret + "\n")
    token_file.chmod(0o600)
    argv = ["train", "--cloud", c.address, "--model", str(c.model_dir), "--data", str(data_file), "--epochs", "1",
            "--no-progress", "--connect-timeout", "5"]
    assert dlora_main([*argv, "--output", str(tmp_path / "a"), "--token-file", str(token_file)]) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    owned = [k.decode().removeprefix("dlora:session:") for k in c.r.scan_iter("dlora:session:*")
             if c.r.hget(k, "owner") == b"jetson-1"]
    assert len(owned) == 1 and re.fullmatch("[0-9a-f]{32}", owned[0])
    assert secret not in repr(snapshot(c.r)) and secret not in caplog.text
    assert dlora_main([*argv, "--output", str(tmp_path / "b")]) == 3
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlora")]
    assert len(err) == 1 and "needs a device token" in err[0] and "--token-file" in err[0], err


def test_eval_takes_the_token_from_the_environment(token_cloud, tmp_path, monkeypatch, capsys):
    """`dlora eval` with $DLORA_TOKEN set (and no --token-file) scores through a --auth token cloud."""
    from edge_client.app.cli import main as dlora_main

    c = token_cloud
    items = tmp_path / "mc.jsonl"
    rows = [{"prompt": f"{i} plus {i} is", "choices": [f" {2 * i}", f" {i}"], "answer": 0} for i in range(3)]
    items.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    monkeypatch.setenv("DLORA_TOKEN", c.tokens.add("scorer"))
    assert dlora_main(["eval", "--cloud", c.address, "--model", str(c.model_dir), "--data", str(items),
                       "--no-progress"]) == 0
    assert "mc" in capsys.readouterr().out


def test_a_daemon_session_reads_the_token_file_it_was_given(token_cloud, tmp_path, data_file, monkeypatch):
    """A detached session's request holds the token file's path, never the token; the session process
    (session_runner.run, what the daemon starts) reads the file and trains through a --auth token cloud."""
    import signal

    from common.config import TrainConfig
    from edge_client.app.session_runner import read_status, run

    c = token_cloud
    monkeypatch.delenv("DLORA_TOKEN", raising=False)
    token_file = tmp_path / "device.token"
    secret = c.tokens.add("daemon-box")
    token_file.write_text(secret)
    token_file.chmod(0o600)
    cfg = TrainConfig(model=c.model_dir, data=data_file, output=tmp_path / "out", cloud=c.address, epochs=1,
                      progress=False, token_file=token_file)
    session_dir = tmp_path / "session"
    session_dir.mkdir()
    request = {"kind": "train", "config": json.loads(cfg.model_dump_json())}  # as the daemon writes it
    (session_dir / "request.json").write_text(json.dumps(request))
    assert secret not in (session_dir / "request.json").read_text()
    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        assert run(session_dir) == 0, read_status(session_dir)
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert read_status(session_dir)["state"] == "done"


@pytest.mark.parametrize("env,flag,words", [
    ("dlora_from_env", None, "does not see this shell's $DLORA_TOKEN; pass --token-file"),
    (None, "missing.token", "--token-file"),
])
def test_detach_refuses_a_token_the_daemon_cannot_read(env, flag, words, tiny_dir, tmp_path, data_file, monkeypatch,
                                                       capsys):
    """`dlora train --detach` with only $DLORA_TOKEN (the daemon has its own environment) or an unreadable
    --token-file fails in one line (exit 2) before it contacts any daemon."""
    from edge_client.app.cli import main as dlora_main

    if env:
        monkeypatch.setenv("DLORA_TOKEN", env)
    else:
        monkeypatch.delenv("DLORA_TOKEN", raising=False)
    argv = ["--daemon", f"unix:{tmp_path / 'no-daemon.sock'}", "train", "--cloud", "127.0.0.1:1",
            "--model", str(tiny_dir("llama")), "--data", str(data_file), "--output", str(tmp_path / "o"), "--detach"]
    assert dlora_main([*argv, *(["--token-file", str(tmp_path / flag)] if flag else [])]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dlora")]
    assert len(err) == 1 and words in err[0], err


@pytest.mark.parametrize("next_message", ["step_begin", "epoch_report"])
def test_revoking_a_token_stops_its_stream_at_the_next_step(next_message, token_cloud):
    """A stream that stepped with a token ends UNAUTHENTICATED at its first StepBegin or EpochReport after
    `token revoke`: the step computes nothing, the report reaches no scheduler stream."""
    from cloud_server.kr_queue import REPORTS

    c = token_cloud
    s = RawSession(c.address, c.tokens.add("laptop"))
    s.open(c.model_dir)
    s.step(0)
    done, reports = len(c.forwards), c.r.xlen(REPORTS)
    c.tokens.revoke("laptop")
    if next_message == "step_begin":
        s.send(step_begin=begin(1))
    else:
        s.send(epoch_report=pb.EpochReport(epoch=1, layers=[0, 1, 2], deltas=[0.1, 0.2, 0.3]))
    err = refused(s)
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED and "'laptop' was revoked" in err.details()
    assert len(c.forwards) == done and c.r.xlen(REPORTS) == reports


def test_a_new_stream_with_the_owning_token_supersedes_the_old(token_cloud):
    """The device comes back on a new stream (as after a half-open connection): the old stream ends ABORTED
    without sending anything more, and the new one continues the same session. Health counts one session."""
    c = token_cloud
    token = c.tokens.add("edge-box")
    old = RawSession(c.address, token)
    session_id = old.open(c.model_dir)
    old.step(0)
    new = RawSession(c.address, token)
    assert new.open(c.model_dir, session_id) == session_id
    err = refused(old)
    assert err.code() == grpc.StatusCode.ABORTED and "newer stream" in err.details()
    new.step(1)
    health = pb_grpc.SplitTrainingStub(grpc.insecure_channel(c.address)).Health(pb.HealthRequest(), timeout=10)
    assert health.open_sessions == 1
    new.close()


def test_session_ids_are_128_bits_and_old_ones_are_refused(token_cloud):
    """A new session's id is 32 hex digits (128 random bits); resuming an old 12-hex-digit (48-bit) id is
    refused with a one-line reason and writes nothing; an id of another shape is INVALID_ARGUMENT."""
    c = token_cloud
    token = c.tokens.add("dev")
    live = RawSession(c.address, token)  # stays open: its end would write (while the refusals must not)
    assert re.fullmatch("[0-9a-f]{32}", live.open(c.model_dir))
    before = snapshot(c.r)
    for bad, code, words in (("0123456789ab", grpc.StatusCode.FAILED_PRECONDITION, "old 48-bit id"),
                             ("../../x", grpc.StatusCode.INVALID_ARGUMENT, "32 hex digits")):
        s = RawSession(c.address, token)
        s.send(hello=hello(c.model_dir, bad))
        err = refused(s)
        assert err.code() == code and words in err.details() and "start a new session" in err.details()
        assert "\n" not in err.details()
    assert snapshot(c.r) == before
    live.close()


def test_the_token_commands_show_a_secret_once_and_store_only_its_hash(redis_url, tmp_path, capsys):
    """`dlora-cloud token add` prints a 256-bit secret once; `list` (here through --redis-url-file) shows names,
    never secrets; `revoke` removes it; a duplicate name, an unknown name and an unreachable Redis are
    one-line errors (exit 2). No key or value anywhere in Redis holds the secret."""
    r = redis.Redis.from_url(redis_url)
    rc = cloud_main(["token", "add", "phone-7", "--redis-url", redis_url])
    out = capsys.readouterr()
    secret = out.out.strip()
    assert rc == 0 and re.fullmatch(r"dlora_[A-Za-z0-9_-]{43}", secret) and "only this once" in out.err
    assert secret.encode() not in repr(snapshot(r)).encode()
    assert all(secret.encode() not in k for k in r.scan_iter(count=1000))
    url_file = tmp_path / "redis.url"  # the way for a URL with a password (not in `ps`)
    url_file.write_text(redis_url)
    assert cloud_main(["token", "list", "--redis-url-file", str(url_file)]) == 0
    listed = capsys.readouterr().out
    assert "phone-7" in listed and secret not in listed and secret[6:20] not in listed
    for argv, words in ((["add", "phone-7"], "exists"), (["revoke", "nobody"], "no token named")):
        assert cloud_main(["token", *argv, "--redis-url", redis_url]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err
    assert cloud_main(["token", "revoke", "phone-7", "--redis-url", redis_url]) == 0
    capsys.readouterr()
    assert cloud_main(["token", "list", "--redis-url", redis_url]) == 0
    assert "phone-7" not in capsys.readouterr().out
    assert cloud_main(["token", "list", "--state-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot reach" in err and "--redis-url" in err


def test_token_commands_reach_a_running_serve_through_its_state_dir(tiny_dir, tmp_path, capsys):
    """With no --redis-url, `dlora-cloud token add --state-dir` reaches the embedded Redis of the serve running
    on that state dir, and the token it prints opens a session there at once."""
    model_dir, state = tiny_dir("llama"), tmp_path / "state"
    server = CloudServer(DecoderStack(model_dir), ServeConfig(model=model_dir, state_dir=state, auth="token"))
    try:
        assert cloud_main(["token", "add", "box", "--state-dir", str(state)]) == 0
        s = RawSession(f"127.0.0.1:{server.port}", capsys.readouterr().out.strip())
        s.open(model_dir)
        s.step(0)
        s.close()
    finally:
        server.stop(0)


@pytest.mark.parametrize("host,auth,insecure,expect", [
    ("127.0.0.1", None, False, "none"), ("localhost", None, False, "none"), ("0.0.0.0", None, False, "token"),
    ("10.1.2.3", "token", False, "token"), ("127.0.0.1", "token", False, "token"),
    ("0.0.0.0", "none", True, "none"), ("0.0.0.0", "none", False, "--insecure"),
])
def test_auth_defaults_to_token_off_loopback(host, auth, insecure, expect, tmp_path):
    """--auth left unset means none on loopback and token elsewhere; none off loopback needs --insecure."""
    config = ServeConfig(model=tmp_path, host=host, auth=auth, insecure=insecure)
    if expect.startswith("--"):
        with pytest.raises(ConfigError, match="--auth none on --host 0.0.0.0 .*--insecure"):
            auth_mode(config)
    else:
        assert auth_mode(config) == expect
