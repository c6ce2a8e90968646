"""Bad input in an adapter-protocol session is INVALID_ARGUMENT, and the session survives it (docs/security.md).

Each case runs over a real cloud in this process on a stream driven by hand (tests/raw_stream.py): an
adapter Hello, then what a correct device never sends (a StepWeights with the wrong length, codec, values
or module numbers; a StepBegin that does not fit the step its StepWeights opened). The cloud answers each
with a StepError INVALID_ARGUMENT in one line naming what is wrong, and the same stream then trains a good
step: Hidden (B, T, H), every trained module's gradient (LoraGrads) in the layout's shapes, StepDone. A bad
StepWeights leaves the stream's weight cache as it was (all or nothing). Hello settings out of range end the
stream at the handshake. A StepWeights is sized from the Hello's rank and the module numbers before anything is
allocated, so a header that claims hundreds of MB over a few bytes costs nothing.
"""

from __future__ import annotations

import dataclasses
import math

import grpc
import pytest
import torch
from raw_stream import RawStream, adapter_hello, hello, peak_rss_growth_under_limit, raw_channel, start_cloud

from cloud_server.adapter import WeightCache
from cloud_server.session import open_spec
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs, frames
from common.wire.adapter import AdapterLayout
from common.wire.protocol import AUTH_METADATA

H, L = 32, 2  # the tiny llama's hidden size and layers
TARGETS = ("self_attn.q_proj", "self_attn.v_proj")  # P = 2: module 2 * layer + t, t = 0 for q, 1 for v
LAYOUT = AdapterLayout(L, 4, ((32, 32), (32, 16)))  # adapter_hello's rank 4; q 32 -> 32, v 32 -> 16 (2 kv heads)
N, NUMEL = LAYOUT.num_modules, LAYOUT.total_numel(range(LAYOUT.num_modules))  # 4 modules, 896 elements
B, T = 2, 3  # every micro-batch here
MAX_MICRO_BATCHES, MAX_ADAPTER_MB = 4, 400
FB, FWD, ABSENT = pb.FORWARD_BACKWARD, pb.FORWARD, pb.ABSENT


@pytest.fixture(scope="module")
def adapter_cloud(tiny_dir, redis_url):
    """(model folder, a CloudServer in this process: --max-micro-batches 4, --max-adapter-mb 400), whose own
    widths give LAYOUT."""
    model_dir = tiny_dir("llama", layers=L)
    server = start_cloud(model_dir, redis_url, max_micro_batches=MAX_MICRO_BATCHES, max_adapter_mb=MAX_ADAPTER_MB,
                         step_timeout_s=30, hello_timeout_s=30)
    stack = server.servicer.stack
    assert tuple((stack.in_width(p), stack.out_width(p)) for p in TARGETS) == LAYOUT.shapes
    yield model_dir, server
    server.stop(0)


def weights(modules: list[int], seed: int = 0) -> torch.Tensor:
    """Non-zero A and B (so a delta, and every gradient, is non-zero) of `modules`, flat as on the wire."""
    return 0.3 * torch.randn(LAYOUT.total_numel(modules), generator=torch.Generator().manual_seed(seed))


def step_weights(step: int, modules: list[int] | None = None, *, train: bool = True, trained: list[int] | None = None,
                 micro_batches: int = 1, flat: torch.Tensor | None = None, codec: str = "float32",
                 seed: int = 0) -> pb.StepWeights:
    """A StepWeights of `modules` (default all), training all of them when `train` (unless `trained` says)."""
    modules = list(range(N)) if modules is None else modules
    trained = (modules if train else []) if trained is None else trained
    flat = weights(modules, seed) if flat is None else flat
    return pb.StepWeights(step=step, micro_batches=micro_batches, train=train, modules=modules, trained=trained,
                          weights=codecs.encode(flat, codec))


def step_begin(step: int, roles: list[int], *, train: bool = True, micro_batch: int = 0) -> pb.StepBegin:
    emb = torch.randn(B, T, H, generator=torch.Generator().manual_seed(100))
    return pb.StepBegin(step=step, micro_batch=micro_batch, train=train, layer_roles=roles,
                        embeddings=codecs.encode(emb, "float32"), attention_mask=codecs.encode(torch.ones(B, T), "uint8"))


