"""`--edge-layers k`: the device runs decoder blocks 0..k-1 and their LoRA, the cloud starts at block k.

The golden test compares with PEFT itself (`peft.get_peft_model` on the whole model, PEFT's own non-zero init
`init_lora_weights=False`), reusing test_golden_peft's reference: loss and every LoRA gradient at rtol 1e-5
(atol 3e-5 x the tensor's largest element), for every family and both step protocols. The tolerance holds for
the reason that module docstring gives: the split runs the same float32 operations on the same numbers as PEFT
(the device's block is the Hugging Face block itself, its LoRA the same s * B(A(dropout(x))) with the same keyed
masks; the float32 wire carries every value exactly), only some sums run in another order (the cloud adds the
delta; micro-batches add their partial gradients; InputGrad is added into the device's graph after the cloud's
backward); reordering a float32 sum moves it by ~1e-7 of the sum of its absolute terms, 100x below the
tolerance and ~1000x below what a missing gradient path, a wrong mask or a wrong scale changes. The device
block's LoRA gradient is reached only through InputGrad, so a missing or wrong InputGrad fails the test.

Also: the device holds exactly k blocks; its blocks' LoRA never crosses the wire (no layer call names them, no
StepWeights carries them); a flag or Hello out of range is refused before any work; a broken InputGrad from a
cloud is a one-line ProtocolError.
"""

from __future__ import annotations

import gc

import grpc
import pytest
import torch
from raw_stream import RawStream, hello, raw_channel
from test_fuzz_device import FakeCloud
from test_golden_peft import PeftReference, assert_same_step, make_batch, sgd_both, split_for
from tiny_models import FAMILIES
from wire_strategies import welcome

from common.config import KillMode
from common.errors import ProtocolError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs, frames
from edge_client.app.cli import main as dlora_main
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import Batch
from edge_client.train.kill_revive import layer_roles
from edge_client.train.model_parts import EdgeModel

# (layers, edge layers k) -> (active modules, kill mode) per step.
# 2 layers, k = 1: all; the device's layer killed (each mode); the cloud's layer killed.
# 3 layers, k = 2: a killed device layer above an active one (the gradient must still pass its frozen path),
# between two active ones, and below the lowest active one on the cloud.
CASES: dict[tuple[int, int], list[tuple[set[int], KillMode]]] = {
    (2, 1): [
        ({0, 1}, "detached"),
        ({1}, "frozen"),
        ({1}, "detached"),
        ({1}, "dropped"),
        ({0}, "frozen"),
        ({0}, "dropped"),
    ],
    (3, 2): [({0, 2}, "detached"), ({0}, "frozen"), ({0}, "dropped"), ({2}, "detached")],
}


def edge_step(split: SplitEngine, batch: Batch, step: int, active: set[int], mode: KillMode, m: int) -> tuple:
    """The split's step, with the wire checks of --edge-layers: layer calls and StepWeights name only the cloud's
    layers, and an InputGrad comes for each micro-batch iff a device layer takes part in backward."""
    for p in split.parameters():
        p.grad = None
    split.set_active(active, mode)
    roles = layer_roles(active, split.num_layers, mode)
    loss, traffic = split.train_step(batch, step, roles)
    msgs = traffic.messages
    k = split.edge.edge_layers
    trains_below = pb.FORWARD_BACKWARD in roles[:k]
    assert msgs.get("down:input_grad", 0) == (m if trains_below else 0), msgs
    groups = sum(1 for g in split.edge.groups if g)
    cloud_present = sum(r != pb.ABSENT for r in roles[k:])
    if split.link.protocol == "adapter":
        assert not any(kind.endswith(("lora_forward", "lora_backward")) for kind in msgs), msgs
        assert msgs.get("down:lora_grads", 0) == len({i for i in active if i >= k}), msgs
        assert all(split.adapter.layout.layer_of(mod) >= k for mod in split.link.cloud_holds), "device LoRA was sent"
    else:  # one LoraForward per group of each present cloud layer, none for the device's
        assert msgs.get("down:lora_forward", 0) == m * groups * cloud_present, msgs
    return loss, {k: p.grad for k, p in split.adapter.named_lora_parameters()}


