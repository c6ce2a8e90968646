"""Kill-and-Revive through the wire and in local-train: kill modes, round trips, bytes, decisions.

Why the comparisons hold on any CPU (Intel or AMD, with or without AVX-512, arm64): message counts
and byte counts are integers, compared exactly. Split and local-train compute the same float32
maths in other summation orders: losses agree to ~1e-7 relative (asserted at rel 1e-5), gradients
to float32's precision on these sums, at most ~6e-6 of the tensor's largest element (asserted at
rtol 1e-5 + atol 3e-5 x that element; test_golden_peft.py derives it). Where several steps are
compared the optimizer is SGD, linear in the gradient, so the weights the next step starts from
differ only by lr x those gradient differences (~1e-9 here) and the next gradients stay within the
same tolerance; AdamW divides by sqrt(v) and would move an element whose gradient is round-off by
+-lr on its sign alone.
"""

from __future__ import annotations

import json

import pytest
import torch

from common.config import TrainConfig
from common.scheduler import KRConfig, decide, initial_state
from common.wire.cost import step_cost
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples
from edge_client.train.engines import LocalEngine
from edge_client.train.kill_revive import layer_roles
from edge_client.train.trainer import train

ACTIVE = {1, 2}  # of 4 layers: layer 0 below the lowest active, layer 3 above


@pytest.mark.parametrize("mode,forward,backward", [
    ("frozen", 4, 3),  # killed layer 3 lies above the lowest active layer: its dL/dx is needed
    ("detached", 4, 2),
    ("dropped", 2, 2),
])
@pytest.mark.parametrize("up,down,block", [("float32", "float32", 4096), ("int8", "int8", 4096),
                                           ("int8", "bfloat16", 100), ("float16", "int8", 7)])
def test_round_trips_and_bytes_per_kill_mode(mode, forward, backward, up, down, block, tiny_dir, cloud, data_file,
                                             tmp_path):
    model_dir = tiny_dir("llama", layers=4)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir), wire=up,
                      wire_down=down, int8_block_size=block, targets=("q_proj", "k_proj", "v_proj", "down_proj"),
                      progress=False)
    split = SplitEngine(cfg)
    split.set_active(ACTIVE, mode)
    batch = collate(load_examples(data_file, split.tokenizer, 64)[:5], split.tokenizer.pad_token_id)
    roles = layer_roles(ACTIVE, 4, mode)
    _, traffic = split.train_step(batch, 0, roles)
    assert traffic.messages["down:lora_forward"] == 2 * forward  # two input groups per layer
    assert traffic.messages.get("down:lora_backward", 0) == 2 * backward
    n = batch.input_ids.numel()
    want = step_cost(n, split.edge.embed_width, split.edge.head_width, split.edge.group_shapes(), roles, True, up, block,
                     down)
    assert (traffic.payload_up, traffic.payload_down) == (want.up, want.down)
    killed = [p for layer, ps in split.params_by_layer().items() if layer not in ACTIVE for p in ps]
    assert killed and all(p.grad is None for p in killed)
    assert all(p.grad is not None for layer in ACTIVE for p in split.params_by_layer()[layer])
    split.close()


GRAD_RTOL, GRAD_ATOL = 1e-5, 3e-5  # atol x the tensor's largest element; see the module docstring


def assert_grads_close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(got, want, rtol=GRAD_RTOL, atol=GRAD_ATOL * float(want.abs().max()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("mode", ["frozen", "detached", "dropped"])
def test_killed_modules_split_equals_peft(mode, tiny_dir, cloud, data_file, tmp_path):
    """frozen = PEFT with requires_grad off per module; detached/dropped = PEFT with the matching hooks
    (LocalEngine's); three SGD steps with LoRA dropout 0.1, the same draws on both sides."""
    model_dir = tiny_dir("llama", layers=4)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir), rank=4,
                      lora_dropout=0.1, progress=False)
    split, local = SplitEngine(cfg), LocalEngine(cfg)
    with torch.no_grad():  # non-zero B so a missing gradient path changes the numbers
        gen = torch.Generator().manual_seed(5)
        for ps, pl in zip(split.parameters(), local.parameters()):
            ps.copy_(torch.randn(ps.shape, generator=gen) * 0.1)
            pl.copy_(ps)
    for e in (split, local):
        e.set_active(ACTIVE, mode)
    opts = [torch.optim.SGD(e.parameters(), lr=0.1) for e in (split, local)]
    examples = load_examples(data_file, split.tokenizer, 64)
    roles = layer_roles(ACTIVE, 4, mode)
    for step in range(3):
        batch = collate(examples[step * 5 : step * 5 + 5], split.tokenizer.pad_token_id)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        torch.manual_seed(100 + step)
        loss_s, _ = split.train_step(batch, step, roles)
        torch.manual_seed(100 + step)
        loss_l, _ = local.train_step(batch, step, roles)
        assert loss_s == pytest.approx(loss_l, rel=1e-5)
        for i, (ps, pl) in enumerate(zip(split.parameters(), local.parameters())):
            assert (ps.grad is None) == (pl.grad is None)
            if ps.grad is not None:
                assert_grads_close(ps.grad, pl.grad, f"step {step} parameter {i}")
        for opt in opts:
            opt.step()
    split.close()