def sw(*args: object, **kw: object) -> pb.EdgeMessage:
    return pb.EdgeMessage(step_weights=step_weights(*args, **kw))  # type: ignore[arg-type]


def sb(*args: object, **kw: object) -> pb.EdgeMessage:
    return pb.EdgeMessage(step_begin=step_begin(*args, **kw))  # type: ignore[arg-type]


def hidden_grad(step: int) -> pb.HiddenGrad:
    grad = torch.randn(B, T, H, generator=torch.Generator().manual_seed(200))
    return pb.HiddenGrad(step=step, grad=codecs.encode(grad, "float32"))


def session(channel: grpc.Channel, model_dir, **over: object) -> RawStream:
    s = RawStream(channel, timeout_s=60)
    s.send(hello=adapter_hello(model_dir, **over))
    welcome = s.recv()
    assert welcome.WhichOneof("kind") == "welcome" and welcome.welcome.step_protocol == pb.ADAPTER, welcome
    return s


def step_answers(s: RawStream, step: int, trained: list[int]) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """Read a one-micro-batch step's remaining answers: its StepDone, and LoraGrads until every trained module's
    gradient has come, once (in one message or several: the protocol lets the cloud send them layer by layer),
    each checked for step, ascending module numbers, codec and the layout's length. module -> (dA, dB)."""
    done, grads = 0, {}
    while not done or set(grads) != set(trained):
        reply = s.recv()
        kind = reply.WhichOneof("kind")
        if kind == "step_done":
            assert reply.step_done.step == step
            done += 1
            continue
        assert kind == "lora_grads", reply
        msg = reply.lora_grads
        modules = list(msg.modules)
        assert msg.step == step and modules == sorted(set(modules)) and not set(modules) & set(grads), msg.modules
        assert set(modules) <= set(trained), modules
        flat = codecs.decode(msg.grads, "LoraGrads", (LAYOUT.total_numel(modules),), "float32")
        grads.update(zip(modules, LAYOUT.unpack(flat, modules)))
    return grads


def good_step(s: RawStream, step: int, train: bool = True) -> torch.Tensor:
    """Weights of every module, one micro-batch, every layer FORWARD_BACKWARD (FORWARD when not training):
    Hidden (B, T, H), then (training) the gradient of every module in the layout's shapes, none all zero,
    and StepDone. Returns the hidden states."""
    s.send(step_weights=step_weights(step, train=train))
    s.send(step_begin=step_begin(step, [FB if train else FWD] * L, train=train))
    reply = s.recv()
    assert reply.WhichOneof("kind") == "hidden", reply
    assert list(reply.hidden.hidden.shape) == [B, T, H] and reply.hidden.step == step
    hidden = codecs.decode(reply.hidden.hidden, "Hidden", (B, T, H), "float32")
    if train:
        s.send(hidden_grad=hidden_grad(step))
    grads = step_answers(s, step, list(range(N)) if train else [])
    for m, (da, db) in grads.items():
        assert bool(da.abs().sum() > 0) and bool(db.abs().sum() > 0), f"module {m} got no gradient"
    return hidden


def step_error(s: RawStream, step: int) -> pb.StepError:
    """The next reply, which must be a one-line StepError INVALID_ARGUMENT for `step`."""
    reply = s.recv()
    assert reply.WhichOneof("kind") == "step_error", reply
    error = reply.step_error
    assert error.code == "INVALID_ARGUMENT" and error.step == step and "\n" not in error.message, error
    return error


# ---------------------------------------------------------------- StepWeights refused, the cache unchanged


def _bytes_short() -> pb.StepWeights:
    msg = step_weights(0)
    msg.weights.data = msg.weights.data[:-4]
    return msg


def _poisoned(step: int, value: float, seed: int = 0) -> pb.StepWeights:
    """Every module's weights, the last element `value` (NaN, Inf): raw float32 bytes, which codecs.encode refuses."""
    flat = weights(list(range(N)), seed)
    flat[-1] = value
    return pb.StepWeights(step=step, micro_batches=1, modules=range(N),
                          weights=pb.Tensor(shape=[NUMEL], codec=pb.FLOAT32, data=flat.numpy().tobytes()))


def _reshaped(shape: list[int]) -> pb.StepWeights:
    msg = step_weights(0)
    del msg.weights.shape[:]
    msg.weights.shape.extend(shape)
    return msg


