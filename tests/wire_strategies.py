"""Hypothesis strategies for malformed session messages, both directions (tests/integration/test_fuzz_*.py).

They aim near the edges a receiver checks: plausible shapes with the wrong width, codec, byte length,
int8 block size or scales; huge and negative dimensions; open-enum values no codec or role has; numbers
at the ends of their wire types; NaN and Inf; real messages in the wrong order; real messages cut short
or with a byte flipped; tensor bytes framed after the message (common/wire/frames.py) under the wrong
field; and plain random bytes. Tensor bytes come from a seeded generator, not from Hypothesis, so that
a large tensor costs Hypothesis nothing to draw. The adapter protocol's (`adapter_scripts`): Hellos with
any LoRA setting, StepWeights with module numbers out of range, repeated or unordered, trained modules
never sent, micro-batch counts at the ends of uint32, weights near the layout's length in any codec, and
a correct step's exchange with one message replaced, dropped, repeated, added or mutated.
"""

from __future__ import annotations

import math
import random

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs, frames
from common.wire.adapter import AdapterLayout

# the default run and `pytest -m slow` (the slow tests load the second profile)
settings.register_profile("fuzz", max_examples=300, deadline=None, database=None, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz-slow", settings.get_profile("fuzz"), max_examples=3000)

CODECS = st.sampled_from([0, pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16, pb.INT8_BLOCKWISE, pb.UINT8, 6, 99, 2**31 - 1])
U32 = st.one_of(st.integers(0, 4), st.sampled_from([2**16, 2**24, 2**24 + 1, 2**31, 2**32 - 1]), st.integers(0, 2**32 - 1))
U64 = st.one_of(st.integers(0, 3), st.sampled_from([2**32, 2**63, 2**64 - 1]), st.integers(0, 2**64 - 1))
I64 = st.one_of(st.integers(-2, 3), st.sampled_from([-(2**63), 2**63 - 1]), st.integers(-(2**63), 2**63 - 1))
DIM = st.one_of(st.integers(0, 8), st.sampled_from([32, 33, 48, 500, 2**20, 2**31, 2**40, 2**62, 2**63 - 1]),
                st.integers(-(2**63), -1))
FLOATS = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -1.0, 1e-300, 1e300]))
BYTES_PER = {pb.FLOAT32: 4, pb.BFLOAT16: 2, pb.FLOAT16: 2, pb.INT8_BLOCKWISE: 1, pb.UINT8: 1}
MAX_BYTES = 1 << 16  # a tensor's bytes are generated only up to this; a larger stated size gets a few bytes


def _fill(n: int, codec: int, how: str, seed: int) -> bytes:
    """n bytes of tensor data: finite values of the codec's type, NaNs, zeros or random bytes."""
    rng = random.Random(seed)
    if how == "random" or codec not in (pb.FLOAT32, pb.BFLOAT16, pb.FLOAT16) or n % BYTES_PER[codec]:
        return rng.randbytes(n)
    dtype = {pb.FLOAT32: torch.float32, pb.BFLOAT16: torch.bfloat16, pb.FLOAT16: torch.float16}[codec]
    k = n // BYTES_PER[codec]
    g = torch.Generator().manual_seed(seed)
    t = {"finite": torch.randn(k, generator=g), "zeros": torch.zeros(k), "nan": torch.full((k,), math.nan)}[how]
    return t.to(dtype).numpy().tobytes() if dtype != torch.bfloat16 else t.to(dtype).view(torch.int16).numpy().tobytes()


