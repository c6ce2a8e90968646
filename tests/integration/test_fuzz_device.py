"""Malformed CloudMessages against a real device (docs/security.md): a hostile or broken cloud.

A real gRPC server in this test speaks the session protocol's bytes: it answers each stream's Hello with
a Hypothesis-written script (tests/wire_strategies.py: Welcomes with the wrong layer count or session id,
LoraForward / Hidden / LoraBackward with the wrong shape, codec, int8 block size or scales, huge and
negative dimensions, steps and layers the device never ran, StepErrors with any code and multi-line or
huge messages, KRCommands naming layers that do not exist, cut or flipped messages, random bytes) and
ends the stream with any status. The device is the real CloudLink and RemoteStep, training one step
(and reporting an epoch when the script gets that far): it may finish, or raise ProtocolError or
RemoteError with a one-line message; never another error, never a hang (each script is bounded by the
link's deadlines), and no script takes its peak memory (VmHWM) 50 MB above where that script started.
(The device runs in this process beside Hypothesis, whose own memory grows with the examples it has tried,
~25 MB a thousand: so each script is measured on its own, and replaying 300 of them must grow RSS < 5 MB.)
The bombs run on their own.

The default run tries 300 scripts (profile "fuzz", ~20 s on 2 cores); `pytest -m slow` 3000.
"""

from __future__ import annotations

import gc
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from hypothesis import given, settings
from raw_stream import reset_peak, rss_mb
from wire_strategies import cloud_scripts, good_exchange, welcome

from common.errors import ProtocolError, RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs, frames
from common.wire.protocol import SERVICE, channel_options

H, L, WIDTH = 32, 2, 48  # the tiny llama's hidden size, layers, and q + v output width
B, T = 1, 4  # the micro-batch the device sends
RSS_LIMIT_MB = 50