BAD_WEIGHTS: dict[str, tuple[pb.StepWeights, str]] = {  # name -> (a StepWeights of step 0, words of its StepError)
    "4 bytes short": (_bytes_short(), f"{NUMEL * 4 - 4} data bytes, expected {NUMEL * 4}"),
    "one element too many": (_reshaped([NUMEL + 1]), f"shape ({NUMEL + 1},), expected ({NUMEL},)"),
    "2-D": (_reshaped([NUMEL, 1]), f"shape ({NUMEL}, 1), expected ({NUMEL},)"),
    "bfloat16 in a float32 session": (step_weights(0, codec="bfloat16"), "codec bfloat16, expected float32"),
    "int8": (step_weights(0, codec="int8"), "codec int8, expected float32"),
    "NaN": (_poisoned(0, math.nan), "NaN or Inf"),
    "Inf": (_poisoned(0, -math.inf), "NaN or Inf"),
    "module out of range": (step_weights(0, [0, N]), f"modules: module numbers must be below {N}"),
    "module 2**32-1": (step_weights(0, [2**32 - 1], flat=torch.zeros(8)), "must be below"),
    "module repeated": (step_weights(0, [1, 1], flat=weights([1, 1])), "strictly ascending"),
    "modules unordered": (step_weights(0, [1, 0], flat=weights([0, 1])), "strictly ascending"),
    "trained out of range": (step_weights(0, trained=[0, N]), "trained: module numbers must be below"),
    "trained unordered": (step_weights(0, trained=[2, 1]), "trained: module numbers must be strictly"),
    "trained never sent": (step_weights(0, [0, 1], trained=[0, 2]), "gradient of module 2, whose weights it never sent"),
    "trained in a step that does not train": (step_weights(0, train=False, trained=[0]),
                                              "names trained modules in a step that does not train"),
    "0 micro-batches": (step_weights(0, micro_batches=0),
                        f"micro_batches 0, this cloud takes 1..{MAX_MICRO_BATCHES} (--max-micro-batches)"),
    "over --max-micro-batches": (step_weights(0, micro_batches=MAX_MICRO_BATCHES + 1),
                                 f"micro_batches {MAX_MICRO_BATCHES + 1}, this cloud takes"),
    "2**32-1 micro-batches": (step_weights(0, micro_batches=2**32 - 1), "--max-micro-batches"),
}


@pytest.mark.parametrize("name", list(BAD_WEIGHTS))
def test_a_bad_step_weights_is_refused_and_the_session_goes_on(name, adapter_cloud):
    """Each bad StepWeights (table BAD_WEIGHTS) is a StepError INVALID_ARGUMENT in one line naming what is
    wrong (and its flag where one sets the limit); the same stream then trains a good step."""
    model_dir, server = adapter_cloud
    bad, words = BAD_WEIGHTS[name]
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = session(channel, model_dir)
    s.send(step_weights=bad)
    assert words in step_error(s, 0).message
    good_step(s, 1)
    assert s.finish().code == grpc.StatusCode.OK
    channel.close()


def test_a_refused_step_weights_leaves_the_cache_as_it_was(adapter_cloud):
    """All or nothing: a StepWeights of every module whose last value is NaN changes none of them. An
    evaluation step with the weights W, then the refused message (new values W2 but for the NaN), then a step
    that sends no weights: its hidden states equal the first step's bit for bit; a step with W2 (valid) then
    differs, so the weights do reach the hidden states."""
    model_dir, server = adapter_cloud
    every = list(range(N))
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = session(channel, model_dir)

    def evaluate(step: int, modules: list[int], flat: torch.Tensor) -> torch.Tensor:
        s.send(step_weights=step_weights(step, modules, train=False, flat=flat))
        s.send(step_begin=step_begin(step, [FWD] * L, train=False))
        reply = s.recv()
        assert reply.WhichOneof("kind") == "hidden", reply
        assert s.recv().WhichOneof("kind") == "step_done"
        return codecs.decode(reply.hidden.hidden, "Hidden", (B, T, H), "float32")

    first = evaluate(0, every, weights(every, seed=1))
    s.send(step_weights=_poisoned(1, math.nan, seed=2))
    assert "NaN or Inf" in step_error(s, 1).message
    assert torch.equal(evaluate(2, [], torch.empty(0)), first)
    assert not torch.equal(evaluate(3, every, weights(every, seed=2)), first)
    assert s.finish().code == grpc.StatusCode.OK
    channel.close()


