"""Wire codecs: round trips, the int8 error bound and size, and every way a message can be refused.

Why the comparisons hold on any CPU (Intel or AMD, with or without AVX-512, arm64): float32 bytes
round-trip unchanged, and a float32 -> bfloat16/float16 -> float32 cast is IEEE round-to-nearest-even,
defined to the bit, so those are compared with torch.equal. int8 keeps x within half a step
(absmax/254) of its block by construction; the float32 arithmetic around it (x / absmax x 127 on
encode, q / 127 x absmax on decode) adds four correctly rounded operations, at most ~2.5e-7 x absmax
(IEEE 754 on every CPU; FMA or a reciprocal instead of a division would add as much again), so the
bound absmax x (1/254 + 1e-6) holds on every CPU.
Subnormal inputs stay subnormal: torch leaves flush-to-zero off on every platform unless asked.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import pytest
import torch

from common.errors import ProtocolError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs
from common.wire.codecs import CODECS, decode, encode, nbytes
from common.wire.protocol import DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE, WIRE_CODECS

SHAPES = [(), (1,), (3, 5, 7), (2, 1000, 3), (0, 4)]
FLOAT_CODECS = ("float32", "bfloat16", "float16")
BLOCK_SIZES = [1, 7, 64, 4096, 1_000_000]  # the last is larger than any tensor here


def _sample(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Normal values whose magnitude spans 1e-3..1e3 across the tensor, so int8 blocks differ in scale."""
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    x = torch.randn(n, generator=g) * torch.logspace(-3, 3, n) if n else torch.empty(0)
    return x.reshape(shape)


