"""--micro-batches M: the step's micro-batches overlap on the wire and add up to exactly the M=1 step.

Why the tolerances hold on any CPU (Intel or AMD, with or without AVX-512, arm64): M micro-batches
compute the same float32 maths as one batch, but each drops its own padding columns (other matrix
shapes, other BLAS blocking) and the gradients add up micro-batch by micro-batch: another summation
order. So the loss agrees to ~1e-7 relative (asserted: rel 1e-5) and each gradient to float32's
precision on these sums, at most ~6e-6 of the tensor's largest element (asserted: rtol 1e-5 + atol
3e-5 x that element; test_golden_peft.py derives it). Between steps the optimizer is SGD, linear in
the gradient, so the next step starts from weights ~1e-9 apart; AdamW divides by sqrt(v), and an
element whose gradient is round-off would move by +-lr on its sign alone.
"""

from __future__ import annotations

import pytest
import torch

from common.config import TrainConfig
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples
from edge_client.train.kill_revive import layer_roles


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
    opts = [torch.optim.SGD(e.parameters(), lr=0.1) for e in engines]
    for step in range(3):
        batch = collate(examples[step * 5 : step * 5 + 5], engines[0].tokenizer.pad_token_id)
        results = []
        for engine, opt in zip(engines, opts):
            opt.zero_grad(set_to_none=True)
            results.append(engine.train_step(batch, step, roles))
        (loss1, t1), (loss_m, tm) = results
        assert tm.messages["up:step_begin"] == m and t1.messages["up:step_begin"] == 1
        assert loss_m == pytest.approx(loss1, rel=1e-5)
        for p1, pm in zip(engines[0].parameters(), engines[1].parameters()):
            assert (p1.grad is None) == (pm.grad is None)
            if p1.grad is not None:
                torch.testing.assert_close(pm.grad, p1.grad, rtol=1e-5, atol=3e-5 * float(p1.grad.abs().max()))
        for opt in opts:
            opt.step()
    for e in engines:
        e.close()


def test_a_failing_head_fails_the_step_not_hangs(tiny_dir, cloud, data_file, tmp_path):
    """With M > 1 the heads compute in their own thread; an error there is the step's error."""
    from edge_client.remote.remote_step import MicroBatch, RemoteStep

    model_dir = tiny_dir("llama", layers=2)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir), micro_batches=2,
                      progress=False, reply_timeout_s=30)
    engine = SplitEngine(cfg)
    ids = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        emb = engine.edge.embed(ids)

    def head(mb: int, h: torch.Tensor) -> torch.Tensor:
        raise ValueError("head broke")

    parts = [MicroBatch(emb[i : i + 1], torch.ones(1, 8, dtype=torch.long)) for i in range(2)]
    with pytest.raises(ValueError, match="head broke"):
        RemoteStep(engine.link, engine.adapter, step=0, roles=layer_roles({0, 1}, 2, "detached"), train=True, head=head,
                   heads=engine._heads).run(parts)
    engine.close()


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_the_next_step_right_after_step_done_is_never_refused(protocol, tiny_dir, cloud, data_file, tmp_path,
                                                               monkeypatch):
    """The edge sends its next step (StepWeights, or M StepBegins with M = --max-micro-batches) the moment the
    last StepDone arrives. The cloud must count a micro-batch as ended before its StepDone leaves, however
    late the thread that ends it runs: here every micro-batch's end is delayed 0.3 s, which refused the next
    step (INVALID_ARGUMENT / RESOURCE_EXHAUSTED) when StepDone went out first."""
    from cloud_server.session import _Dispatcher

    finished = _Dispatcher._finished

    def late(self, run):
        import time

        time.sleep(0.3)
        finished(self, run)

    monkeypatch.setattr(_Dispatcher, "_finished", late)
    model_dir = tiny_dir("llama", layers=2)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir, max_micro_batches=2),
                      micro_batches=2, protocol=protocol, progress=False)
    split = SplitEngine(cfg)
    batch = collate(load_examples(data_file, split.tokenizer, 64)[:4], split.tokenizer.pad_token_id)
    roles = layer_roles({0, 1}, 2, "detached")
    try:
        for step in range(3):
            split.train_step(batch, step, roles)
    finally:
        split.close()
