"""`dlora-cloud serve --device-map auto`: accelerate places the layers (here every one on the CPU, the only
device this machine has), the stack feeds the first layer where it runs and each slot adds its delta where
its module runs. A split step through such a cloud computes what the default cloud computes: the same float32
operations on the same numbers, on the same device, up to the order a BLAS may sum in when a tensor sits at
another alignment (rel 1e-5 on the loss, rtol 1e-5 + 3e-5 of the largest element per gradient: the golden
test's tolerances, derived there; a misplaced or missing delta moves them by 1e-2 to 1)."""

from __future__ import annotations

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
    servers = [CloudServer(stack, ServeConfig(model=model_dir, redis_url=redis_url))
               for stack in (DecoderStack(model_dir), mapped)]
    results = []
    try:
        for server in servers:
            split = SplitEngine(TrainConfig(model=model_dir, data=data_file, output=tmp_path, protocol=protocol,
                                            cloud=f"127.0.0.1:{server.port}", progress=False, micro_batches=2))
            batch = collate(load_examples(data_file, split.tokenizer, 64)[:4], split.tokenizer.pad_token_id)
            loss, _ = split.train_step(batch, 0, [pb.FORWARD_BACKWARD] * 2)
            results.append((loss, [p.grad.clone() for p in split.parameters()]))
            split.close()
    finally:
        for server in servers:
            server.stop(0)
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert any(bool(b.any()) for b in grads_b)  # B starts at zero, so only B's gradients are non-zero on step 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5 * float(b.abs().max()))
