"""`dlora-cloud serve --device-map auto`: accelerate places the layers (here every one on the CPU, the only
device this machine has), the stack feeds the first layer where it runs and each slot adds its delta where
its module runs. A split step through such a cloud computes what the default cloud computes: the same float32
operations on the same numbers, on the same device, up to the order a BLAS may sum in when a tensor sits at
another alignment (rel 1e-5 on the loss, rtol 1e-5 + 3e-5 of the largest element per gradient: the golden
test's tolerances, derived there; a misplaced or missing delta moves them by 1e-2 to 1)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from cloud_server.server import CloudServer
from cloud_server.stack import DecoderStack
from common.config import ServeConfig, TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_a_device_mapped_stack_computes_what_the_default_one_does(protocol, tiny_dir, redis_url, data_file, tmp_path):
    model_dir = tiny_dir("llama", layers=2)
    mapped = DecoderStack(model_dir, device_map="auto")
    assert mapped.placement == ["cpu"] and mapped.device == torch.device("cpu")
    a, b = steps_on_each([DecoderStack(model_dir), mapped], model_dir, redis_url, data_file, tmp_path,
                         protocol=protocol)
    assert_same_steps(a, b)


Step = tuple[float, list[torch.Tensor]]


def steps_on_each(stacks: list[DecoderStack], model_dir: Path, redis_url: str, data_file: Path, tmp_path: Path,
                  init: Callable[[SplitEngine], None] | None = None, **cfg: Any) -> list[Step]:
    """One split training step (4 rows, 2 micro-batches, every layer trained) through a CloudServer on each
    stack in turn: each one's loss and LoRA gradients. init, if given, sets the adapter's weights first."""
    servers = [CloudServer(stack, ServeConfig(model=model_dir, redis_url=redis_url)) for stack in stacks]
    results = []
    try:
        for server in servers:
            split = SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, progress=False,
                                            cloud=f"127.0.0.1:{server.port}", micro_batches=2, **cfg))
            if init is not None:
                init(split)
            batch = collate(load_examples(data_file, split.tokenizer, 64)[:4], split.tokenizer.pad_token_id)
            loss, _ = split.train_step(batch, 0, [pb.FORWARD_BACKWARD] * split.num_layers)
            results.append((loss, [p.grad.clone() for p in split.parameters()]))
            split.close()
    finally:
        for server in servers:
            server.stop(0)
    return results


def assert_same_steps(a: Step, b: Step, every_grad: bool = False) -> None:
    """The module docstring's tolerances; a test that proves nothing (all gradients zero) fails."""
    (loss_a, grads_a), (loss_b, grads_b) = a, b
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    nonzero = [bool(g.any()) for g in grads_b]
    assert all(nonzero) if every_grad else any(nonzero)  # B starts at zero: by default only B's grads are non-zero
    for x, y in zip(grads_a, grads_b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=3e-5 * float(y.abs().max()))