# ---------------------------------------------------------------- StepBegins that do not fit their StepWeights


NO_TRAIN = {"train": False}
# name -> (what the device sends, with the replies it awaits in between (a list of kinds); the step and the
# words of the StepError that follows)
BAD_BEGINS: dict[str, tuple[list[pb.EdgeMessage | list[str]], int, str]] = {
    "no StepWeights yet": ([sb(0, [FWD] * L, **NO_TRAIN)], 0,
                           "an adapter session sends StepWeights before its StepBegins"),
    "another step": ([sw(0), sb(1, [FB] * L)], 1, "the last StepWeights was for step 0"),
    "micro-batch index >= announced": ([sw(0, micro_batches=2), sb(0, [FB] * L, micro_batch=2)], 0,
                                       "StepWeights announced 2 micro-batches"),
    "train flag mismatch": ([sw(0), sb(0, [FB] * L, **NO_TRAIN)], 0, "train=False, its StepWeights said train=True"),
    "present layer without weights": ([sw(0, [0, 1, 3], **NO_TRAIN), sb(0, [FWD, FWD], **NO_TRAIN)], 0,  # not 2
                                      "layer 1 is present but the weights of its self_attn.q_proj were never sent"),
    "trained module outside backward": ([sw(0), sb(0, [FB, FWD])], 0,  # every module trained, layer 1 FORWARD
                                        "gradient of module 2, whose layer 1 does not take part in backward"),
    "micro-batch run twice": ([sw(0, micro_batches=2, **NO_TRAIN), sb(0, [FWD] * L, **NO_TRAIN), ["hidden", "step_done"],
                               sb(0, [FWD] * L, **NO_TRAIN)], 0, "step 0 micro-batch 0 was already run"),
    "StepWeights while a micro-batch runs": ([sw(0), sb(0, [FB] * L), ["hidden"], sw(1)], 1,  # it awaits HiddenGrad
                                             "StepWeights of step 1 while micro-batches are still running"),
}


@pytest.mark.parametrize("name", list(BAD_BEGINS))
def test_a_step_begin_that_does_not_fit_its_step_weights_is_refused(name, adapter_cloud):
    """Each case of BAD_BEGINS is a StepError INVALID_ARGUMENT in one line naming what is wrong; the same
    stream then trains a good step (a micro-batch left waiting for its HiddenGrad first gets it and ends
    with its gradients and StepDone)."""
    model_dir, server = adapter_cloud
    script, step, words = BAD_BEGINS[name]
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = session(channel, model_dir)
    for item in script:
        if isinstance(item, list):
            assert [s.recv().WhichOneof("kind") for _ in item] == item
        else:
            s.send(item)
    assert words in step_error(s, step).message
    if name == "StepWeights while a micro-batch runs":
        s.send(hidden_grad=hidden_grad(0))
        assert len(step_answers(s, 0, list(range(N)))) == N
    good_step(s, 5)
    assert s.finish().code == grpc.StatusCode.OK
    channel.close()


def test_step_weights_in_a_layerwise_session_are_refused(adapter_cloud):
    """A layerwise session has no weight cache: a StepWeights is a StepError naming step_protocol ADAPTER,
    and the session's layerwise steps go on."""
    model_dir, server = adapter_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = RawStream(channel, timeout_s=60)
    s.send(hello=hello(model_dir))
    assert s.recv().welcome.step_protocol == pb.LAYERWISE
    s.send(step_weights=step_weights(0))
    assert "StepWeights in a layerwise session; open it with step_protocol ADAPTER" in step_error(s, 0).message
    s.send(step_begin=step_begin(0, [ABSENT] * L, train=False))
    assert [s.recv().WhichOneof("kind") for _ in range(2)] == ["hidden", "step_done"]
    assert s.finish().code == grpc.StatusCode.OK
    channel.close()


# ---------------------------------------------------------------- the Hello's LoRA settings


