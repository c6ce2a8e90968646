"""Split training equals local-train's engine (LocalEngine: plain PEFT on the whole model) over three
optimizer steps, per family; test_golden_peft.py compares one step with PEFT itself, kill modes included.

Why the tolerances hold on any CPU (Intel or AMD, with or without AVX-512, arm64): before the first
optimizer step both sides compute the same float32 maths in another summation order, so the loss
agrees to ~1e-7 relative (asserted: rel 1e-5) and each gradient to float32's precision on these
sums, at most ~6e-6 of the tensor's largest element (asserted: rtol 1e-5 + atol 3e-5 x that element;
the derivation is in test_golden_peft.py). The optimizer is SGD, whose update is linear in the
gradient: after k steps the weights differ by at most lr x the sum of the k gradient differences
(to first order: a later gradient taken at weights 1e-8 apart moves by that times the curvature),
which is the weight tolerance asserted, plus 1e-6 relative for the update's own rounding. AdamW
would not do: it divides by sqrt(v), so an element whose gradient is itself round-off (~1e-9) moves
by +-lr depending on its sign, and two correct runs can end 2 x lr x steps apart there.
"""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM

from common.config import TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples
from edge_client.train.engines import LocalEngine

ALL_TARGETS = {
    "llama": "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    "opt": "q_proj,k_proj,v_proj,out_proj,fc1,fc2",
    "gpt2": "c_attn,c_proj,c_fc",
}


def _nonzero_init(engines: list, model_dir, cfg: TrainConfig) -> None:
    """Give every engine the same LoRA weights from PEFT's init_lora_weights=False (B non-zero)."""
    torch.manual_seed(123)
    peft = get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(model_dir)),
        LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(engines[0].edge.target_paths),
                   init_lora_weights=False, fan_in_fan_out="gpt2" in str(model_dir)),
    )
    ref = {k.replace(".default", ""): v for k, v in peft.named_parameters() if "lora_" in k}
    names = [k for k, _ in engines[0].adapter.named_lora_parameters()] if hasattr(engines[0], "adapter") else None
    for engine in engines:
        with torch.no_grad():
            for name, p in zip(names, engine.parameters()):
                p.copy_(ref[name])
        assert all(float(p.detach().abs().sum()) > 0 for p in engine.parameters())


GRAD_RTOL, GRAD_ATOL = 1e-5, 3e-5  # atol x the tensor's largest element; see the module docstring
LR = 0.1


@pytest.mark.parametrize("protocol,micro_batches,dropout", [("layerwise", 1, 0.0), ("adapter", 2, 0.1)])
@pytest.mark.parametrize("family,targets", [(f, None) for f in FAMILIES] + [(f, t) for f, t in ALL_TARGETS.items()])
def test_split_equals_peft(family, targets, protocol, micro_batches, dropout, tiny_dir, cloud, data_file, tmp_path):
    """Each protocol against local-train with the same --micro-batches and --lora-dropout: the keyed dropout
    masks are the same draws on both sides (common/lora_math.py), so dropout changes no tolerance."""
    model_dir = tiny_dir(family)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir), rank=4, alpha=8,
                      lora_dropout=dropout, targets=tuple(targets.split(",")) if targets else None, progress=False,
                      protocol=protocol, micro_batches=micro_batches)
    split, local = SplitEngine(cfg), LocalEngine(cfg)
    _nonzero_init([split, local], model_dir, cfg)
    names = [k for k, _ in split.adapter.named_lora_parameters()]
    opts = [torch.optim.SGD(e.parameters(), lr=LR) for e in (split, local)]
    weight_slack = [torch.zeros_like(p) for p in local.parameters()]  # lr x the gradient tolerances so far
    examples = load_examples(data_file, split.tokenizer, 64)
    roles = [pb.FORWARD_BACKWARD] * split.num_layers
    for step in range(3):
        batch = collate(examples[step * 5 : step * 5 + 5], split.tokenizer.pad_token_id)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        loss_s, traffic = split.train_step(batch, step, roles)
        loss_l, _ = local.train_step(batch, step, roles)
        assert traffic.payload_up > 0 and traffic.payload_down > 0
        assert loss_s == pytest.approx(loss_l, rel=1e-5)
        for name, ps, pl, slack in zip(names, split.parameters(), local.parameters(), weight_slack):
            assert ps.grad is not None and pl.grad is not None, name
            assert bool(pl.grad.any()), f"step {step} {name}: a zero gradient proves nothing"
            atol = GRAD_ATOL * float(pl.grad.abs().max())
            torch.testing.assert_close(ps.grad, pl.grad, rtol=GRAD_RTOL, atol=atol,
                                       msg=lambda m, s=step, n=name: f"step {s} {n}: {m}")
            slack += LR * (GRAD_RTOL * pl.grad.abs() + atol)
        for opt in opts:
            opt.step()
    for name, ps, pl, slack in zip(names, split.parameters(), local.parameters(), weight_slack):
        with torch.no_grad():
            excess = (ps - pl).abs() - slack - 1e-6 * pl.abs()
        assert float(excess.max()) <= 0, f"{name}: weights differ by {float(excess.max()):.3g} past lr x the grad tolerance"
    split.close()


def test_one_round_trip_per_input_group(tiny_dir, cloud, data_file, tmp_path):
    """q, k and v read one input: one LoraForward per layer for them; backward stops at the lowest layer."""
    model_dir = tiny_dir("llama")
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud(model_dir),
                      targets=("q_proj", "k_proj", "v_proj", "down_proj"), progress=False)
    split = SplitEngine(cfg)
    batch = collate(load_examples(data_file, split.tokenizer, 64)[:4], split.tokenizer.pad_token_id)
    roles = [pb.FORWARD_BACKWARD] * 3
    _, traffic = split.train_step(batch, 0, roles)
    # 3 layers x 2 groups (qkv, down) forward and backward
    assert traffic.messages["down:lora_forward"] == 6
    assert traffic.messages["down:lora_backward"] == 6
    roles = [pb.FORWARD, pb.FORWARD_BACKWARD, pb.FORWARD]
    _, traffic = split.train_step(batch, 1, roles)
    assert traffic.messages["down:lora_forward"] == 6
    assert traffic.messages["down:lora_backward"] == 2  # layer 1 only
    roles = [pb.ABSENT, pb.ABSENT, pb.FORWARD_BACKWARD]
    _, traffic = split.train_step(batch, 2, roles)
    assert traffic.messages["down:lora_forward"] == 2
    assert traffic.messages["down:lora_backward"] == 2
    split.close()