def _raw(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _noncontiguous() -> list[tuple[str, torch.Tensor]]:
    base = _sample((6, 9, 4), seed=1)
    cases = [
        ("transposed", base[:, :, 0].t()),
        ("strided slice", base[:, ::2, 1]),
        ("permuted", base.permute(2, 0, 1)),
        ("expanded", base[0, :, 0].expand(5, 9)),
    ]
    for _, t in cases:  # the cases must really exercise the non-contiguous path
        if t.is_contiguous():
            raise RuntimeError("test case is contiguous")
    return cases


def _expected(x: torch.Tensor, codec: str) -> torch.Tensor:
    """What a float codec must give back: torch's own cast, returned as float32."""
    return x.to(CODECS[codec].dtype).to(torch.float32)


def _block_absmax(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """The absmax of the block each element falls in, computed independently of the codec."""
    flat = x.reshape(-1).to(torch.float32)
    n = flat.numel()
    idx = torch.arange(n) // block_size
    absmax = torch.zeros(-(-n // block_size)).scatter_reduce(0, idx, flat.abs(), "amax", include_self=True)
    return absmax[idx].reshape(x.shape)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_float32_round_trip_is_exact(shape: tuple[int, ...]) -> None:
    x = _sample(shape)
    y = decode(encode(x, "float32"), "t", shape, "float32")
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, x)


@pytest.mark.parametrize("codec", ["bfloat16", "float16"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_half_round_trip_equals_torch_cast(codec: str, shape: tuple[int, ...]) -> None:
    x = _sample(shape).clamp(-6e4, 6e4)  # inside float16's range
    y = decode(encode(x, codec), "t", shape, codec)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert torch.equal(y, _expected(x, codec))


@pytest.mark.parametrize("codec", ["bfloat16", "float16"])
def test_half_decode_to_its_own_dtype(codec: str) -> None:
    x = _sample((4, 5))
    dtype = CODECS[codec].dtype
    y = decode(encode(x, codec), "t", (4, 5), codec, out_dtype=dtype)
    assert y.dtype == dtype and torch.equal(y, x.to(dtype))


@pytest.mark.parametrize("codec", WIRE_CODECS)
@pytest.mark.parametrize("name,x", _noncontiguous(), ids=[n for n, _ in _noncontiguous()])
def test_noncontiguous_input_round_trips(codec: str, name: str, x: torch.Tensor) -> None:
    msg = encode(x, codec)
    assert list(msg.shape) == list(x.shape)
    y = decode(msg, "t", tuple(x.shape), codec)
    if codec == "int8":
        bound = _block_absmax(x, DEFAULT_BLOCK_SIZE) * (1 / 254 + 1e-6)
        assert bool(((y - x).abs() <= bound).all())
    else:
        assert torch.equal(y, _expected(x, codec))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_error_is_within_half_a_step_of_its_block(shape: tuple[int, ...], block_size: int) -> None:
    # The module docstring promises absmax/254 (half a quantisation step); absmax/127 would be a full step.
    x = _sample(shape)
    y = decode(encode(x, "int8", block_size), "t", shape, "int8")
    assert y.shape == x.shape and y.dtype == torch.float32
    absmax = _block_absmax(x, block_size)
    err = (y - x).abs()
    assert bool((err <= absmax * (1 / 254 + 1e-6)).all()), (
        f"max error / absmax = {float((err / absmax).max())}"
    )


def test_int8_keeps_an_all_zero_block_exact() -> None:
    x = torch.zeros(3, 64)
    x[1] = torch.linspace(-2, 2, 64)
    y = decode(encode(x, "int8", 64), "t", (3, 64), "int8")
    assert torch.equal(y[0], x[0]) and torch.equal(y[2], x[2])
    assert float(y[1].abs().max()) == pytest.approx(2.0)


def test_int8_error_bound_holds_for_a_subnormal_block() -> None:
    x = torch.tensor([1e-40, 5e-41, 0.0, -3e-41])
    y = decode(encode(x, "int8", 4), "t", (4,), "int8")
    assert bool(((y - x).abs() <= 1e-40 * (1 / 254 + 1e-6)).all())


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_payload_size(shape: tuple[int, ...], block_size: int) -> None:
    numel = math.prod(shape)
    msg = encode(_sample(shape), "int8", block_size)
    sent = min(block_size, max(numel, 1))  # a sender never uses a block longer than the tensor
    n_blocks = -(-numel // sent)
    assert len(msg.data) == numel
    assert len(msg.scales) == 4 * n_blocks
    assert msg.block_size == sent
    assert nbytes(msg) == numel + 4 * n_blocks


def test_int8_is_about_a_quarter_of_float32_on_a_large_tensor() -> None:
    x = _sample((256, 4096))
    int8, fp32 = encode(x, "int8"), encode(x, "float32")
    assert nbytes(fp32) == 4 * x.numel()
    assert nbytes(int8) <= 0.27 * nbytes(fp32)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]),  # long, as the data loader makes it
        torch.tensor([[True, False, True]]),
        torch.ones(4, 6, dtype=torch.uint8)[:, ::2],  # non-contiguous
        torch.zeros(0, 3, dtype=torch.uint8),
    ],
    ids=["long", "bool", "strided", "empty"],
)
def test_uint8_mask_round_trip(mask: torch.Tensor) -> None:
    msg = encode(mask, "uint8")
    assert msg.codec == pb.UINT8 and len(msg.data) == mask.numel()
    y = decode(msg, "mask", tuple(mask.shape), "uint8")
    assert y.dtype == torch.uint8 and torch.equal(y, mask.to(torch.uint8))


# ---------------------------------------------------------------- refused on encode


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", WIRE_CODECS)
def test_encode_rejects_non_finite(codec: str, bad: float) -> None:
    x = torch.ones(3, 5)
    x[2, 4] = bad
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        encode(x, codec)


@pytest.mark.parametrize("value", [7e4, -7e4, 1e30])
def test_encode_rejects_float16_overflow(value: float) -> None:
    x = torch.zeros(10)
    x[3] = value
    with pytest.raises(ProtocolError, match="float16"):
        encode(x, "float16")


def test_encode_accepts_float16_max() -> None:
    x = torch.tensor([65504.0, -65504.0])
    assert torch.equal(decode(encode(x, "float16"), "t", (2,), "float16"), x)


@pytest.mark.parametrize("block_size", [0, -1, MAX_BLOCK_SIZE + 1])
def test_encode_rejects_bad_block_size(block_size: int) -> None:
    with pytest.raises(ProtocolError, match="block size"):
        encode(torch.ones(8), "int8", block_size)


def test_unknown_codec_name_lists_the_known_ones() -> None:
    with pytest.raises(ProtocolError) as e:
        encode(torch.ones(2), "fp8")
    for name in WIRE_CODECS:
        assert name in str(e.value)
    with pytest.raises(ProtocolError):
        decode(encode(torch.ones(2), "float32"), "t", (2,), "fp8")


# ---------------------------------------------------------------- refused on decode


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("codec", FLOAT_CODECS)
def test_decode_rejects_non_finite(codec: str, bad: float) -> None:
    x = torch.tensor([1.0, bad, 3.0], dtype=CODECS[codec].dtype)
    msg = pb.Tensor(data=_raw(x), shape=[3], codec=CODECS[codec].codec)
    with pytest.raises(ProtocolError, match="NaN or Inf"):
        decode(msg, "t", (3,), codec)


@pytest.mark.parametrize("sent,expected", list(itertools.permutations(CODECS, 2)))
def test_decode_rejects_wrong_codec(sent: str, expected: str) -> None:
    msg = encode(torch.ones(2, 3), sent)
    with pytest.raises(ProtocolError, match=f"codec {sent}, expected {expected}"):
        decode(msg, "t", (2, 3), expected)


@pytest.mark.parametrize("enum", [pb.CODEC_UNSPECIFIED, 99])
def test_decode_rejects_unknown_enum(enum: int) -> None:
    msg = encode(torch.ones(2, 3), "float32")
    msg.codec = enum
    with pytest.raises(ProtocolError, match="codec"):
        decode(msg, "t", (2, 3), "float32")


@pytest.mark.parametrize(
    "expected,ok",
    [
        ((2, 3, 4), True),
        ((None, 3, 4), True),
        ((2, None, None), True),
        ((None, None, None), True),
        ((2, 3, 5), False),
        ((3, 2, 4), False),
        ((None, 3, 5), False),
        ((2, 3), False),
        ((2, 3, 4, 1), False),
        ((None, None), False),
        ((), False),
    ],
)
@pytest.mark.parametrize("codec", WIRE_CODECS)
def test_decode_checks_shape(codec: str, expected: tuple[int | None, ...], ok: bool) -> None:
    x = _sample((2, 3, 4))
    msg = encode(x, codec)
    if ok:
        assert decode(msg, "t", expected, codec).shape == (2, 3, 4)
    else:
        with pytest.raises(ProtocolError, match="shape"):
            decode(msg, "t", expected, codec)


def test_decode_wildcard_accepts_any_size() -> None:
    for n in (0, 1, 17, 300):
        x = _sample((n, 4))
        assert torch.equal(decode(encode(x, "float32"), "t", (None, 4), "float32"), x)


def test_decode_rejects_negative_dimension() -> None:
    msg = pb.Tensor(data=b"", shape=[-1, 4], codec=pb.FLOAT32)
    with pytest.raises(ProtocolError):
        decode(msg, "t", (None, 4), "float32")


@pytest.mark.parametrize("change", ["one byte short", "one byte long", "one element long", "empty"])
@pytest.mark.parametrize("codec", list(CODECS))
def test_decode_rejects_wrong_byte_length(codec: str, change: str) -> None:
    msg = encode(torch.ones(3, 5), codec)
    bpe = CODECS[codec].bytes_per_element
    msg.data = {
        "one byte short": msg.data[:-1],
        "one byte long": msg.data + b"\0",
        "one element long": msg.data + b"\0" * bpe,
        "empty": b"",
    }[change]
    with pytest.raises(ProtocolError, match="data bytes"):
        decode(msg, "t", (3, 5), codec)


@pytest.mark.parametrize("change", ["one scale short", "one scale long", "one byte short", "empty"])
def test_decode_rejects_bad_int8_scales_length(change: str) -> None:
    msg = encode(_sample((3, 50)), "int8", 64)  # 150 elements -> 3 blocks
    assert len(msg.scales) == 12
    msg.scales = {
        "one scale short": msg.scales[:-4],
        "one scale long": msg.scales + msg.scales[:4],
        "one byte short": msg.scales[:-1],
        "empty": b"",
    }[change]
    with pytest.raises(ProtocolError, match="scale bytes"):
        decode(msg, "t", (3, 50), "int8")


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), float("-inf")])
def test_decode_rejects_bad_int8_scales(bad: float) -> None:
    msg = encode(_sample((3, 50)), "int8", 64)
    scales = torch.frombuffer(bytearray(msg.scales), dtype=torch.float32).clone()
    scales[1] = bad
    msg.scales = _raw(scales)
    with pytest.raises(ProtocolError, match="scales must be finite and non-negative"):
        decode(msg, "t", (3, 50), "int8")


