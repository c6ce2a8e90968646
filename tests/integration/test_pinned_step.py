"""Pinned values of one split step (torchtune style): a change of behaviour cannot pass silently.

The golden test proves split == PEFT; both could still change together (a transformers upgrade, a
new loss normalisation, another LoRA scale). This test runs one step of a fixed computation: the
seeded tiny LLaMA of tests/tiny_models.py (3 layers), LoRA r=4, alpha=8 on q, k, v and down_proj
with weights from a formula (no random generator: B is non-zero), no dropout, fixed token ids;
and compares the loss, a few gradient norms and the payload bytes with literals computed once.
If it fails after a deliberate change (or a torch/transformers upgrade that changes the tiny
model's seeded init), check the change, then paste the new values.

Why rel 1e-4 holds on any CPU (Intel or AMD, with or without AVX-512, arm64): the values are
float32 results of a fixed sequence of operations; another CPU or BLAS only adds some sums in
another order, which moves each by ~1e-7 relative to its terms. The loss is a mean of positive
terms, and a norm is off by at most the norm of its elements' errors, which float32 keeps near
1e-6 of the tensor's norm here (see test_golden_peft); the pinned values are within 2e-7 of the
float64 result. So 1e-4 leaves ~100x headroom on any CPU, while any change of behaviour worth
catching moves them by 1e-3 or more. The tiny model's weights come from torch's CPU generator
(mt19937), the same stream on every platform; the LoRA weights from a formula. Byte counts are
exact.
"""

from __future__ import annotations

import math

import pytest
import torch

from common.config import TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import Batch

IDS = [[84, 104, 101, 32, 99, 97, 116, 32, 115, 97, 116, 46, 256],
       [76, 111, 82, 65, 32, 111, 110, 32, 116, 104, 101, 256, 257],
       [83, 112, 108, 105, 116, 256, 257, 257, 257, 257, 257, 257, 257]]
PAD = 257
PREFIX = "base_model.model.model.layers."

# Computed once by this test (float32, AMD EPYC); PEFT on the whole model in float64 gives the same
# values to 2e-7 relative. Read the module docstring before changing them.
PINNED_LOSS = 5.582472324371338
PINNED_GRAD_NORMS = {
    "0.self_attn.q_proj.lora_A": 0.0035339847672730684,
    "1.self_attn.v_proj.lora_B": 0.060829002410173416,
    "2.mlp.down_proj.lora_A": 0.013126092962920666,
    "2.self_attn.k_proj.lora_B": 0.001865362050011754,
}
PINNED_TOTAL_GRAD_NORM = 0.19227643193490265
PINNED_PAYLOAD = (92391, 87360)  # (up, down) tensor bytes of the step


def formula_init(named: list[tuple[str, torch.nn.Parameter]]) -> None:
    """Non-zero A and B from a formula: the same numbers with any generator, on any platform."""
    with torch.no_grad():
        for i, (_, p) in enumerate(named):
            n = torch.arange(p.numel(), dtype=torch.float64)
            p.copy_((0.1 * torch.sin(0.37 * n + 0.5 * i + 0.1)).reshape(p.shape).to(p.dtype))


def test_one_llama_step_matches_pinned_values(tiny_dir, cloud, tmp_path):
    model_dir = tiny_dir("llama")
    cfg = TrainConfig(model=model_dir, data=tmp_path / "unused.jsonl", output=tmp_path, cloud=cloud(model_dir), rank=4,
                      alpha=8, lora_dropout=0.0, targets=("q_proj", "k_proj", "v_proj", "down_proj"), progress=False)
    split = SplitEngine(cfg)
    try:
        named = split.adapter.named_lora_parameters()
        formula_init(named)
        ids = torch.tensor(IDS)
        mask = (ids != PAD).long()
        batch = Batch(ids, mask, ids.masked_fill(mask == 0, -100))
        split.set_active({0, 1, 2}, "detached")
        loss, traffic = split.train_step(batch, 0, [pb.FORWARD_BACKWARD] * 3)
        grads = {k.removeprefix(PREFIX).removesuffix(".weight"): p.grad for k, p in named}
        got = {name: float(grads[name].norm()) for name in PINNED_GRAD_NORMS}
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        print(f"PINNED_LOSS = {loss!r}\nPINNED_GRAD_NORMS = {got!r}\nPINNED_TOTAL_GRAD_NORM = {total!r}\n"
              f"PINNED_PAYLOAD = {(traffic.payload_up, traffic.payload_down)!r}")  # shown by -s or on failure
        assert loss == pytest.approx(PINNED_LOSS, rel=1e-4)
        assert got == pytest.approx(PINNED_GRAD_NORMS, rel=1e-4)
        assert total == pytest.approx(PINNED_TOTAL_GRAD_NORM, rel=1e-4)
        assert (traffic.payload_up, traffic.payload_down) == PINNED_PAYLOAD
    finally:
        split.close()