@pytest.mark.parametrize("layers,k", list(CASES), ids=lambda v: str(v))
@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
@pytest.mark.parametrize("family", FAMILIES)
def test_edge_layers_equal_peft(family, protocol, layers, k, tiny_dir, cloud, tmp_path):
    """--edge-layers 1 on a 2-layer model (and 2 on a 3-layer one), M = 2 micro-batches of unequal width, LoRA
    dropout 0.1, over the kill modes with the device's and the cloud's layers killed in turn: loss and every LoRA
    gradient equal PEFT's on the whole model (the module docstring's tolerances). Between steps the same SGD
    update on both sides, so later steps run with new non-zero B (and the adapter protocol sends changed
    weights)."""
    model_dir = tiny_dir(family, layers=layers)
    ref = PeftReference(model_dir, family, dropout=0.1, init_seed=21)
    split = split_for(
        model_dir,
        family,
        cloud(model_dir),
        tmp_path,
        ref,
        dropout=0.1,
        micro_batches=2,
        protocol=protocol,
        edge_layers=k,
    )
    assert split.edge.blocks is not None
    batch = make_batch(model_dir)
    ours, theirs = dict(split.adapter.named_lora_parameters()), ref.weights()
    try:
        for step, (active, mode) in enumerate(CASES[(layers, k)]):
            ref.set_active(active, mode)
            want = ref.step(batch, step, 2)
            got = edge_step(split, batch, step, active, mode, 2)
            assert_same_step(f"{family} {protocol} k={k} {mode} active={sorted(active)}", active, got, want)
            sgd_both(theirs, ours)
    finally:
        split.close()


# -- what the device holds


def test_device_holds_exactly_its_edge_blocks(tiny_dir):
    """k = 1 of 3 layers: the device's blocks are block 0 only (its own tensors, read from the folder: equal to
    the checkpoint's), and resident_bytes grows by exactly that block (plus the rotary tables it makes)."""
    from safetensors.torch import load_file

    model_dir = tiny_dir("llama", layers=3)
    bare, edge = EdgeModel(model_dir), EdgeModel(model_dir, edge_layers=1)
    assert bare.blocks is None and edge.blocks is not None
    assert len(edge.blocks.model.layers) == 1
    names = {n for n, _ in edge.blocks.model.named_parameters()}
    assert names and all(n.startswith("layers.0.") for n in names), sorted(names)  # no norm, no embedding table
    stored = load_file(str(model_dir / "model.safetensors"))
    for name, p in edge.blocks.model.named_parameters():
        torch.testing.assert_close(p, stored["model." + name.replace(".base.", ".")], rtol=0, atol=0)
    block = sum(t.numel() * t.element_size() for t in (*edge.blocks.parameters(), *edge.blocks.buffers()))
    assert edge.resident_bytes() == bare.resident_bytes() + block


# -- bad input, refused before any work


def test_edge_layers_out_of_range_is_one_line_before_any_work(tiny_dir, data_file, tmp_path, capsys):
    """dlora train/eval --edge-layers k: k >= the model's layers names the flag, k and the layer count; a negative
    k is the flag's own error. Neither reaches the cloud (127.0.0.1:1 would refuse the connection)."""
    model = tiny_dir("llama", layers=3)
    items = tmp_path / "items.jsonl"
    items.write_text('{"prompt": "1 + 1 =", "choices": [" 2", " 3"], "answer": 0}\n')
    train = [
        "train",
        "--cloud",
        "127.0.0.1:1",
        "--model",
        str(model),
        "--data",
        str(data_file),
        "--output",
        str(tmp_path / "o"),
        "--connect-timeout",
        "2",
        "--no-progress",
    ]
    for argv, words in [
        (train + ["--edge-layers", "3"], ["--edge-layers=3", "has 3 decoder layers", "0..2"]),
        (train + ["--edge-layers", "-1"], ["--edge-layers=-1:", "greater than or equal to 0"]),
        (
            [
                "eval",
                "--cloud",
                "127.0.0.1:1",
                "--model",
                str(model),
                "--data",
                str(items),
                "--no-progress",
                "--edge-layers",
                "7",
            ],
            ["--edge-layers=7", "has 3 decoder layers"],
        ),
    ]:
        code = dlora_main(argv)
        err = capsys.readouterr().err.strip()
        lines = [line for line in err.splitlines() if line.startswith("dlora")]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert all(w in lines[0] for w in words), lines[0]


def test_hello_with_too_many_edge_layers_is_invalid_argument(tiny_dir, cloud):
    """A Hello whose edge_layers leave the cloud no layer (3 of 3, or more) ends the stream INVALID_ARGUMENT in
    one line; 2 of 3 is welcome."""
    model_dir = tiny_dir("llama", layers=3)
    address = cloud(model_dir)
    for k, code in [
        (3, grpc.StatusCode.INVALID_ARGUMENT),
        (2**31, grpc.StatusCode.INVALID_ARGUMENT),
        (2, grpc.StatusCode.OK),
    ]:
        stream = RawStream(raw_channel(address), timeout_s=30)
        stream.send(hello=hello(model_dir, edge_layers=k))
        end = stream.finish()
        assert end.code == code, (k, end.code, end.details)
        if code == grpc.StatusCode.OK:
            assert end.replies[0].welcome.num_layers == 3
        else:
            assert f"edge_layers {k}" in end.details and "3 layers" in end.details and "\n" not in end.details