@pytest.mark.parametrize("block_size", [0, MAX_BLOCK_SIZE + 1, 2**32 - 1])
def test_decode_rejects_int8_block_size_out_of_range(block_size: int) -> None:
    """0 and anything above MAX_BLOCK_SIZE is refused; 2**32 - 1 is the block-size bomb (one block,
    4 bytes of scales, which a padding decoder would expand to 17 GB)."""
    msg = encode(_sample((1,)), "int8")
    msg.block_size = block_size
    with pytest.raises(ProtocolError, match=f"block_size must be in 1..{MAX_BLOCK_SIZE}, got {block_size}"):
        decode(msg, "t", (1,), "int8")


@pytest.mark.parametrize("block_size", [151, 4096, MAX_BLOCK_SIZE])
def test_decode_of_a_block_longer_than_the_tensor_is_exact_and_small(block_size: int) -> None:
    """A sender of an older version used blocks longer than the tensor: one block, one scale. The decode
    equals the same tensor sent with a block of its own size (the arithmetic per element is the same),
    and allocates no padding: only what the 150 received elements imply."""
    x = _sample((3, 50))
    msg = encode(x, "int8", 150)  # one block of exactly the tensor
    reference = decode(msg, "t", (3, 50), "int8")
    msg.block_size = block_size
    y = decode(msg, "t", (3, 50), "int8")
    assert torch.equal(y, reference)
    assert y.untyped_storage().nbytes() == 150 * 4