@pytest.mark.parametrize("over,words", [
    ({"lora_rank": 0}, "lora_rank must be >= 1"),
    ({"lora_alpha": math.nan}, "lora_alpha must be finite and > 0"),
    ({"lora_alpha": math.inf}, "lora_alpha must be finite and > 0"),
    ({"lora_alpha": 0.0}, "lora_alpha must be finite and > 0"),
    ({"lora_alpha": -8.0}, "lora_alpha must be finite and > 0"),
    ({"lora_dropout": 1.0}, "lora_dropout must be in [0, 1)"),
    ({"lora_dropout": -0.1}, "lora_dropout must be in [0, 1)"),
    ({"lora_dropout": math.nan}, "lora_dropout must be in [0, 1)"),
    ({"codec_weights": pb.INT8_BLOCKWISE}, "codec_weights must be one of float32, bfloat16"),
    ({"codec_weights": pb.FLOAT16}, "codec_weights must be one of float32, bfloat16"),
    ({"codec_weights": pb.UINT8}, "codec_weights must be one of float32, bfloat16"),
    ({"codec_weights": 99}, "codec_weights must be one of float32, bfloat16"),
    ({"step_protocol": 7}, "step_protocol 7: this cloud speaks layerwise, adapter"),
], ids=lambda v: str(v) if isinstance(v, str) else "-".join(f"{k}={w}" for k, w in v.items()))
def test_bad_lora_settings_are_refused_at_the_hello(over, words, adapter_cloud):
    """LoRA settings out of range end the stream at the handshake with INVALID_ARGUMENT in one line (before
    the session holds anything)."""
    model_dir, server = adapter_cloud
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = RawStream(channel, timeout_s=60)
    s.send(hello=adapter_hello(model_dir, **over))
    end = s.finish()
    assert end.code == grpc.StatusCode.INVALID_ARGUMENT and words in end.details and "\n" not in end.details, end
    assert not end.replies
    channel.close()


def test_an_adapter_over_max_adapter_mb_is_refused_at_the_hello(adapter_cloud):
    """--max-adapter-mb 400 (float32 bytes of every module's A and B): the largest rank within it is
    welcomed, one more is refused naming the flag and what to lower; so is rank 2**32-1 (no overflow)."""
    model_dir, server = adapter_cloud
    per_rank = 4 * NUMEL // LAYOUT.rank  # bytes of the whole adapter per unit of rank
    largest = MAX_ADAPTER_MB * 2**20 // per_rank
    channel = raw_channel(f"127.0.0.1:{server.port}")
    session(channel, model_dir, lora_rank=largest).finish()
    for rank in (largest + 1, 2**32 - 1):
        s = RawStream(channel, timeout_s=60)
        s.send(hello=adapter_hello(model_dir, lora_rank=rank))
        end = s.finish()
        assert end.code == grpc.StatusCode.INVALID_ARGUMENT, end
        assert f"a rank-{rank} adapter on 2 targets x {L} layers" in end.details
        assert f"at most {MAX_ADAPTER_MB} MB per session (--max-adapter-mb); lower --rank" in end.details
    channel.close()


# ---------------------------------------------------------------- memory