def test_adapter_weights_of_an_edge_layer_are_refused(tiny_dir, cloud):
    """Adapter protocol with edge_layers 1: a StepWeights carrying (or asking the gradient of) a module of layer
    0 is answered with a StepError INVALID_ARGUMENT; the session stays usable."""
    from raw_stream import adapter_hello

    model_dir = tiny_dir("llama", layers=3)
    stream = RawStream(raw_channel(cloud(model_dir)), timeout_s=30)
    stream.send(hello=adapter_hello(model_dir, edge_layers=1))
    assert stream.recv().WhichOneof("kind") == "welcome"
    a_b = torch.zeros(4 * 32 + 32 * 4)  # one module: A (4, 32) and B (32, 4) of the tiny llama's q_proj
    for modules, trained in [([0], []), ([2], [0])]:
        stream.send(
            step_weights=pb.StepWeights(
                step=0,
                micro_batches=1,
                train=True,
                modules=modules,
                trained=trained,
                weights=codecs.encode(a_b, "float32"),
            )
        )
        reply = stream.recv()
        assert reply.WhichOneof("kind") == "step_error", reply
        assert reply.step_error.code == "INVALID_ARGUMENT" and "edge runs itself" in reply.step_error.message
    assert stream.finish().code == grpc.StatusCode.OK


# -- a broken cloud, seen from the device

B, T, H, WIDTH = 1, 4, 32, 48  # micro-batch, the tiny llama's hidden size, q + v output width


@pytest.fixture(scope="module")
def edge_device(tiny_dir):
    """(EdgeModel with one edge block of 2, its LoraAdapter, a FakeCloud)."""
    from edge_client.train.lora import LoraAdapter

    edge = EdgeModel(tiny_dir("llama", layers=2), ("q_proj", "v_proj"), edge_layers=1)
    fake = FakeCloud()
    yield edge, LoraAdapter(edge, 4, 8.0, 0.0), fake
    fake.server.stop(0)


def _framed(
    kind: str, field: str | None = None, tensor: torch.Tensor | None = None, codec: str = "float32", **ids: int
) -> bytes:
    """A CloudMessage of `kind` on the wire; a tensor with NaN goes as its raw float32 bytes (encode refuses it)."""
    msg = pb.CloudMessage(**{kind: ids})
    if field is None:
        return msg.SerializeToString()
    finite = tensor.nan_to_num(0.0) if tensor is not None else None
    data = bytes(codecs.encode_into(getattr(getattr(msg, kind), field), finite, codec))
    if tensor is not None and not bool(tensor.isfinite().all()):
        data = tensor.numpy().tobytes()
    return frames.serialize(frames.Frame(msg, {field: data}))


def _script(input_grad: list[bytes], lora_layer: int = 1) -> list[bytes]:
    """A cloud's answer to one training step with both layers FORWARD_BACKWARD, InputGrad replaced by `input_grad`."""
    return [
        welcome(2).SerializeToString(),
        _framed("lora_forward", "x", torch.randn(B, T, H), layer=lora_layer),
        _framed("hidden", "hidden", torch.randn(B, T, H)),
        _framed("lora_backward", "grad_output", torch.randn(B, T, WIDTH), layer=lora_layer),
        *input_grad,
        _framed("step_done"),
    ]


def _device_step(edge_device) -> str:
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import MicroBatch, RemoteStep

    edge, lora, fake = edge_device
    link = CloudLink(
        LinkConfig(
            address=f"127.0.0.1:{fake.port}",
            codec_up="float32",
            codec_down="float32",
            connect_timeout_s=10,
            reply_timeout_s=5,
        ),
        edge,
    )
    lora.zero_grad(set_to_none=True)
    roles = [pb.FORWARD_BACKWARD] * 2
    try:
        link.open()
        ids, mask = torch.randint(0, 250, (B, T)), torch.ones(B, T, dtype=torch.long)
        with torch.enable_grad():
            up = edge.up(ids, mask, lora, roles, (0, 0))  # (B, T, H), attached to block 0's LoRA
        RemoteStep(link, lora, step=0, roles=roles, train=True, head=lambda mb, h: torch.ones_like(h) / h.numel()).run(
            [MicroBatch(up, mask, source=up)]
        )
        return "ok"
    except ProtocolError as e:
        assert "\n" not in str(e), str(e)
        return f"ProtocolError: {e}"
    finally:
        link.close(drain_s=0.5)