# ---------------------------------------------------------------- the registry


def test_codec_registry_matches_the_proto_enum() -> None:
    enum = {v.number: v.name for v in pb.Codec.DESCRIPTOR.values if v.name != "CODEC_UNSPECIFIED"}
    per_enum = Counter(spec.codec for spec in CODECS.values())
    assert set(per_enum) == set(enum), "a Codec enum value has no CodecSpec, or a CodecSpec no enum value"
    assert all(count == 1 for count in per_enum.values()), f"enum values with several specs: {per_enum}"
    assert set(codecs.BY_ENUM) == set(enum)
    assert pb.CODEC_UNSPECIFIED not in codecs.BY_ENUM


@pytest.mark.parametrize("name", list(CODECS))
def test_codec_spec_is_consistent(name: str) -> None:
    spec = CODECS[name]
    assert spec.name == name
    assert codecs.codec_spec(name) is spec
    assert spec.bytes_per_element == torch.empty(0, dtype=spec.dtype).element_size()


def test_wire_codecs_are_the_float_and_int8_codecs() -> None:
    assert set(WIRE_CODECS) == set(CODECS) - {"uint8"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("codec", list(CODECS))
def test_encode_accepts_a_cuda_tensor(codec: str) -> None:
    x = torch.ones(2, 3, device="cuda")
    y = decode(encode(x, codec), "t", (2, 3), codec)
    assert torch.equal(y.float(), torch.ones(2, 3))


@pytest.mark.parametrize("codec", list(CODECS))
def test_encode_accepts_a_tensor_that_requires_grad(codec: str) -> None:
    x = torch.ones(2, 3, requires_grad=True) * 2  # non-leaf, part of a graph
    y = decode(encode(x, codec), "t", (2, 3), codec)
    assert torch.equal(y.float(), torch.full((2, 3), 2.0))
