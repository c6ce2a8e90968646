"""What each side holds and sees: no decoder blocks on the edge; on the wire no token ids or labels in
either step protocol, no LoRA weights in `layerwise`, and every LoRA weight in `adapter` (by design)."""

from __future__ import annotations

import gc

import pytest
import torch
from recording_hop import recording_hop

from common.config import TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples
from edge_client.train.model_parts import EdgeModel


def test_edge_materialises_no_decoder_block(tiny_dir):
    model_dir = tiny_dir("llama")
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    lists_before = {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.ModuleList)}  # earlier tests' clouds
    edge = EdgeModel(model_dir)
    gc.collect()
    new = [
        o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before and o.device.type != "meta"
    ]
    held = {id(edge.embedding.weight), id(edge.head.weight)}
    others = [t for t in new if id(t) not in held and t.numel() > 64]
    assert others == [], [tuple(t.shape) for t in others]
    names = [n for m in edge.modules_on_device().values() for n, _ in m.named_parameters()]
    assert names == ["weight", "weight"]
    assert not any(isinstance(o, torch.nn.ModuleList) for o in gc.get_objects() if id(o) not in lists_before)


def test_edge_materialises_only_its_edge_layers(tiny_dir):
    """--edge-layers 1 of 3: besides the embedding and head, the edge holds block 0's tensors and no others (no
    other block, no final norm, no second embedding table)."""
    model_dir = tiny_dir("llama")
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor)}
    lists_before = {id(o) for o in gc.get_objects() if isinstance(o, torch.nn.ModuleList)}
    edge = EdgeModel(model_dir, edge_layers=1)
    gc.collect()
    new = [
        o for o in gc.get_objects() if isinstance(o, torch.Tensor) and id(o) not in before and o.device.type != "meta"
    ]
    held = {id(t) for m in edge.modules_on_device().values() for t in (*m.parameters(), *m.buffers())}
    others = [t for t in new if id(t) not in held and t.numel() > 64]
    assert others == [], [tuple(t.shape) for t in others]
    blocks = [n for n, _ in edge.modules_on_device()["blocks"].named_parameters()]
    assert blocks and all(n.startswith("model.layers.0.") for n in blocks), blocks
    lists = [o for o in gc.get_objects() if isinstance(o, torch.nn.ModuleList) and id(o) not in lists_before]
    assert [len(x) for x in lists] == [1]  # the device's decoder layers: exactly one block


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_what_crosses_the_wire_per_protocol(protocol, tiny_dir, cloud, data_file, tmp_path):
    """Everything the cloud receives in one training step, recorded by a real gRPC hop in between.

    Both protocols: no token ids and no labels (int64 or int32). layerwise: no LoRA weights either (the
    cloud sees layer inputs and deltas). adapter: the LoRA weights DO cross, by design: the StepWeights
    payload is exactly every module's A then B (float32, the wire layout of common/wire/adapter.py), the
    trade for one message instead of two round trips per layer.
    """
    model_dir = tiny_dir("llama")
    with recording_hop(cloud(model_dir)) as (proxy, address):
        cfg = TrainConfig(
            model=model_dir,
            data=data_file,
            output=tmp_path,
            cloud=address,
            progress=False,
            protocol=protocol,
        )
        split = SplitEngine(cfg)
        with torch.no_grad():
            for _, p in split.adapter.named_lora_parameters():
                p.normal_(0, 0.1)
        lora = [p.detach().clone() for _, p in split.adapter.named_lora_parameters()]  # A, B of each module in order
        batch = collate(load_examples(data_file, split.tokenizer, 64)[:6], split.tokenizer.pad_token_id)
        split.train_step(batch, 0, [pb.FORWARD_BACKWARD] * split.num_layers)
        split.close()
    messages = proxy.messages()
    kinds = [m.WhichOneof("kind") for m in messages]
    stream = b"".join(proxy.seen)
    for row, labels in zip(batch.input_ids, batch.labels):
        for dtype in (torch.int64, torch.int32):
            assert row[:8].to(dtype).numpy().tobytes() not in stream
            kept = labels[labels != -100]
            assert kept.to(dtype).numpy().tobytes() not in stream
    if protocol == "layerwise":
        # one layer group per layer, 3 layers: a delta each on the way up, a gradient each on the way down
        assert kinds == ["hello", "step_begin"] + ["lora_delta"] * 3 + ["hidden_grad"] + ["lora_grad"] * 3
        for t in lora:
            assert t.numpy().tobytes()[:32] not in stream
    else:
        # the weights layer by layer: the first layer's before the StepBegin, the other two after it
        assert kinds == ["hello", "step_weights", "step_begin", "step_weights", "step_weights", "hidden_grad"]
        chunks = [m.step_weights for m in messages if m.WhichOneof("kind") == "step_weights"]
        assert [m for c in chunks for m in c.modules] == list(range(len(lora) // 2))
        assert all(c.weights.codec == pb.FLOAT32 for c in chunks)
        assert b"".join(c.weights.data for c in chunks) == torch.cat([t.reshape(-1) for t in lora]).numpy().tobytes()