def test_a_weights_header_bomb_is_refused_without_allocating(adapter_cloud):
    """A Hello of rank 400,000 (a 342 MB adapter, within --max-adapter-mb 400) holds nothing. StepWeights
    claiming every module (342 MB) over 16 bytes, one module's 25.6 M elements in bfloat16 over 16 bytes, a
    shape of 2**62 elements, and an int8 tensor with a 2**32-1 block size: each a StepError INVALID_ARGUMENT,
    the cloud's peak RSS growing < 50 MB over all of them (codec, shape and byte length are checked against
    the module numbers before anything is decoded); the session then runs a step without LoRA."""
    model_dir, server = adapter_cloud
    rank = 400_000
    layout = dataclasses.replace(LAYOUT, rank=rank)
    every = list(range(N))
    assert 4 * layout.total_numel(every) > 300 * 2**20
    channel = raw_channel(f"127.0.0.1:{server.port}")
    s = session(channel, model_dir, lora_rank=rank)

    def without_lora(step: int) -> None:
        s.send(step_weights=pb.StepWeights(step=step, micro_batches=1, weights=codecs.encode(torch.empty(0), "float32")))
        s.send(step_begin=step_begin(step, [ABSENT] * L, train=False))
        assert [s.recv().WhichOneof("kind") for _ in range(2)] == ["hidden", "step_done"]

    without_lora(0)  # warm: what a first step allocates is not the bombs'
    one = layout.total_numel([0])
    bombs = [  # (modules, the weights' header over 16 bytes, words of the StepError)
        (every, {"shape": [layout.total_numel(every)], "codec": pb.FLOAT32},
         f"16 data bytes, expected {4 * layout.total_numel(every)}"),
        ([0], {"shape": [one], "codec": pb.BFLOAT16}, "codec bfloat16, expected float32"),
        ([0], {"shape": [2**62], "codec": pb.FLOAT32}, f"shape ({2**62},), expected ({one},)"),
        ([0], {"shape": [one], "codec": pb.INT8_BLOCKWISE, "block_size": 2**32 - 1, "scales": bytes(4)},
         "codec int8, expected float32"),
    ]
    with peak_rss_growth_under_limit():
        for step, (modules, header, words) in enumerate(bombs, 1):
            s.send(step_weights=pb.StepWeights(step=step, micro_batches=1, train=True, modules=modules, trained=modules,
                                               weights=pb.Tensor(data=bytes(16), **header)))
            assert words in step_error(s, step).message
    without_lora(5)
    assert s.finish().code == grpc.StatusCode.OK
    channel.close()


def test_cached_weights_own_their_memory(adapter_cloud):
    """What the stream's cache keeps of a StepWeights is each module's A and B, not views into the received
    message: otherwise one module left unchanged (a killed one) keeps its whole message alive, and a device
    that resends every module but one each step makes the cloud hold up to one message per module (P x L
    adapters) instead of one adapter, past --max-adapter-mb. The message is parsed as the server parses it
    (tensor bytes framed after the message, read in place)."""
    model_dir, server = adapter_cloud
    every = list(range(N))
    spec = open_spec(adapter_hello(model_dir), server.servicer.stack, "0" * 32).lora
    cache = WeightCache(spec, server.servicer.stack.device)
    msg = sw(0, train=False)
    data = msg.step_weights.weights.data
    msg.step_weights.weights.ClearField("data")
    frame = frames.parse(frames.serialize(frames.Frame(msg, {"weights": data})), pb.EdgeMessage)
    assert isinstance(frame.payloads["weights"], memoryview)  # read in place, as the server reads it
    cache.update(frame, MAX_MICRO_BATCHES)
    for m in every:
        for w in cache.weights[m]:
            held = w.untyped_storage().nbytes()
            assert held == 4 * w.numel(), f"module {m}: a {tuple(w.shape)} tensor keeps {held} bytes alive"
    expected = LAYOUT.unpack(weights(every), every)
    for m in every:
        assert all(torch.equal(w, e) for w, e in zip(cache.weights[m], expected[m]))


# ---------------------------------------------------------------- tokens


def test_a_revoked_tokens_step_weights_end_the_stream_before_they_are_read(tiny_dir, redis_url):
    """Under --auth token the token is checked before a StepWeights too, not only before a StepBegin: after
    `token revoke`, the device's next StepWeights (here one the cloud would otherwise answer with a StepError)
    ends the stream UNAUTHENTICATED, before the cloud decodes or holds its weights (before: the weights were
    decoded and cached for the revoked device, and only its StepBegin ended the stream)."""
    import redis

    from cloud_server.tokens import TokenStore

    model_dir = tiny_dir("llama", layers=L)
    server = start_cloud(model_dir, redis_url, auth="token")
    tokens = TokenStore(redis.Redis.from_url(redis_url))
    channel = raw_channel(f"127.0.0.1:{server.port}")
    try:
        s = RawStream(channel, timeout_s=15, metadata=((AUTH_METADATA, f"Bearer {tokens.add('adapter-box')}"),))
        s.send(hello=adapter_hello(model_dir))
        assert s.recv().WhichOneof("kind") == "welcome"
        good_step(s, 0)
        tokens.revoke("adapter-box")
        s.send(step_weights=_bytes_short())
        end = s.drain()
        assert end.code == grpc.StatusCode.UNAUTHENTICATED and "'adapter-box' was revoked" in end.details, end
        assert not end.replies
    finally:
        channel.close()
        server.stop(0)
