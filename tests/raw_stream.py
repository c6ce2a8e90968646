"""Tools for the tests that send what a correct device (or cloud) never would: a session stream driven by
hand with raw bytes, a real cloud on a Redis of the test's own, and this process's resident memory."""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc

from common.model_files import fingerprint
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.protocol import PROTOCOL, SESSION_METHOD, channel_options

# what a cloud may answer to anything a device sends: never INTERNAL or UNKNOWN
REFUSALS = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED"}
RSS_LIMIT_MB = 50  # the most a bomb may grow a cloud's peak memory: far below what any of them claims


def rss_mb(pid: int | str = "self", peak: bool = False) -> float:
    """Resident memory of a process (this one by default) in MB: now (VmRSS), or its peak since the last
    `reset_peak` (VmHWM), which also catches an allocation that was freed again."""
    key = "VmHWM:" if peak else "VmRSS:"
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def reset_peak(pid: int | str = "self") -> None:
    """Start a process's VmHWM over from its current RSS (Linux: 5 into /proc/PID/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@contextmanager
def peak_rss_growth_under_limit() -> Iterator[None]:
    """The block's peak RSS growth in this process (an in-process cloud's), printed and held under RSS_LIMIT_MB."""
    gc.collect()
    reset_peak()
    before = rss_mb()
    yield
    grown = rss_mb(peak=True) - before
    print(f"\npeak RSS +{grown:.1f} MB")
    assert grown < RSS_LIMIT_MB


def hello(model_dir: Path, **over: object) -> pb.Hello:
    """A Hello a correct device would send for the tiny llama (targets q and v), with `over` replacing fields."""
    fields: dict[str, object] = dict(protocol=PROTOCOL, model_fingerprint=fingerprint(model_dir),
                                     targets=["self_attn.q_proj", "self_attn.v_proj"], codec_up=pb.FLOAT32,
                                     codec_down=pb.FLOAT32)
    fields.update(over)
    return pb.Hello(**fields)  # type: ignore[arg-type]


def adapter_hello(model_dir: Path, **over: object) -> pb.Hello:
    """`hello` for the adapter protocol: rank 4, alpha 8, dropout 0.1, seed 3, float32 weights; `over` replaces fields."""
    fields: dict[str, object] = dict(step_protocol=pb.ADAPTER, lora_rank=4, lora_alpha=8.0, lora_dropout=0.1,
                                     dropout_seed=3, codec_weights=pb.FLOAT32)
    fields.update(over)
    return hello(model_dir, **fields)


@dataclass
class Ending:
    """How a stream ended: every message the cloud sent, and the call's status."""

    replies: list[pb.CloudMessage]
    code: grpc.StatusCode
    details: str
    seconds: float  # from the call's start


class RawStream:
    """A session stream sending raw bytes (or messages), reading the cloud's replies as CloudMessages."""

    def __init__(self, channel: grpc.Channel, timeout_s: float = 60.0,
                 metadata: tuple[tuple[str, str], ...] | None = None) -> None:
        self._q: queue.Queue[bytes | None] = queue.Queue()
        call = channel.stream_stream(SESSION_METHOD, request_serializer=lambda b: b,
                                     response_deserializer=pb.CloudMessage.FromString)
        self.started = time.monotonic()
        self.call = call(iter(self._q.get, None), timeout=timeout_s, metadata=metadata)
        self._replies: Iterator[pb.CloudMessage] = iter(self.call)

    def send(self, msg: bytes | pb.EdgeMessage | None = None, **kind: object) -> None:
        """Send raw bytes, an EdgeMessage, or EdgeMessage(**kind)."""
        if msg is None:
            msg = pb.EdgeMessage(**kind)  # type: ignore[arg-type]
        self._q.put(msg if isinstance(msg, bytes) else msg.SerializeToString())

    def recv(self) -> pb.CloudMessage:
        """The cloud's next message.

        Raises:
            grpc.RpcError: the call ended with a status other than OK.
            StopIteration: the call ended with OK.
        """
        return next(self._replies)

    def finish(self) -> Ending:
        """Half-close, then read until the call ends (within its deadline)."""
        self._q.put(None)
        return self.drain()

    def drain(self) -> Ending:
        """Read until the call ends (within its deadline), without half-closing."""
        replies = []
        try:
            for reply in self._replies:
                replies.append(reply)
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as e:
            code, details = e.code(), e.details() or ""
        return Ending(replies, code, details, time.monotonic() - self.started)

    def cancel(self) -> None:
        self._q.put(None)
        self.call.cancel()


def raw_channel(address: str, max_message_mb: int = 64) -> grpc.Channel:
    return grpc.insecure_channel(address, options=channel_options(max_message_mb))


def start_cloud(model_dir: Path, redis_url: str, **kw: object):  # -> CloudServer
    """A real dlora cloud on 127.0.0.1:0 in this process, on the given Redis. Stop it with .stop(0)."""
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig

    return CloudServer(DecoderStack(model_dir), ServeConfig(model=model_dir, redis_url=redis_url, **kw))


def wait_until(predicate, timeout_s: float, what: str) -> None:
    """Poll `predicate` until true; fail after timeout_s (never a bare sleep)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        threading.Event().wait(0.02)
