"""Wire codecs: torch tensors to and from `dlora.v1.Tensor`, with strict validation.

Every tensor that arrives is checked against what the step expects (codec, shape, byte
length, finite values) before anything uses it; a mismatch raises ProtocolError, which the
servers turn into INVALID_ARGUMENT. Encoding makes one copy (into the protobuf bytes field);
decoding reads the bytes in place with torch.frombuffer.

int8 is blockwise absmax (as bitsandbytes' and hivemind's blockwise 8-bit): the flat tensor is
cut into blocks of `block_size` elements, each stored as round(x / absmax * 127) with its absmax
as a float32 scale, so the error of any element is at most absmax/254 of its block. A sender uses
min(block_size, tensor size); a receiver accepts 1..MAX_BLOCK_SIZE and allocates only what the
element bytes it received imply, whatever the block size (no padding to a whole block).

Nothing is allocated from a size the sender states until it has been checked against the bytes that
arrived (which the gRPC message limit bounds): a 4-byte message cannot make the receiver allocate.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.errors import ProtocolError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.protocol import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, WIRE_CODECS


@dataclass(frozen=True)
class CodecSpec:
    """One wire encoding."""

    name: str  # the --wire flag value
    codec: pb.Codec  # the dlora.v1.Codec enum value
    dtype: torch.dtype  # element type in Tensor.data
    bytes_per_element: int


CODECS: dict[str, CodecSpec] = {
    "float32": CodecSpec("float32", pb.FLOAT32, torch.float32, 4),
    "bfloat16": CodecSpec("bfloat16", pb.BFLOAT16, torch.bfloat16, 2),
    "float16": CodecSpec("float16", pb.FLOAT16, torch.float16, 2),
    "int8": CodecSpec("int8", pb.INT8_BLOCKWISE, torch.int8, 1),
    "uint8": CodecSpec("uint8", pb.UINT8, torch.uint8, 1),
}
BY_ENUM: dict[int, CodecSpec] = {spec.codec: spec for spec in CODECS.values()}
_FLOAT16_MAX = torch.finfo(torch.float16).max


def codec_spec(name: str) -> CodecSpec:
    """The codec for a --wire value.

    Raises:
        ProtocolError: unknown name (the message lists the known ones).
    """
    if name not in CODECS:
        raise ProtocolError(f"unknown wire codec {name!r}; use one of {', '.join(WIRE_CODECS)}")
    return CODECS[name]


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or Inf in t.

    Fast path: a float32 sum, finite only if every element is (NaN and Inf propagate); only when it
    is not finite (a NaN, an Inf, or an overflowing sum of huge values) is every element checked.
    """
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _raw_view(t: torch.Tensor) -> memoryview:
    """The tensor's bytes, in place when it already is a contiguous CPU tensor."""
    return memoryview(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())  # type: ignore[arg-type]


def encode(t: torch.Tensor, codec: str, block_size: int = DEFAULT_BLOCK_SIZE) -> pb.Tensor:
    """Encode a tensor for the wire into a new message, its bytes inline in `data`.

    Raises:
        ProtocolError: the tensor holds NaN or Inf (or overflows float16), or block_size is not in 1..MAX_BLOCK_SIZE.
    """
    out = pb.Tensor()
    out.data = bytes(encode_into(out, t, codec, block_size))
    return out


def encode_into(out: pb.Tensor, t: torch.Tensor, codec: str, block_size: int = DEFAULT_BLOCK_SIZE) -> memoryview:
    """Fill a message's Tensor field with shape and codec (and int8 scales); return the element bytes.

    The bytes are left out of the message so that common.wire.frames can send them with one copy; they
    share memory with `t` where no conversion was needed, so t must not change until it is sent.

    Raises:
        ProtocolError: the tensor holds NaN or Inf (or overflows float16), or block_size is not in 1..MAX_BLOCK_SIZE.
    """
    spec = codec_spec(codec)
    shape = list(t.shape)
    t = t.detach()
    out.shape.extend(shape)
    out.codec = spec.codec
    if spec.codec == pb.UINT8:
        return _raw_view(t.to(torch.uint8))
    if not all_finite(t):
        raise ProtocolError(f"refusing to send a tensor of shape {tuple(shape)} with NaN or Inf values")
    if spec.codec == pb.INT8_BLOCKWISE:
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ProtocolError(f"int8 block size must be in 1..{MAX_BLOCK_SIZE}, got {block_size}")
        block_size = min(block_size, max(t.numel(), 1))  # a block never longer than the tensor
        q, absmax = _int8_encode(t, block_size)
        out.scales = bytes(_raw_view(absmax))
        out.block_size = block_size
        return _raw_view(q)
    if spec.dtype == torch.float16 and t.numel() and float(t.abs().max()) > _FLOAT16_MAX:
        raise ProtocolError("a value exceeds float16's range; use --wire bfloat16 or float32")
    return _raw_view(t.to(spec.dtype))