class FakeCloud:
    """A gRPC server on 127.0.0.1:0 that answers every session stream's Hello with `script` (raw bytes),
    then ends the stream with `end` (None: OK, else (status code name, details)). Health answers SERVING."""

    def __init__(self) -> None:
        self.script: list[bytes] = []
        self.end: tuple[str, str] | None = None
        self.server = grpc.server(ThreadPoolExecutor(max_workers=8), options=channel_options(64))
        self.server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, {
            "Session": grpc.stream_stream_rpc_method_handler(self._session),  # bytes in, bytes out
            "Health": grpc.unary_unary_rpc_method_handler(
                lambda request, context: pb.HealthReply(status="SERVING").SerializeToString()),
        })])
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def _session(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        script, end = self.script, self.end
        next(requests, None)  # the device's Hello

        def drain() -> None:
            try:
                for _ in requests:
                    pass
            except grpc.RpcError:
                pass

        threading.Thread(target=drain, daemon=True).start()
        yield from script
        if end is not None:
            context.abort(grpc.StatusCode[end[0]], end[1])


@pytest.fixture(scope="module")
def device(tiny_dir):
    """(EdgeModel, LoraAdapter, FakeCloud): the device's parts, loaded once, and the cloud it talks to."""
    from edge_client.train.lora import LoraAdapter
    from edge_client.train.model_parts import EdgeModel

    edge = EdgeModel(tiny_dir("llama", layers=L), ("q_proj", "v_proj"))
    cloud = FakeCloud()
    yield edge, LoraAdapter(edge, 4, 8.0, 0.0), cloud
    cloud.server.stop(0)


def _step(device, codec_down: str = "float32") -> str:
    """One training step (and an epoch report) of a real device against the fake cloud's current script.

    Returns "ok", or the error's class and code; raises anything but ProtocolError and RemoteError, and
    fails on a message of more than one line."""
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import MicroBatch, RemoteStep

    edge, lora, cloud = device
    link = CloudLink(LinkConfig(address=f"127.0.0.1:{cloud.port}", codec_up="float32", codec_down=codec_down,
                                connect_timeout_s=10, reply_timeout_s=5), edge)
    lora.zero_grad(set_to_none=True)
    try:
        link.open()
        emb = torch.randn(B, T, H)
        RemoteStep(link, lora, step=0, roles=[pb.FORWARD_BACKWARD] * L, train=True,
                   head=lambda mb, h: torch.ones_like(h) / h.numel()).run([MicroBatch(emb, torch.ones(B, T))])
        link.report_epoch(1, {0: 0.5, 1: 0.25})
        return "ok"
    except (ProtocolError, RemoteError) as e:
        assert "\n" not in str(e) and len(str(e)) < 2000, str(e)
        return f"{type(e).__name__} {getattr(e, 'code', '')}".strip()
    finally:
        link.close(drain_s=0.5)


def _fuzz(device, profile: str) -> None:
    _, _, cloud = device
    cloud.script, cloud.end = good_exchange(B, T, H, WIDTH, L), None
    assert _step(device) == "ok"  # a whole step and epoch report: warm, and the fake cloud speaks correctly
    gc.collect()
    before = rss_mb()
    outcomes: Counter[str] = Counter()
    slowest = worst = 0.0
    tried: list[tuple[list[bytes], tuple[str, str] | None]] = []  # the first 300, replayed below

    @settings(settings.get_profile(profile))
    @given(script=cloud_scripts(B, T, H, WIDTH, L))
    def one(script: tuple[list[bytes], tuple[str, str] | None]) -> None:
        nonlocal slowest, worst
        if len(tried) < 300:
            tried.append(script)
        cloud.script, cloud.end = script
        reset_peak()
        started, at_start = time.monotonic(), rss_mb()
        outcomes[_step(device)] += 1
        slowest = max(slowest, time.monotonic() - started)
        worst = max(worst, rss_mb(peak=True) - at_start)

    one()
    print(f"\ndevice fuzz ({profile}): {sum(outcomes.values())} scripts; {dict(outcomes)}; slowest {slowest:.1f}s; "
          f"RSS {before:.0f} MB, +{rss_mb() - before:.1f} MB after all; one script's peak at most +{worst:.1f} MB")
    assert sum(outcomes.values()) >= settings.get_profile(profile).max_examples
    assert slowest < 15  # bounded by the link's deadlines: connect 10 s is never reached, a reply 5 s
    assert worst < RSS_LIMIT_MB
    gc.collect()
    replay_from = rss_mb()
    for script in tried:  # the device keeps nothing of a script: the same scripts again grow nothing
        cloud.script, cloud.end = script
        _step(device)
    gc.collect()
    print(f"replaying {len(tried)} scripts: RSS +{rss_mb() - replay_from:.1f} MB")
    assert rss_mb() - replay_from < 5


def test_malformed_cloud_messages_end_in_one_line_errors(device):
    """300 Hypothesis scripts of a hostile cloud: the device finishes its step or raises ProtocolError or
    RemoteError in one line (never another exception, never a hang); no script raises its peak RSS 50 MB."""
    _fuzz(device, "fuzz")


@pytest.mark.slow
def test_malformed_cloud_messages_end_in_one_line_errors_long(device):
    """The same with 3000 scripts (profile fuzz-slow)."""
    _fuzz(device, "fuzz-slow")


def _bomb(tensor_field: str, tensor: pb.Tensor, data: bytes, layer_call: bool) -> bytes:
    msg = pb.CloudMessage()
    body = msg.lora_forward if layer_call else msg.hidden
    if layer_call:
        body.layer = 0
    getattr(body, tensor_field).CopyFrom(tensor)
    return frames.serialize(frames.Frame(msg, {tensor_field: data}))


def _int8_bomb() -> tuple[pb.Tensor, bytes]:
    t = codecs.encode(torch.randn(B, T, H), "int8")
    data, t.data = t.data, b""
    t.block_size = 2**32 - 1  # one block: 4 bytes of scales for 2**32 - 1 elements of padding
    return t, data


@pytest.mark.parametrize("name,codec_down,field,layer_call,make", [
    ("int8 block size 2**32-1 in LoraForward", "int8", "x", True, _int8_bomb),
    ("int8 block size 2**32-1 in Hidden", "int8", "hidden", False, _int8_bomb),
    ("2**62 tokens in LoraForward", "float32", "x", True,
     lambda: (pb.Tensor(shape=[2**31, 2**31, H], codec=pb.FLOAT32), bytes(128))),
    ("width 2**40 in Hidden", "float32", "hidden", False,
     lambda: (pb.Tensor(shape=[B, T, 2**40], codec=pb.FLOAT32), bytes(128))),
], ids=["int8-forward", "int8-hidden", "tokens-forward", "width-hidden"])
def test_bombs_from_the_cloud_are_refused_without_allocating(name, codec_down, field, layer_call, make, device):
    """A cloud that states a size its bytes do not hold (the int8 block-size bomb of the issue, whose 4 bytes
    of scales would make a padding decoder allocate 17 GB, and shape bombs): the device raises a one-line
    ProtocolError naming the problem, and its peak RSS grows < 50 MB."""
    _, _, cloud = device
    tensor, data = make()
    cloud.script, cloud.end = [welcome(L).SerializeToString(), _bomb(field, tensor, data, layer_call)], None
    gc.collect()
    reset_peak()
    before = rss_mb()
    assert _step(device, codec_down) == "ProtocolError"
    grown = rss_mb(peak=True) - before
    print(f"\n{name}: peak RSS +{grown:.1f} MB")
    assert grown < RSS_LIMIT_MB