def test_good_input_grad_trains_the_edge_block(edge_device):
    """The fake cloud's exchange with a well-formed InputGrad: block 0's LoRA gets its gradient from it."""
    edge, lora, fake = edge_device
    fake.script, fake.end = _script([_framed("input_grad", "grad", torch.randn(B, T, H))]), None
    assert _device_step(edge_device) == "ok"
    assert lora.pairs[0].B.grad is not None and bool(lora.pairs[0].B.grad.any())  # B starts at 0: dA is 0


@pytest.mark.parametrize(
    "name,input_grad,lora_layer,words",
    [
        ("missing", [], 1, "without the InputGrad"),
        ("twice", [_framed("input_grad", "grad", torch.randn(B, T, H))] * 2, 1, "expects none"),
        ("wrong width", [_framed("input_grad", "grad", torch.randn(B, T, H + 1))], 1, "InputGrad"),
        ("wrong tokens", [_framed("input_grad", "grad", torch.randn(B, T + 3, H))], 1, "InputGrad"),
        ("wrong codec", [_framed("input_grad", "grad", torch.randn(B, T, H), codec="bfloat16")], 1, "InputGrad"),
        ("not finite", [_framed("input_grad", "grad", torch.full((B, T, H), float("nan")))], 1, "InputGrad"),
        ("other micro-batch", [_framed("input_grad", "grad", torch.randn(B, T, H), micro_batch=3)], 1, "step 0/3"),
        ("layer call for the device's layer", [_framed("input_grad", "grad", torch.randn(B, T, H))], 0, "layer 0"),
    ],
)
def test_broken_input_grad_is_a_protocol_error(name, input_grad, lora_layer, words, edge_device):
    """A cloud that sends no InputGrad, two, one of the wrong shape, codec or values, or for another micro-batch,
    or asks for the LoRA of a layer the device runs itself: a one-line ProtocolError, nothing else."""
    _, _, fake = edge_device
    fake.script, fake.end = _script(input_grad, lora_layer), None
    outcome = _device_step(edge_device)
    assert outcome.startswith("ProtocolError") and words in outcome, (name, outcome)
    gc.collect()


# -- Kill-and-Revive over the device's and the cloud's layers


@pytest.mark.parametrize("protocol,mode", [("layerwise", "detached"), ("adapter", "frozen")])
def test_kill_and_revive_spans_the_edge_layers(protocol, mode, tiny_dir, cloud, data_file, tmp_path, monkeypatch):
    """--edge-layers 2 of 4, --epochs 3 --budget 2 --revive 1: the cloud's scheduler decides over all four layers
    and the device's layers obey it like the cloud's (a killed one gets no gradient, a revived one trains again),
    so every epoch's Δs and decisions equal local-train's (plain PEFT on the whole model).

    As in test_kill_revive's six-layer test, the trainer runs SGD, linear in the gradient, so the split's and
    local Δs (norms of lr x sums of gradients equal to float32 precision) agree to ~1e-5 relative (asserted 1e-4),
    and the decisions agree because every logged Δ lies more than 1e-3 from every other one (asserted)."""
    import json

    from common.config import TrainConfig
    from edge_client.train.engines import LocalEngine
    from edge_client.train.trainer import train

    monkeypatch.setattr(torch.optim, "AdamW", lambda params, lr, weight_decay=0.0: torch.optim.SGD(params, lr=lr))
    model_dir = tiny_dir("llama", layers=4)
    address = cloud(model_dir)
    logs = {}
    for kind in ("split", "local"):
        cfg = TrainConfig(
            model=model_dir,
            data=data_file,
            output=tmp_path / kind,
            epochs=3,
            warmup_epochs=1,
            budget=2,
            revive=1,
            batch_size=4,
            lr=3e-2,
            kill_mode=mode,
            progress=False,
            **({"cloud": address, "protocol": protocol, "edge_layers": 2} if kind == "split" else {}),
        )
        engine = SplitEngine(cfg) if kind == "split" else LocalEngine(cfg)
        try:
            train(cfg, engine)
        finally:
            engine.close()
        logs[kind] = [json.loads(line) for line in (cfg.output / "kr_log.jsonl").read_text().splitlines()]
    split, local = logs["split"], logs["local"]
    assert [d["next_active"] for d in split] == [d["next_active"] for d in local]
    for a, b in zip(split, local):
        assert a["deltas"].keys() == b["deltas"].keys()
        for k in a["deltas"]:
            assert a["deltas"][k] == pytest.approx(b["deltas"][k], rel=1e-4)
    deltas = sorted(v for d in split for v in d["deltas"].values())
    assert all(hi - lo > 1e-3 * hi for lo, hi in zip(deltas, deltas[1:])), f"near-tie among the deltas {deltas}"
    # the decisions move modules across the device/cloud boundary (layers 0-1 on the device, 2-3 on the cloud)
    actives = [set(d["next_active"]) for d in split]
    assert any(a & {0, 1} for a in actives) and any(a & {2, 3} for a in actives), actives
    assert any(d["revived"] for d in split)