def _kr_log(path) -> list[dict]:
    return [json.loads(line) for line in (path / "kr_log.jsonl").read_text().splitlines()]


@pytest.fixture
def sgd_trainer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's AdamW replaced by SGD (same lr and schedule), for runs compared across engines."""
    monkeypatch.setattr(torch.optim, "AdamW",
                        lambda params, lr, weight_decay=0.0: torch.optim.SGD(params, lr=lr, weight_decay=weight_decay))


def test_six_layer_budget_two_through_wire_and_local(sgd_trainer, tiny_dir, cloud, data_file, tmp_path):
    """--epochs 4 --warmup-epochs 1 --budget 2 --revive 1 on 6 layers: the done-when of the KR issue.

    The trainer runs SGD here (see the module docstring): then each module's Δ is the norm of lr x a
    sum of gradients that agree to float32 precision, so split and local Δ agree to ~1e-5 relative
    (asserted: 1e-4). The decisions compare Δs; they are the same on any CPU because every logged Δ
    lies more than 1e-3 (relative) from every other one (asserted), 100x what the two runs' Δs may
    differ by.
    """
    model_dir = tiny_dir("llama", layers=6)
    address = cloud(model_dir)
    logs = {}
    for kind in ("split", "local"):
        cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path / kind, cloud=address if kind == "split" else None,
                          epochs=4, warmup_epochs=1, budget=2, revive=1, batch_size=4, lr=3e-2, progress=False)
        engine = SplitEngine(cfg) if kind == "split" else LocalEngine(cfg)
        train(cfg, engine)
        engine.close()
        logs[kind] = _kr_log(cfg.output)
        metrics = [json.loads(line) for line in (cfg.output / "metrics.jsonl").read_text().splitlines()]
        assert [m["active_modules"] for m in metrics] == [6] * 4 + [2] * 12
    split, local = logs["split"], logs["local"]
    assert [d["active"] for d in split] == [d["active"] for d in local]
    assert [d["next_active"] for d in split] == [d["next_active"] for d in local]
    for a, b in zip(split, local):
        for k in a["deltas"]:
            assert a["deltas"][k] == pytest.approx(b["deltas"][k], rel=1e-4)
    deltas = sorted(v for d in split for v in d["deltas"].values())
    assert all(hi - lo > 1e-3 * hi for lo, hi in zip(deltas, deltas[1:])), f"near-tie among the deltas {deltas}"
    assert len(split[0]["active"]) == 6 and all(len(d["active"]) == 2 for d in split[1:])
    assert any(d["revived"] for d in split)
    # every decision follows the logged deltas
    kr = KRConfig(num_layers=6, warmup_epochs=1, budget=2, revive=1)
    state = initial_state(kr)
    for d in split:
        state, again = decide(kr, state, {int(k): v for k, v in d["deltas"].items()})
        assert again.to_json() == d


def test_dropped_mode_bytes_fall_to_budget_share(tiny_dir, cloud, data_file, tmp_path):
    """After warm-up with budget 2 of 6 in dropped mode, per-layer traffic is 2/6 of the warm-up's (byte
    counts are integers: the ratio is exact up to float64's 1e-16)."""
    model_dir = tiny_dir("llama", layers=6)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir), epochs=2,
                      budget=2, kill_mode="dropped", batch_size=16, shuffle=False, progress=False)
    engine = SplitEngine(cfg)
    train(cfg, engine)
    engine.close()
    warm, after = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert warm["batch_shape"] == after["batch_shape"]  # the same batch: no shuffle, one batch per epoch
    n = warm["batch_shape"][0] * warm["batch_shape"][1]
    not_per_layer = 3 * n * 32 * 4 + n  # embeddings, hidden, hidden grad (float32, H=32) and the mask
    per_layer = [r["payload_to_cloud"] + r["payload_from_cloud"] - not_per_layer for r in (warm, after)]
    assert per_layer[1] / per_layer[0] == pytest.approx(2 / 6, rel=1e-9)
