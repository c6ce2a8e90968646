"""The adapter protocol on the wire: payload bytes against the formula, and which modules cross.

Every comparison here is of integers, so it is exact on any CPU: a tensor's payload is computed
from its shape and codec (common/wire/codecs.nbytes, int8: one byte per element plus four per block
of scales), and the formula (common/wire/cost.adapter_step_cost) counts the same tensors from the
micro-batches' token counts (Batch.split, as the engine splits) and the element counts of the modules
expected on the wire (AdapterLayout.total_numel). Which modules cross depends on whether the weights
changed, not on their values' round-off: after each step an SGD step (lr 0.1) moves every trained
module's A and B (the LoRA starts non-zero, so both gradients are non-zero) and leaves killed ones,
which have no gradient, exactly as they were.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from common.config import KillMode, TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.cost import adapter_step_cost
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import Batch, collate, load_examples
from edge_client.train.engines import Traffic
from edge_client.train.kill_revive import layer_roles

LAYERS = 4
ACTIVE = {1, 2}  # of 4 layers: layer 0 below the lowest active, layer 3 above
TARGETS = ("q_proj", "k_proj", "v_proj", "down_proj")  # two input groups, targets of unequal shapes


@dataclass(frozen=True)
class Wire:
    """The codecs of a session: activations up and down (int8: `block` elements per scale), LoRA weights."""

    up: str = "float32"
    down: str = "float32"
    block: int = 4096
    weights: str = "float32"


WIRES = [  # (codecs, micro-batches per step)
    (Wire(), 1),
    (Wire("int8", "int8", 4096, "bfloat16"), 2),
    (Wire("int8", "bfloat16", 7, "float32"), 3),  # small blocks: many int8 scales per tensor
    (Wire("float16", "int8", 100, "bfloat16"), 2),
]


def adapter_split(tiny_dir, cloud, data_file, tmp_path, wire: Wire = Wire(), m: int = 1) -> SplitEngine:
    """An adapter-protocol session on a 4-layer tiny LLaMA, its LoRA set to seeded non-zero values."""
    model_dir = tiny_dir("llama", layers=LAYERS)
    cfg = TrainConfig(
        model=model_dir,
        data=data_file,
        output=tmp_path,
        cloud=cloud(model_dir),
        targets=TARGETS,
        rank=4,
        protocol="adapter",
        micro_batches=m,
        wire=wire.up,
        wire_down=wire.down,
        int8_block_size=wire.block,
        weights_wire=wire.weights,
        progress=False,
    )
    split = SplitEngine(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # non-zero B: then A's gradient is non-zero too, and an update moves both
        for p in split.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return split


def record_step_weights(split: SplitEngine) -> dict[int, tuple[list[int], list[int]]]:
    """Step -> (modules, trained) of the StepWeights the link sends from now on (a wrapper around its send);
    a step's weights go layer by layer, so its messages' modules are joined in the order they left."""
    seen: dict[int, tuple[list[int], list[int]]] = {}
    send = split.link.send

    def recording_send(frame, traffic: Traffic) -> None:
        if frame.kind == "step_weights":
            body = frame.body
            modules, trained = seen.setdefault(body.step, ([], list(body.trained)))
            assert list(body.trained) == trained, "a continuation repeats the step's trained modules"
            modules.extend(body.modules)
        send(frame, traffic)

    split.link.send = recording_send  # type: ignore[method-assign]
    return seen


def modules_of(split: SplitEngine, layers) -> list[int]:
    layout = split.adapter.layout
    return [layout.module(layer, t) for layer in sorted(layers) for t in range(layout.per_layer)]


def present_layers(roles: list[int]) -> set[int]:
    return {layer for layer, role in enumerate(roles) if role != pb.ABSENT}


def batches(split: SplitEngine, data_file, steps: int) -> list[Batch]:
    """`steps` batches of 4 examples of varied length (the data file holds 16)."""
    examples = load_examples(data_file, split.tokenizer, 64)
    return [collate(examples[i * 4 : i * 4 + 4], split.tokenizer.pad_token_id) for i in range(steps)]


def step_and_update(
    split: SplitEngine, opt: torch.optim.Optimizer, batch: Batch, step: int, active: set[int], mode: KillMode
) -> Traffic:
    """One training step with `active`, then an SGD step (which changes exactly the trained modules)."""
    opt.zero_grad(set_to_none=True)
    split.set_active(active, mode)
    loss, traffic = split.train_step(batch, step, layer_roles(active, LAYERS, mode))
    assert math.isfinite(loss)
    opt.step()
    return traffic


def assert_payload(
    split: SplitEngine, traffic: Traffic, batch: Batch, sent: list[int], trained: list[int], wire: Wire = Wire()
) -> None:
    """The step's payload equals adapter_step_cost for these sent and trained modules, and its messages
    are one StepWeights per layer with modules sent (one if none), one LoraGrads per layer with trained
    modules (sent as the backward passes it) and one StepBegin, HiddenGrad and Hidden per micro-batch."""
    layout, edge = split.adapter.layout, split.edge
    tokens = [part.input_ids.numel() for part in batch.split(split.micro_batches)]  # N_i, as the engine splits
    w, g = layout.total_numel(sent), layout.total_numel(trained)
    want = adapter_step_cost(
        tokens, edge.embed_width, edge.head_width, w, g, True, wire.up, wire.block, wire.down, wire.weights
    )
    assert (traffic.payload_up, traffic.payload_down) == (want.up, want.down)
    m = len(tokens)
    per_step = {"up:step_weights": max(1, len({layout.layer_of(i) for i in sent})),
                "down:lora_grads": len({layout.layer_of(i) for i in trained})}
    per_micro_batch = {"up:step_begin": m, "up:hidden_grad": m, "down:hidden": m, "down:step_done": m}
    assert traffic.messages == per_step | per_micro_batch


@pytest.mark.parametrize("mode", ["frozen", "detached", "dropped"])
@pytest.mark.parametrize("wire,m", WIRES)
def test_adapter_payload_equals_formula(mode, wire, m, tiny_dir, cloud, data_file, tmp_path):
    """Payload bytes of a stream's first step (every present module's weights up) and of the next step
    (only the trained modules', which the SGD step changed) equal adapter_step_cost exactly; the module
    docstring says why integer equality holds. Layer 0 lies below the active layers and layer 3 above;
    dropped ones are ABSENT and carry no weights."""
    split = adapter_split(tiny_dir, cloud, data_file, tmp_path, wire, m)
    opt = torch.optim.SGD(split.parameters(), lr=0.1)
    present = present_layers(layer_roles(ACTIVE, LAYERS, mode))
    trained = modules_of(split, ACTIVE)
    try:
        for step, (batch, sent) in enumerate(zip(batches(split, data_file, 2), [modules_of(split, present), trained])):
            traffic = step_and_update(split, opt, batch, step, ACTIVE, mode)
            assert_payload(split, traffic, batch, sent, trained, wire)
    finally:
        split.close()


@pytest.mark.parametrize("mode", ["frozen", "detached", "dropped"])
def test_only_modules_the_cloud_lacks_cross(mode, tiny_dir, cloud, data_file, tmp_path):
    """StepWeights carries a module only when the cloud does not hold its current weights: on a stream's
    first step every present one; then the trained ones (each SGD step changed them); a module that
    trained and is then killed once more (its last update came after the cloud got it), then not while
    it stays killed; a dropped layer's never (it is ABSENT), until it is revived. Module lists are compared exactly, and
    each step's payload equals the formula for them (integers; see the module docstring)."""
    split = adapter_split(tiny_dir, cloud, data_file, tmp_path)
    seen = record_step_weights(split)
    opt = torch.optim.SGD(split.parameters(), lr=0.1)
    revived = {2, 3}  # steps 2 and 3: layer 1 killed, layer 3 revived
    # layers whose weights cross at each step
    if mode == "dropped":
        sent_layers = [{1, 2}, {1, 2}, {2, 3}, {2, 3}]  # layer 3 was ABSENT until revived, so never sent before
    else:
        sent_layers = [{0, 1, 2, 3}, {1, 2}, {1, 2}, {2, 3}]  # layer 1 changed at step 1's update
    try:
        for step, batch in enumerate(batches(split, data_file, 4)):
            active = ACTIVE if step < 2 else revived
            roles = layer_roles(active, LAYERS, mode)
            traffic = step_and_update(split, opt, batch, step, active, mode)
            sent, trained = seen[step]
            assert sent == modules_of(split, sent_layers[step]), f"step {step}"
            assert trained == modules_of(split, active), f"step {step}"
            assert set(sent) <= set(modules_of(split, present_layers(roles))), "an ABSENT layer's weights crossed"
            assert_payload(split, traffic, batch, sent, trained)
        if mode == "dropped":  # layer 0 was dropped throughout
            assert not set(modules_of(split, {0})) & {m for sent, _ in seen.values() for m in sent}
    finally:
        split.close()


@pytest.mark.parametrize("mode", ["frozen", "detached"])  # killed layers present: a resend differs from a step's
def test_new_stream_resends_every_present_module(mode, tiny_dir, cloud, data_file, tmp_path):
    """The cloud keeps weights per stream: after recover() (a new stream of the same session) the next
    step sends every present module again, killed ones included, and the one after only the trained
    ones. Module lists and payloads are compared exactly (integers; see the module docstring)."""
    split = adapter_split(tiny_dir, cloud, data_file, tmp_path, m=2)
    seen = record_step_weights(split)
    opt = torch.optim.SGD(split.parameters(), lr=0.1)
    present = modules_of(split, present_layers(layer_roles(ACTIVE, LAYERS, mode)))
    trained = modules_of(split, ACTIVE)
    try:
        for step, batch in enumerate(batches(split, data_file, 4)):
            if step == 2:
                split.recover()
            traffic = step_and_update(split, opt, batch, step, ACTIVE, mode)
            want = present if step in (0, 2) else trained
            assert seen[step] == (want, trained), f"step {step}"
            assert_payload(split, traffic, batch, want, trained)
    finally:
        split.close()