# -- evaluation, and a device-mapped cloud


def test_eval_through_edge_layers_equals_the_whole_cloud(tiny_dir, cloud, tmp_path):
    """RemoteStack (dlora eval's forward) with --edge-layers 1 of 3, in both protocols, with an adapter of
    non-zero B: the final hidden states equal those of the whole stack on the cloud (k = 0) to float32
    round-off (the same operations; the cloud adds some deltas in another order), and differ from the base
    model's; `dlora eval --edge-layers 1` scores as `dlora eval` does."""
    import json

    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import RemoteStack
    from edge_client.train.lora import LoraAdapter

    model_dir = tiny_dir("llama", layers=3)
    address = cloud(model_dir)
    hidden = {}
    for k in (0, 1):
        edge = EdgeModel(model_dir, ("q_proj", "v_proj"), edge_layers=k)
        adapter = LoraAdapter(edge, 4, 8.0, 0.0, seed=1)
        gen = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for pair in adapter.pairs:
                pair.B.copy_(0.5 * torch.randn(pair.B.shape, generator=gen))
        if k == 0:
            adapter.save(tmp_path / "adapter")
        ids = torch.tensor([edge.tokenizer("The cat sat on the mat.")["input_ids"]])
        for protocol, lora in (("layerwise", adapter), ("adapter", adapter), ("base", None)):
            link = CloudLink(
                LinkConfig(
                    address=address,
                    codec_up="float32",
                    codec_down="float32",
                    protocol="adapter" if protocol == "adapter" else "layerwise",
                ),
                edge,
                lora=lora,
            )
            link.open()
            roles = [pb.FORWARD if lora is not None else pb.ABSENT] * edge.num_layers
            hidden[(k, protocol)] = RemoteStack(link, lora).forward(edge.embed(ids), torch.ones_like(ids), roles)
            link.close()
    ref = hidden[(0, "layerwise")]
    for key, h in hidden.items():
        want = hidden[(0, "base")] if key[1] == "base" else ref
        torch.testing.assert_close(
            h, want, rtol=1e-5, atol=1e-6 * float(want.abs().max()), msg=lambda m, key=key: f"{key}: {m}"
        )
    assert not torch.allclose(hidden[(1, "layerwise")], hidden[(1, "base")], atol=1e-3)
    data = tmp_path / "mc.jsonl"
    data.write_text('{"prompt": "The cat", "choices": [" sat", " flew", " ran"], "answer": 0}\n' * 3)
    scores = {}
    for extra in ([], ["--edge-layers", "1"]):
        out = tmp_path / f"eval{len(extra)}.json"
        assert (
            dlora_main(
                [
                    "eval",
                    "--cloud",
                    address,
                    "--model",
                    str(model_dir),
                    "--data",
                    str(data),
                    "--adapter",
                    str(tmp_path / "adapter"),
                    "--json",
                    str(out),
                    "--no-progress",
                    *extra,
                ]
            )
            == 0
        )
        scores[len(extra)] = json.loads(out.read_text())
    assert scores[0] == scores[2]


def test_device_mapped_cloud_from_layer_k(tiny_dir, redis_url, data_file, tmp_path):
    """`serve --device-map auto` (here all on the CPU) serving an --edge-layers 1 session computes what the
    default stack computes (test_device_map's tolerances: the same float32 operations, another alignment)."""
    from test_device_map import assert_same_steps, steps_on_each

    from cloud_server.stack import DecoderStack

    model_dir = tiny_dir("llama", layers=2)

    def nonzero_b(split: SplitEngine) -> None:
        with torch.no_grad():
            for pair in split.adapter.pairs:
                pair.B.fill_(0.01)  # every gradient non-zero on step 0, A's included

    steps = steps_on_each([DecoderStack(model_dir), DecoderStack(model_dir, device_map="auto")], model_dir,
                          redis_url, data_file, tmp_path, nonzero_b, edge_layers=1)
    assert_same_steps(*steps, every_grad=True)
