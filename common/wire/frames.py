"""Session messages on the wire with their tensor bytes copied once on send and never on receipt.

A `Frame` is a session message whose tensors carry shape and codec but no `data`, plus the tensor
bytes (`payloads`, by tensor field name). `serialize` writes the message and then, for each tensor,
one more occurrence of the message's oneof field holding just that tensor's `data`. Protobuf merges
repeated occurrences of a message field, so the result is an ordinary, valid serialization of the
whole message: any protobuf library parses it (a test checks). The bytes are joined in a single
copy. `parse` reads the first occurrence as the message (small) and takes each later occurrence's
data as a memoryview into the received buffer, which torch.frombuffer then uses in place.

Messages that arrive with `data` inline (another sender) still parse: their payloads are just absent
and decode reads `data` from the message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from common.errors import ProtocolError
from common.pb.dlora.v1 import dlora_pb2 as pb

M = TypeVar("M", pb.EdgeMessage, pb.CloudMessage)
_LEN = 2  # protobuf wire type of length-delimited fields


@dataclass
class Frame(Generic[M]):
    msg: M
    payloads: dict[str, bytes | memoryview] = field(default_factory=dict)  # tensor field name -> data

    @property
    def kind(self) -> str:
        return self.msg.WhichOneof("kind") or ""

    @property
    def body(self):  # type: ignore[no-untyped-def]
        return getattr(self.msg, self.kind)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_varint(buf: memoryview, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(buf):
            raise ProtocolError("truncated message (varint runs past the end)")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ProtocolError("malformed message (varint too long)")


def _len_field(buf: memoryview, pos: int) -> tuple[int, int, int]:
    """(field number, start, end) of the length-delimited field at pos."""
    tag, pos = _read_varint(buf, pos)
    if tag & 7 != _LEN:
        raise ProtocolError(f"unexpected wire type {tag & 7} in a session message")
    n, pos = _read_varint(buf, pos)
    if pos + n > len(buf):
        raise ProtocolError("truncated message (field runs past the end)")
    return tag >> 3, pos, pos + n


def serialize(frame: Frame) -> bytes:
    """The message followed by one data-only occurrence per tensor: valid protobuf, one copy."""
    head = frame.msg.SerializeToString()
    if not frame.payloads:
        return head
    kind = frame.kind
    kind_no = frame.msg.DESCRIPTOR.fields_by_name[kind].number
    sub = getattr(frame.msg, kind).DESCRIPTOR
    parts: list[bytes | memoryview] = [head]
    for name, data in frame.payloads.items():
        n = len(data)
        data_field = _varint(1 << 3 | _LEN) + _varint(n)  # Tensor.data = 1
        tensor_len = len(data_field) + n
        tensor_field = _varint(sub.fields_by_name[name].number << 3 | _LEN) + _varint(tensor_len)
        kind_len = len(tensor_field) + tensor_len
        parts += [_varint(kind_no << 3 | _LEN) + _varint(kind_len) + tensor_field + data_field, data]
    return b"".join(parts)


def parse(raw: bytes, cls: type[M]) -> Frame[M]:
    """Inverse of serialize, without copying tensor bytes.

    Raises:
        ProtocolError: the bytes are not a session message of this shape.
    """
    buf = memoryview(raw)
    if not raw:
        return Frame(cls())
    _, _, end = _len_field(buf, 0)
    try:
        msg = cls.FromString(raw[:end] if end < len(raw) else raw)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError is not exported stably
        raise ProtocolError(f"malformed {cls.__name__}: {e}") from None
    frame = Frame(msg)
    if end == len(raw):
        return frame
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ProtocolError(f"{cls.__name__} with tensor data but no message kind")
    sub = getattr(msg, kind).DESCRIPTOR
    names = {f.number: f.name for f in sub.fields}
    pos = end
    while pos < len(buf):
        _, k_start, k_end = _len_field(buf, pos)
        field_no, t_start, t_end = _len_field(buf, k_start)
        data_no, d_start, d_end = _len_field(buf, t_start)
        if data_no != 1 or t_end != k_end or d_end != t_end or field_no not in names:
            raise ProtocolError(f"{cls.__name__}: unexpected trailing field {field_no}")
        frame.payloads[names[field_no]] = buf[d_start:d_end]
        pos = k_end
    return frame
