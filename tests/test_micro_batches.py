"""--micro-batches M: the step's micro-batches overlap on the wire and add up to exactly the M=1 step."""

from __future__ import annotations

import pytest
import torch

from common.config import TrainConfig
from edge_client.data import collate, load_examples
from edge_client.engines import SplitEngine
from edge_client.kill_revive import layer_roles


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("m,mode", [(2, "detached"), (4, "frozen"), (3, "dropped")])
def test_micro_batches_equal_one_batch(family, m, mode, tiny_dir, cloud, data_file, tmp_path):
    model_dir = tiny_dir(family, layers=4)
    address = cloud(model_dir)
    engines = []
    for micro in (1, m):
        cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=address, lora_dropout=0.0,
                          micro_batches=micro, rank=4, progress=False)
        engine = SplitEngine(cfg)
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            for p in engine.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        engine.set_active({1, 2}, mode)
        engines.append(engine)
    examples = load_examples(data_file, engines[0].tokenizer, 64)
    roles = layer_roles({1, 2}, 4, mode)
    opts = [torch.optim.AdamW(e.parameters(), lr=1e-2) for e in engines]
    for step in range(3):
        batch = collate(examples[step * 5 : step * 5 + 5], engines[0].tokenizer.pad_token_id)
        results = []
        for engine, opt in zip(engines, opts):
            opt.zero_grad(set_to_none=True)
            results.append(engine.train_step(batch, step, roles))
        (loss1, t1), (loss_m, tm) = results
        assert tm.messages["up:step_begin"] == m and t1.messages["up:step_begin"] == 1
        assert loss_m == pytest.approx(loss1, abs=1e-5)
        for p1, pm in zip(engines[0].parameters(), engines[1].parameters()):
            assert (p1.grad is None) == (pm.grad is None)
            if p1.grad is not None:
                torch.testing.assert_close(pm.grad, p1.grad, atol=1e-5, rtol=1e-4)
        for opt in opts:
            opt.step()
    for e in engines:
        e.close()
