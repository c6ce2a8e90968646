"""Bad input on the wire is INVALID_ARGUMENT (or FAILED_PRECONDITION at the handshake); the session survives."""

from __future__ import annotations

import queue

import grpc
import pytest
import torch

from common.model_files import fingerprint
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.wire import codecs

H = 32  # tiny model hidden size
L = 3


class RawSession:
    """A hand-driven session stream, to send what a correct edge never would."""

    def __init__(self, address: str) -> None:
        self.q: queue.Queue = queue.Queue()
        self.channel = grpc.insecure_channel(address)
        self.replies = pb_grpc.SplitTrainingStub(self.channel).Session(iter(self.q.get, None), timeout=60)

    def send(self, **kind) -> None:
        self.q.put(pb.EdgeMessage(**kind))

    def recv(self) -> pb.CloudMessage:
        return next(self.replies)

    def close(self) -> None:
        self.q.put(None)
        self.channel.close()


def hello(model_dir, **over) -> pb.Hello:
    fields = dict(protocol="dlora.v1", model_fingerprint=fingerprint(model_dir), targets=["self_attn.q_proj", "self_attn.v_proj"],
                  codec_up=pb.FLOAT32, codec_down=pb.FLOAT32)
    fields.update(over)
    return pb.Hello(**fields)


def begin(step: int, emb: torch.Tensor, roles=None, train=False, **over) -> pb.StepBegin:
    b, t = emb.shape[:2]
    fields = dict(step=step, train=train, layer_roles=roles or [pb.ABSENT] * L, embeddings=codecs.encode(emb, "float32"),
                  attention_mask=codecs.encode(torch.ones(b, t), "uint8"))
    fields.update(over)
    return pb.StepBegin(**fields)


@pytest.mark.parametrize("over,code,words", [
    ({"model_fingerprint": "0123456789abcdef"}, grpc.StatusCode.FAILED_PRECONDITION, "base model mismatch"),
    ({"protocol": "dlora.v0"}, grpc.StatusCode.FAILED_PRECONDITION, "protocol"),
    ({"targets": ["self_attn.nope"]}, grpc.StatusCode.INVALID_ARGUMENT, "targets"),
])
def test_handshake_refusals(over, code, words, tiny_dir, cloud):
    model_dir = tiny_dir("llama")
    s = RawSession(cloud(model_dir))
    s.send(hello=hello(model_dir, **over))
    with pytest.raises(grpc.RpcError) as err:
        s.recv()
    assert err.value.code() == code and words in err.value.details()
    s.close()


def test_first_message_must_be_hello(tiny_dir, cloud):
    model_dir = tiny_dir("llama")
    s = RawSession(cloud(model_dir))
    s.send(step_begin=begin(0, torch.zeros(1, 2, H)))
    with pytest.raises(grpc.RpcError) as err:
        s.recv()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    s.close()


def _corrupt_length(step: int) -> pb.StepBegin:
    m = begin(step, torch.zeros(2, 3, H))
    m.embeddings.data = m.embeddings.data[:-4]
    return m


BAD_BEGINS = {
    "width": lambda s: begin(s, torch.zeros(2, 3, H + 1)),
    "nan": lambda s: begin(s, torch.zeros(2, 3, H), embeddings=pb.Tensor(
        data=torch.full((2, 3, H), float("nan")).numpy().tobytes(), shape=[2, 3, H], codec=pb.FLOAT32)),
    "byte_length": _corrupt_length,
    "codec": lambda s: begin(s, torch.zeros(2, 3, H), embeddings=codecs.encode(torch.zeros(2, 3, H), "bfloat16")),
    "roles": lambda s: begin(s, torch.zeros(2, 3, H), roles=[pb.ABSENT] * (L + 1)),
    "mask": lambda s: begin(s, torch.zeros(2, 3, H), attention_mask=codecs.encode(torch.full((2, 3), 2), "uint8")),
    "positions": lambda s: begin(s, torch.zeros(1, 500, H)),
}


def test_bad_tensors_abandon_the_step_not_the_session(tiny_dir, cloud):
    model_dir = tiny_dir("llama")
    s = RawSession(cloud(model_dir))
    s.send(hello=hello(model_dir))
    assert s.recv().WhichOneof("kind") == "welcome"
    step = 0
    for name, make in BAD_BEGINS.items():
        s.send(step_begin=make(step))
        reply = s.recv()
        assert reply.WhichOneof("kind") == "step_error", name
        assert reply.step_error.code == "INVALID_ARGUMENT" and reply.step_error.step == step, name
        step += 1
    # a bad reply in the middle of a step: NaN delta, then a wrong-shaped delta
    for bad in (torch.full((2, 3, H + H // 2), float("nan")), torch.zeros(2, 3, 7)):  # q (32) + v (16) wide
        s.send(step_begin=begin(step, torch.randn(2, 3, H), roles=[pb.FORWARD] * L))
        fwd = s.recv()
        assert fwd.WhichOneof("kind") == "lora_forward" and fwd.lora_forward.layer == 0
        s.send(lora_delta=pb.LoraDelta(step=step, layer=0, group=0, delta=pb.Tensor(
            data=bad.numpy().tobytes(), shape=list(bad.shape), codec=pb.FLOAT32)))
        reply = s.recv()
        assert reply.WhichOneof("kind") == "step_error" and reply.step_error.code == "INVALID_ARGUMENT"
        step += 1
    # the session is unharmed: a good step still works
    s.send(step_begin=begin(step, torch.randn(2, 3, H)))
    hidden = s.recv()
    assert hidden.WhichOneof("kind") == "hidden" and tuple(hidden.hidden.hidden.shape) == (2, 3, H)
    assert s.recv().WhichOneof("kind") == "step_done"
    s.close()


@pytest.mark.parametrize("edge_mb,cloud_mb,side", [(4, 512, "Sent"), (512, 4, "Received")])
def test_a_message_over_the_size_limit_says_which_flag_to_raise(edge_mb, cloud_mb, side, tiny_dir, cloud):
    from common.errors import RemoteError
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import RemoteStack
    from edge_client.train.model_parts import EdgeModel

    model_dir = tiny_dir("llama")
    edge = EdgeModel(model_dir, ("q_proj", "v_proj"))
    link = CloudLink(LinkConfig(address=cloud(model_dir, max_message_mb=cloud_mb), codec_up="float32",
                                codec_down="float32", max_message_mb=edge_mb), edge)
    link.open()
    big = torch.randn(300, 128, H)  # 4.9 MB of float32 embeddings
    with pytest.raises(RemoteError, match=f"{side} message larger than max.*raise --max-message-mb") as e:
        RemoteStack(link).forward(big, torch.ones(300, 128), [pb.ABSENT] * L)
    assert e.value.code == "RESOURCE_EXHAUSTED"
    link.close()


def test_health(tiny_dir, cloud):
    model_dir = tiny_dir("gpt2")
    channel = grpc.insecure_channel(cloud(model_dir))
    reply = pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=10)
    assert reply.status == "SERVING" and reply.model_type == "gpt2" and reply.model_fingerprint == fingerprint(model_dir)
    channel.close()