def _int8_encode(t: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 absmax per block), both on the CPU; the arithmetic runs where t lives.

    One temporary the size of t (|t|, then reused as the scaled values, rounded and clamped in place).
    `block_size` is 1..MAX_BLOCK_SIZE (encode_into checks it).
    """
    flat = t.reshape(-1).to(torch.float32)
    n = flat.numel()
    pad = (-n) % block_size
    blocks = (torch.nn.functional.pad(flat, (0, pad)) if pad else flat).view(-1, block_size)  # (n_blocks, block)
    scaled = blocks.abs()  # the one temporary: |x| here, x / absmax * 127 below
    absmax = scaled.amax(dim=1)  # (n_blocks,)
    # divide (not multiply by 127/absmax, which overflows for subnormal absmax); all-zero blocks stay 0
    safe = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    torch.div(blocks, safe[:, None], out=scaled)
    q = scaled.mul_(127.0).round_().clamp_(-127, 127).to(torch.int8).reshape(-1)[:n]
    return q.cpu(), absmax.cpu()


def nbytes(msg: pb.Tensor) -> int:
    """Payload bytes of an encoded tensor (data plus scales), computed from its shape and codec.

    Reading `data` would copy it (protobuf hands out a new bytes object each time); decode() checks
    that the real length matches this.
    """
    spec = BY_ENUM.get(msg.codec)
    if spec is None:
        return 0
    numel = 1
    for d in msg.shape:
        numel *= d
    if spec.codec == pb.INT8_BLOCKWISE:
        return numel + 4 * (-(-numel // msg.block_size)) if msg.block_size else numel
    return numel * spec.bytes_per_element


def _frombuffer(data: bytes | memoryview, dtype: torch.dtype) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=dtype)
    with warnings.catch_warnings():  # protobuf bytes are read-only; we never write into them
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype)


def decode(
    msg: pb.Tensor,
    what: str,
    shape: Sequence[int | None],
    codec: str,
    out_dtype: torch.dtype = torch.float32,
    payload: bytes | memoryview | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Decode and validate an incoming tensor.

    Args:
        msg: the wire tensor.
        what: a name for error messages ("LoraDelta layer 3").
        shape: the expected shape; None in a position accepts any size there.
        codec: the codec the session agreed for this direction.
        out_dtype: the dtype of the returned tensor (ignored for uint8 masks).
        payload: the element bytes when they travelled outside the message (common.wire.frames);
            else they are read from msg.data.
        device: where the result goes; the dtype conversion and the check happen there.

    Raises:
        ProtocolError: wrong codec, shape, byte length, block layout, or NaN/Inf values; all but the
            values are found before anything is allocated.
    """
    spec = codec_spec(codec)
    if msg.codec != spec.codec:
        got = BY_ENUM[msg.codec].name if msg.codec in BY_ENUM else f"enum {msg.codec}"
        raise ProtocolError(f"{what}: codec {got}, expected {spec.name}")
    got_shape = tuple(msg.shape)
    if len(got_shape) != len(shape) or any(e is not None and e != g for e, g in zip(shape, got_shape)):
        want = tuple("*" if e is None else e for e in shape)
        raise ProtocolError(f"{what}: shape {got_shape}, expected {want}")
    if any(g < 0 for g in got_shape):
        raise ProtocolError(f"{what}: negative dimension in shape {got_shape}")
    numel = 1
    for g in got_shape:
        numel *= g
    data = msg.data if payload is None else payload
    if len(data) != numel * spec.bytes_per_element:
        raise ProtocolError(
            f"{what}: {len(data)} data bytes, expected {numel * spec.bytes_per_element} "
            f"for shape {got_shape} in {spec.name}"
        )
    if spec.codec == pb.UINT8:
        return _frombuffer(data, torch.uint8).view(got_shape).to(device)
    if spec.codec == pb.INT8_BLOCKWISE:
        _check_blocks(msg, numel, what)
        # int8 values are always finite; the scales were checked, so the product is too
        return _int8_decode(msg, data, numel, what, device).view(got_shape).to(out_dtype)
    # move, then convert and check where the result lives (a GPU does both far faster)
    t = _frombuffer(data, spec.dtype).view(got_shape).to(device).to(out_dtype)
    if not all_finite(t):
        raise ProtocolError(f"{what}: NaN or Inf values")
    return t


def _check_blocks(msg: pb.Tensor, numel: int, what: str) -> None:
    """An int8 tensor's block layout, checked before anything is allocated.

    Raises:
        ProtocolError: block_size outside 1..MAX_BLOCK_SIZE, or not one 4-byte scale per block.
    """
    bs = msg.block_size
    if not 1 <= bs <= MAX_BLOCK_SIZE:
        raise ProtocolError(f"{what}: int8 block_size must be in 1..{MAX_BLOCK_SIZE}, got {bs}")
    n_blocks = -(-numel // bs)
    if len(msg.scales) != 4 * n_blocks:
        raise ProtocolError(f"{what}: {len(msg.scales)} scale bytes, expected {4 * n_blocks} "
                            f"({n_blocks} blocks of {bs} for {numel} elements)")


def _int8_decode(msg: pb.Tensor, data: bytes | memoryview, numel: int, what: str,
                 device: torch.device | str) -> torch.Tensor:
    """float32 values on `device`: the int8 bytes move there first (a quarter of float32's).

    The one new tensor has `numel` elements, which the received bytes hold: full blocks are scaled as a
    (blocks, bs) view and the shorter last block on its own, so a block size larger than the tensor
    allocates nothing more. Call _check_blocks first.

    Raises:
        ProtocolError: a scale is negative, NaN or Inf.
    """
    bs = msg.block_size
    absmax = _frombuffer(msg.scales, torch.float32)  # (n_blocks,)
    if not bool(torch.isfinite(absmax).all()) or bool((absmax < 0).any()):
        raise ProtocolError(f"{what}: int8 scales must be finite and non-negative")
    absmax = absmax.to(device)
    q = _frombuffer(data, torch.int8).to(device).to(torch.float32)  # (numel,)
    full = numel // bs
    # divide, then scale last: exact for subnormal absmax
    if full:
        q[: full * bs].view(full, bs).div_(127.0).mul_(absmax[:full, None])
    if numel > full * bs:
        q[full * bs :].div_(127.0).mul_(absmax[full])
    return q
