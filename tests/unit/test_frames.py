"""common.wire.frames: the tensor bytes travel outside the message yet the wire is valid protobuf.

Decoded tensors are compared with torch.equal: both sides decode the very same bytes with the same
codec, which is deterministic to the bit on any CPU.
"""

from __future__ import annotations

import pytest
import torch

from common.errors import ProtocolError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs, frames
from common.wire.frames import Frame


def _step_begin() -> tuple[Frame, pb.EdgeMessage, torch.Tensor]:
    emb = torch.randn(3, 5, 7)
    mask = torch.ones(3, 5, dtype=torch.uint8)
    msg = pb.EdgeMessage(step_begin=pb.StepBegin(step=4, micro_batch=1, train=True, layer_roles=[2, 1, 0]))
    payloads = {"embeddings": codecs.encode_into(msg.step_begin.embeddings, emb, "float32"),
                "attention_mask": codecs.encode_into(msg.step_begin.attention_mask, mask, "uint8")}
    inline = pb.EdgeMessage(step_begin=pb.StepBegin(step=4, micro_batch=1, train=True, layer_roles=[2, 1, 0],
                                                    embeddings=codecs.encode(emb, "float32"),
                                                    attention_mask=codecs.encode(mask, "uint8")))
    return Frame(msg, payloads), inline, emb


def test_a_frame_is_valid_protobuf_of_the_whole_message():
    frame, inline, _ = _step_begin()
    raw = frames.serialize(frame)
    assert pb.EdgeMessage.FromString(raw) == inline  # any protobuf library reads it
    assert len(raw) == len(inline.SerializeToString()) + 2 * 4  # two extra (tag, length) pairs, two levels each


@pytest.mark.parametrize("codec", ["float32", "bfloat16", "int8"])
def test_parse_takes_payloads_in_place_and_decodes(codec):
    x = torch.randn(4, 6, 10)
    msg = pb.CloudMessage(lora_forward=pb.LoraForward(step=2, layer=1, group=0))
    frame = Frame(msg, {"x": codecs.encode_into(msg.lora_forward.x, x, codec, 16)})
    raw = frames.serialize(frame)
    back = frames.parse(raw, pb.CloudMessage)
    assert back.kind == "lora_forward" and back.body.layer == 1 and back.body.x.data == b""
    view = back.payloads["x"]
    assert isinstance(view, memoryview) and view.obj is raw  # no copy of the tensor bytes
    y = codecs.decode(back.body.x, "x", (4, 6, 10), codec, payload=view)
    assert torch.equal(y, codecs.decode(codecs.encode(x, codec, 16), "x", (4, 6, 10), codec))


def test_parse_accepts_inline_data_from_other_senders():
    frame, inline, emb = _step_begin()
    back = frames.parse(inline.SerializeToString(), pb.EdgeMessage)
    assert back.payloads == {}
    assert torch.equal(codecs.decode(back.body.embeddings, "e", (3, 5, 7), "float32"), emb)


def test_small_messages_have_no_payloads():
    msg = pb.CloudMessage(step_done=pb.StepDone(step=1))
    assert frames.serialize(Frame(msg)) == msg.SerializeToString()
    assert frames.parse(msg.SerializeToString(), pb.CloudMessage).msg == msg


@pytest.mark.parametrize("cut", [1, 7, 20])
def test_truncated_or_foreign_trailers_are_protocol_errors(cut):
    frame, _, _ = _step_begin()
    raw = frames.serialize(frame)
    with pytest.raises(ProtocolError):
        frames.parse(raw[:-cut], pb.EdgeMessage)
    with pytest.raises(ProtocolError):
        frames.parse(raw + b"\x08\x01", pb.EdgeMessage)  # a varint field after the payloads