@st.composite
def tensors(draw: st.DrawFn, plausible: tuple[int, ...] | None = None) -> tuple[pb.Tensor, bytes]:
    """(a Tensor without data, its data): near `plausible` (a shape the receiver might expect) or anything."""
    shapes = [st.lists(DIM, max_size=4).map(tuple)]
    if plausible is not None:
        shapes += [st.just(plausible)] * 3 + [
            st.tuples(*[st.sampled_from([d, d + 1, max(d - 1, 0)]) for d in plausible])]
    shape = draw(st.one_of(*shapes))
    codec = draw(CODECS)
    numel = math.prod(shape) if all(d >= 0 for d in shape) else -1
    right = numel * BYTES_PER.get(codec, 4)
    length = draw(st.one_of(
        st.just(right) if 0 <= right <= MAX_BYTES else st.integers(0, 64),
        st.sampled_from([n for n in (right - 1, right + 1, 0) if 0 <= n <= MAX_BYTES]),
        st.integers(0, 64)))
    data = _fill(length, codec, draw(st.sampled_from(["finite", "finite", "random", "zeros", "nan"])),
                 draw(st.integers(0, 2**32)))
    t = pb.Tensor(shape=shape, codec=codec)
    if codec == pb.INT8_BLOCKWISE or draw(st.booleans()) is False:
        block = draw(st.one_of(st.sampled_from([0, 1, 7, 4096, 2**24, 2**24 + 1, 2**32 - 1]), U32))
        blocks = -(-max(numel, 0) // block) if block else 0
        n_scales = draw(st.sampled_from([blocks, blocks, max(blocks - 1, 0), blocks + 1, 1, 0]))
        scale = draw(st.sampled_from([1.0, 0.0, -1.0, math.nan, math.inf, 1e-40]))
        if n_scales <= MAX_BYTES // 4:
            t.scales = torch.full((n_scales,), scale, dtype=torch.float32).numpy().tobytes()
        t.block_size = block
    return t, data


def _with_tensor(body: object, field: str, tensor: tuple[pb.Tensor, bytes], inline: bool) -> dict[str, bytes]:
    """Put the tensor into body.field; its data inline, or returned as the frame's payload for that field."""
    t, data = tensor
    getattr(body, field).CopyFrom(t)
    if inline:
        getattr(body, field).data = data
        return {}
    return {field: data}


def _frame(msg: pb.EdgeMessage | pb.CloudMessage, payloads: dict[str, bytes]) -> bytes:
    return frames.serialize(frames.Frame(msg, payloads))


@st.composite
def mutated(draw: st.DrawFn, raw: bytes) -> bytes:
    """A real message cut short, with a byte flipped, or with junk after it."""
    how = draw(st.sampled_from(["cut", "flip", "junk"]))
    if how == "cut" and raw:
        return raw[: draw(st.integers(0, len(raw) - 1))]
    if how == "flip" and raw:
        i = draw(st.integers(0, len(raw) - 1))
        return raw[:i] + bytes([raw[i] ^ draw(st.integers(1, 255))]) + raw[i + 1 :]
    return raw + draw(st.binary(max_size=16))


# ---------------------------------------------------------------- device -> cloud


def hello_fields(fingerprint: str, targets: list[str]) -> st.SearchStrategy[pb.Hello]:
    """A Hello: mostly right, with any field possibly wrong (the adapter protocol's LoRA settings included)."""
    def build(d: dict) -> pb.Hello:
        h = pb.Hello(protocol=d["protocol"], model_fingerprint=d["fp"], session_id=d["sid"], targets=d["targets"],
                     codec_up=d["up"], codec_down=d["down"], block_size_down=d["block"], budget=d["budget"],
                     revive=d["revive"], kill_threshold=d["tau"], step_protocol=d["protocol_step"])
        if d["warmup"] is not None:
            h.warmup_epochs = d["warmup"]
        if d["lora"] is not None:
            h.lora_rank, h.lora_alpha, h.lora_dropout, h.dropout_seed, h.codec_weights = d["lora"]
        return h

    good = st.fixed_dictionaries({
        "protocol": st.sampled_from(["dlora.v1"] * 6 + ["dlora.v0", ""]),
        "fp": st.sampled_from([fingerprint] * 6 + ["0" * 16, ""]),
        "sid": st.sampled_from([""] * 6 + ["0" * 32, "0123456789ab", "../../etc", "x" * 300]),
        "targets": st.sampled_from([targets] * 4 + [[], targets[:1], ["self_attn.nope"], targets * 2]),
        "up": st.sampled_from([pb.FLOAT32] * 3 + [pb.INT8_BLOCKWISE, pb.BFLOAT16, pb.UINT8, 0, 99]),
        "down": st.sampled_from([pb.FLOAT32] * 3 + [pb.INT8_BLOCKWISE, pb.FLOAT16, 0, 99]),
        "block": st.one_of(st.just(0), U32),
        "warmup": st.one_of(st.none(), U32),
        "budget": st.one_of(st.just(0), U32),
        "revive": st.one_of(st.just(0), U32),
        "tau": st.one_of(st.just(0.0), FLOATS),
        "protocol_step": st.sampled_from([pb.LAYERWISE] * 3 + [pb.ADAPTER] * 3 + [2, 99]),
        "lora": st.one_of(st.none(), lora_settings()),
    })
    return good.map(build)


def lora_settings() -> st.SearchStrategy[tuple[int, float, float, int, int]]:
    """An adapter Hello's (lora_rank, lora_alpha, lora_dropout, dropout_seed, codec_weights): mostly in range."""
    return st.tuples(
        st.one_of(st.sampled_from([4, 4, 1, 0]), U32),
        st.one_of(st.sampled_from([8.0, 8.0, 0.0, -1.0]), FLOATS),
        st.one_of(st.sampled_from([0.1, 0.0, 1.0, -0.1, 0.999]), FLOATS),
        I64,
        st.sampled_from([pb.FLOAT32] * 3 + [0, pb.BFLOAT16, pb.FLOAT16, pb.INT8_BLOCKWISE, pb.UINT8, 99]),
    )


@st.composite
def edge_messages(draw: st.DrawFn, fingerprint: str, targets: list[str], hidden: int, layers: int) -> bytes:
    """One EdgeMessage on the wire, any kind, valid-looking or not."""
    kind = draw(st.sampled_from(["step_begin"] * 4 + ["lora_delta"] * 2 + ["hidden_grad", "lora_grad", "epoch_report",
                                                                              "hello", "raw", "mutated", "empty"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if kind == "hello":
        return pb.EdgeMessage(hello=draw(hello_fields(fingerprint, targets))).SerializeToString()
    mutate = kind == "mutated" or draw(st.integers(0, 19)) == 0
    if kind == "mutated":
        kind = draw(st.sampled_from(["step_begin", "lora_delta", "hidden_grad", "lora_grad", "epoch_report"]))
    inline = draw(st.booleans())
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    step, mb = draw(st.one_of(st.integers(0, 2), U64)), draw(st.one_of(st.integers(0, 2), U32))
    msg = pb.EdgeMessage()
    payloads: dict[str, bytes] = {}
    if kind == "step_begin":
        body = msg.step_begin
        body.step, body.micro_batch, body.train = step, mb, draw(st.booleans())
        body.layer_roles.extend(draw(st.one_of(
            st.lists(st.sampled_from([pb.ABSENT, pb.FORWARD, pb.FORWARD_BACKWARD]), min_size=layers, max_size=layers),
            st.lists(st.integers(0, 2**31 - 1), max_size=layers + 2))))
        payloads |= _with_tensor(body, "embeddings", draw(tensors((b, t, hidden))), inline)
        mask = draw(tensors((b, t)))
        if draw(st.booleans()):  # a proper 0/1 mask, so that the embeddings decide
            mask = (pb.Tensor(shape=[b, t], codec=pb.UINT8), bytes(random.Random(b * t).choices([0, 1], k=b * t)))
        payloads |= _with_tensor(body, "attention_mask", mask, inline)
    elif kind in ("lora_delta", "lora_grad"):
        body = getattr(msg, kind)
        body.step, body.micro_batch = step, mb
        body.layer, body.group = draw(st.one_of(st.integers(0, layers), U32)), draw(st.one_of(st.integers(0, 1), U32))
        width = 48 if kind == "lora_delta" else hidden  # q + v outputs / the layer's input
        field = "delta" if kind == "lora_delta" else "grad_input"
        payloads |= _with_tensor(body, field, draw(tensors((b, t, width))), inline)
    elif kind == "hidden_grad":
        body = msg.hidden_grad
        body.step, body.micro_batch = step, mb
        payloads |= _with_tensor(body, "grad", draw(tensors((b, t, hidden))), inline)
    else:
        body = msg.epoch_report
        body.epoch = draw(st.one_of(st.integers(0, 3), U32))
        n = draw(st.integers(0, layers + 2))
        body.layers.extend(draw(st.lists(st.one_of(st.integers(0, layers), U32), min_size=n, max_size=n)))
        body.deltas.extend(draw(st.lists(FLOATS, min_size=n, max_size=n + draw(st.sampled_from([0, 0, 1])))))
    raw = _frame(msg, payloads)
    return draw(mutated(raw)) if mutate else raw


@st.composite
def step_weights(draw: st.DrawFn, layout: AdapterLayout) -> bytes:
    """One StepWeights on the wire for a session with `layout`: valid-looking or not."""
    n = layout.num_modules
    modules = draw(st.one_of(
        st.just(list(range(n))),
        st.lists(st.integers(0, n - 1), unique=True, max_size=n).map(sorted),  # ascending, in range
        st.lists(st.one_of(st.integers(0, n + 1), U32), max_size=n + 2)))  # anything
    trained = draw(st.one_of(st.just(modules), st.just([]), st.just(list(range(n))),
                             st.lists(st.one_of(st.integers(0, n), U32), max_size=n + 1)))
    msg = pb.EdgeMessage()
    body = msg.step_weights
    body.step = draw(st.one_of(st.just(0), st.integers(0, 2), U64))
    body.micro_batches = draw(st.one_of(st.just(1), st.integers(0, 3), U32))
    body.train = draw(st.booleans())
    body.modules.extend(modules)
    body.trained.extend(trained)
    numel = layout.total_numel([m for m in modules if m < n])  # the length a receiver expects, near enough
    payloads = _with_tensor(body, "weights", draw(tensors((numel,))), draw(st.booleans()))
    raw = _frame(msg, payloads)
    return draw(mutated(raw)) if draw(st.integers(0, 19)) == 0 else raw


def adapter_exchange(fingerprint: str, targets: list[str], hidden: int, layout: AdapterLayout, b: int,
                     t: int) -> list[bytes]:
    """What a correct device sends for one adapter training step of one (b, t) micro-batch, every layer
    FORWARD_BACKWARD and every module trained: Hello, StepWeights, StepBegin, HiddenGrad (all queued at once;
    the cloud holds the HiddenGrad for the micro-batch its StepBegin started)."""
    every = list(range(layout.num_modules))
    hello = pb.Hello(protocol="dlora.v1", model_fingerprint=fingerprint, targets=targets, codec_up=pb.FLOAT32,
                     codec_down=pb.FLOAT32, step_protocol=pb.ADAPTER, lora_rank=layout.rank, lora_alpha=8.0,
                     lora_dropout=0.1, dropout_seed=3, codec_weights=pb.FLOAT32)
    g = torch.Generator().manual_seed(b * 10 + t)

    def framed(kind: str, field: str, t_: torch.Tensor, codec: str = "float32", **fields: object) -> bytes:
        msg = pb.EdgeMessage(**{kind: fields})
        data = codecs.encode_into(getattr(getattr(msg, kind), field), t_, codec)
        return frames.serialize(frames.Frame(msg, {field: bytes(data)}))

    begin = pb.EdgeMessage(step_begin=pb.StepBegin(step=0, train=True, layer_roles=[pb.FORWARD_BACKWARD] * layout.num_layers,
                                                   attention_mask=codecs.encode(torch.ones(b, t), "uint8")))
    data = codecs.encode_into(begin.step_begin.embeddings, torch.randn(b, t, hidden, generator=g), "float32")
    return [
        pb.EdgeMessage(hello=hello).SerializeToString(),
        framed("step_weights", "weights", 0.3 * torch.randn(layout.total_numel(every), generator=g), step=0,
               micro_batches=1, train=True, modules=every, trained=every),
        frames.serialize(frames.Frame(begin, {"embeddings": bytes(data)})),
        framed("hidden_grad", "grad", torch.randn(b, t, hidden, generator=g), step=0),
    ]


@st.composite
def adapter_scripts(draw: st.DrawFn, fingerprint: str, targets: list[str], hidden: int,
                    layout: AdapterLayout) -> tuple[list[bytes], bool]:
    """What a device sends on one adapter-protocol stream, and whether to wait for the step's answer before
    half-closing (a half-close abandons a running micro-batch): a correct step's exchange as it is, or with
    one message replaced, dropped, repeated, added (before it) or mutated, waited for when the StepBegin and
    its HiddenGrad are left as they are, in order (so the wait ends in a StepDone or StepError, or with the
    call); or a Hello (mostly a correct adapter one) and up to 5 messages, StepWeights most often."""
    layers = layout.num_layers
    b, t = draw(st.integers(1, 3)), draw(st.integers(1, 6))
    exchange = adapter_exchange(fingerprint, targets, hidden, layout, b, t)
    other = st.one_of(step_weights(layout), step_weights(layout), edge_messages(fingerprint, targets, hidden, layers))
    if draw(st.booleans()):
        i = draw(st.integers(0, len(exchange) - 1))
        how = draw(st.sampled_from(["as it is", "replace", "drop", "repeat", "add", "mutate"]))
        exchange[i:i + 1] = {"as it is": lambda: [exchange[i]], "replace": lambda: [draw(other)], "drop": lambda: [],
                             "repeat": lambda: [exchange[i]] * 2, "add": lambda: [draw(other), exchange[i]],
                             "mutate": lambda: [draw(mutated(exchange[i]))]}[how]()
        return exchange, how == "as it is" or i < 2  # 2, 3: the StepBegin and the HiddenGrad
    first = draw(st.sampled_from(["good"] * 6 + ["fuzzed", "layerwise"]))
    script = {"good": lambda: exchange[:1],
              "fuzzed": lambda: [pb.EdgeMessage(hello=draw(hello_fields(fingerprint, targets))).SerializeToString()],
              "layerwise": lambda: [pb.EdgeMessage(hello=pb.Hello(
                  protocol="dlora.v1", model_fingerprint=fingerprint, targets=targets, codec_up=pb.FLOAT32,
                  codec_down=pb.FLOAT32)).SerializeToString()]}[first]()
    return script + draw(st.lists(st.one_of(other, st.sampled_from(exchange[1:])), max_size=5)), False


@st.composite
def edge_scripts(draw: st.DrawFn, fingerprint: str, targets: list[str], hidden: int, layers: int) -> list[bytes]:
    """What a device sends on one stream: mostly a correct Hello first, then up to 5 messages of any kind."""
    hello = pb.EdgeMessage(hello=pb.Hello(protocol="dlora.v1", model_fingerprint=fingerprint, targets=targets,
                                          codec_up=draw(st.sampled_from([pb.FLOAT32, pb.INT8_BLOCKWISE])),
                                          codec_down=pb.FLOAT32))
    first = draw(st.sampled_from(["good"] * 6 + ["fuzzed", "other"]))
    script = {"good": [hello.SerializeToString()],
              "fuzzed": [pb.EdgeMessage(hello=draw(hello_fields(fingerprint, targets))).SerializeToString()],
              "other": []}[first]
    script += draw(st.lists(edge_messages(fingerprint, targets, hidden, layers), max_size=5))
    return script


# ---------------------------------------------------------------- cloud -> device

TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["line one\nline two", "\x1b[31mred\x1b[0m", "x" * 5000]))
CODES = st.one_of(st.sampled_from(["INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL", "RESOURCE_EXHAUSTED", ""]), st.text(max_size=20))


def welcome(layers: int, session_id: str = "0" * 32) -> pb.CloudMessage:
    return pb.CloudMessage(welcome=pb.Welcome(session_id=session_id, protocol="dlora.v1", num_layers=layers,
                                              model_type="llama", server_version="fuzz"))


@st.composite
def cloud_messages(draw: st.DrawFn, b: int, t: int, hidden: int, width: int, layers: int) -> bytes:
    """One CloudMessage on the wire for a device running step 0 with one (b, t) micro-batch: valid-looking or not.
    width: the LoRA group's output width (q + v)."""
    kind = draw(st.sampled_from(["lora_forward"] * 3 + ["hidden"] * 2 + ["lora_backward"] * 2 + [
        "step_done", "step_error", "kr_command", "welcome", "raw", "mutated", "empty"]))
    if kind == "raw":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if kind == "welcome":
        return welcome(draw(st.sampled_from([layers, layers + 1, 0])), draw(st.sampled_from(["0" * 32, "", "../x"]))).SerializeToString()
    mutate = kind == "mutated" or draw(st.integers(0, 19)) == 0
    if kind == "mutated":
        kind = draw(st.sampled_from(["lora_forward", "hidden", "lora_backward", "step_done", "kr_command"]))
    msg = pb.CloudMessage()
    payloads: dict[str, bytes] = {}
    step, mb = draw(st.one_of(st.just(0), st.just(0), U64)), draw(st.one_of(st.just(0), st.just(0), U32))
    inline = draw(st.booleans())
    if kind in ("lora_forward", "lora_backward"):
        body = getattr(msg, kind)
        body.step, body.micro_batch = step, mb
        body.layer, body.group = draw(st.one_of(st.integers(0, layers), U32)), draw(st.one_of(st.just(0), st.just(0), U32))
        field, plausible = ("x", (b, t, hidden)) if kind == "lora_forward" else ("grad_output", (b, t, width))
        payloads |= _with_tensor(body, field, draw(tensors(plausible)), inline)
    elif kind == "hidden":
        msg.hidden.step, msg.hidden.micro_batch = step, mb
        payloads |= _with_tensor(msg.hidden, "hidden", draw(tensors((b, t, hidden))), inline)
    elif kind == "step_done":
        msg.step_done.step, msg.step_done.micro_batch, msg.step_done.cloud_seconds = step, mb, draw(FLOATS)
    elif kind == "step_error":
        msg.step_error.step, msg.step_error.micro_batch = step, mb
        msg.step_error.code, msg.step_error.message = draw(CODES), draw(TEXT)
    else:
        c = msg.kr_command
        c.epoch = draw(st.one_of(st.just(1), U32))
        for name in ("active", "killed", "revived", "next_active"):
            getattr(c, name).extend(draw(st.lists(st.one_of(st.integers(0, layers), U32), max_size=layers + 1)))
    raw = _frame(msg, payloads)
    return draw(mutated(raw)) if mutate else raw


def good_exchange(b: int, t: int, hidden: int, width: int, layers: int) -> list[bytes]:
    """What a correct cloud sends for one training step of one (b, t) micro-batch with every layer
    FORWARD_BACKWARD, then the Kill-and-Revive command for epoch 1 (the device answers in between; the
    messages may all be queued at once)."""
    def framed(kind: str, field: str | None, shape: tuple[int, ...], **ids: int) -> bytes:
        msg = pb.CloudMessage(**{kind: ids})
        if field is None:
            return msg.SerializeToString()
        data = codecs.encode_into(getattr(getattr(msg, kind), field), torch.randn(shape), "float32")
        return frames.serialize(frames.Frame(msg, {field: bytes(data)}))

    out = [welcome(layers).SerializeToString()]
    out += [framed("lora_forward", "x", (b, t, hidden), layer=i) for i in range(layers)]
    out.append(framed("hidden", "hidden", (b, t, hidden)))
    out += [framed("lora_backward", "grad_output", (b, t, width), layer=i) for i in reversed(range(layers))]
    out.append(framed("step_done", None, ()))
    every = list(range(layers))
    out.append(pb.CloudMessage(kr_command=pb.KRCommand(epoch=1, active=every, next_active=every)).SerializeToString())
    return out


@st.composite
def cloud_scripts(draw: st.DrawFn, b: int, t: int, hidden: int, width: int,
                  layers: int) -> tuple[list[bytes], tuple[str, str] | None]:
    """What a cloud answers a Hello with: a correct step's exchange with one message replaced, dropped,
    repeated or added; or a correct Welcome (mostly) and up to 6 messages of any kind. And how the stream
    ends (None: OK, else a status code name and its details)."""
    first = draw(st.sampled_from(["edited"] * 4 + ["good"] * 4 + ["other", "none"]))
    if first == "edited":
        script = good_exchange(b, t, hidden, width, layers)
        i = draw(st.integers(0, len(script) - 1))
        other = draw(cloud_messages(b, t, hidden, width, layers))
        script[i:i + 1] = {"replace": [other], "drop": [], "repeat": [script[i]] * 2, "add": [other, script[i]],
                           "mutate": [draw(mutated(script[i]))]}[draw(st.sampled_from(["replace", "drop", "repeat", "add",
                                                                                        "mutate"]))]
        return script, draw(st.one_of(st.none(), st.none(), st.tuples(st.sampled_from(["INTERNAL", "UNAVAILABLE"]), TEXT)))
    script = {"good": [welcome(layers).SerializeToString()], "none": [],
              "other": [draw(cloud_messages(b, t, hidden, width, layers))]}[first]
    script += draw(st.lists(cloud_messages(b, t, hidden, width, layers), max_size=6))
    end = draw(st.one_of(st.none(), st.tuples(
        st.sampled_from(["INVALID_ARGUMENT", "UNAVAILABLE", "INTERNAL", "UNKNOWN", "RESOURCE_EXHAUSTED", "ABORTED"]), TEXT)))
    return script, end
