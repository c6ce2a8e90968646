"""The golden test: one split step through a real cloud computes what PEFT itself computes.

The reference is `peft.get_peft_model` on the whole Hugging Face model, with PEFT's own seeded
non-zero init (`init_lora_weights=False`, so B != 0 and a missing gradient path changes the
numbers), the model's own loss (`labels=`), the base in eval mode and LoRA dropout as configured.
Nothing of ours builds the reference: the batch is padded here, the kill modes are applied here in
plain PEFT terms, and only the LoRA weights are copied into the split, by their PEFT keys.

Kill modes in PEFT terms (DESIGN.md, "Kill and Revive"), on every LoRA module of a killed layer:
- frozen: its lora_A/lora_B have requires_grad off; the delta stays in the forward pass and the
  gradient still flows through its low-rank path to the layers below;
- detached: requires_grad off and the LoRA input detached (a pre-hook on lora_dropout), so the
  delta is applied but no gradient goes through its low-rank path;
- dropped: requires_grad off and the adapter disabled (`_disable_adapters`): no delta at all.

Why the tolerances hold on any CPU (Intel or AMD, with or without AVX-512, arm64): split and PEFT
run the same float32 operations on the same numbers but add some of them in another order (the
cloud adds the delta, micro-batches add their partial gradients, BLAS kernels block the token sums
of differently shaped matrices differently). Reordering a float32 sum moves it by ~1e-7 relative
to the sum of the absolute values of its terms, not to its result. So the loss (a mean of positive
terms) agrees to ~1e-7 relative, and we assert rel 1e-5. A LoRA gradient element is a sum over
every token that reaches it through the layers above, and its terms cancel: on this data PEFT's
own float32 gradients differ from PEFT run in float64 by up to 6e-6 of the tensor's largest
element (measured, worst family qwen2; the split differs from PEFT by up to 5e-6 with M = 2). That
size is set by float32's precision and by how much this data's sums cancel, which no CPU changes;
another CPU or BLAS only picks another order, i.e. other errors of that size. So each gradient is
compared at rtol 1e-5 plus an atol of 3e-5 x the tensor's largest element: 2.5x the most two float32
results 6e-6 off the exact value each can differ, and still ~1000x below what a wrong gradient path, a wrong
dropout mask or a wrong scale changes (1e-2 to 1 of the largest element). One step, no optimizer:
nothing amplifies the round-off. The dropout masks are the same draws, not similar ones: PEFT's
`lora_dropout` slots hold common.lora_math.KeyedDropout, which draws each mask from a generator
keyed by (seed, step, micro-batch, layer, target), as the split does wherever LoRA runs; the same
key and the same shape give the same mask on any CPU, whatever order threads reach the layers in.
With M micro-batches the reference is PEFT run on each micro-batch in turn (the same rows, cut to
the columns their tokens use), its mean loss weighted by the micro-batch's share of label tokens:
plain gradient accumulation.
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import FAMILIES
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.config import KillMode, TrainConfig
from common.families import family_of, resolve_targets
from common.lora_math import DropoutClock, KeyedDropout
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import Batch
from edge_client.train.kill_revive import layer_roles

RANK, ALPHA = 4, 8
SEED = 3  # the run's --seed: keys the dropout masks on both sides
GRAD_ATOL = 3e-5  # x the tensor's largest element; see the module docstring
LAYERS = 3
# Every LoRA-able linear of a decoder layer, by the plain names a PEFT user writes, so that every
# input group of every family crosses the wire.
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "opt": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "bloom": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],  # c_proj selects both attn.c_proj and mlp.c_proj
}
TARGETS["mistral"] = TARGETS["qwen2"] = TARGETS["llama"]
TARGETS["gpt_neox"] = TARGETS["bloom"]
# Active sets of the 3 layers: all; a killed layer between two active ones; a killed layer below
# the lowest active one and one above it; killed layers only below; killed layers only above.
ACTIVE_SETS = [{0, 1, 2}, {0, 2}, {1}, {2}, {0}]
TEXTS = ["The cat sat on the mat.", "Split learning, LoRA.", "Edge and cloud", "Low-rank adaptation of LLMs!", "ok"]


def make_batch(model_dir, texts: list[str] = TEXTS) -> Batch:
    """Right-padded ids, mask 1 on tokens, labels = ids with -100 on padding (the model shifts them)."""
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [tok(t)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return Batch(ids, mask, ids.masked_fill(mask == 0, -100))


class PeftReference:
    """The whole model under PEFT, with the kill modes applied in plain PEFT terms."""

    def __init__(self, model_dir, family: str, dropout: float, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        config = LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS[family],
                            init_lora_weights=False, fan_in_fan_out=family == "gpt2")
        self.model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(model_dir)), config)
        self.model.eval()  # the frozen base without its own dropout, as the cloud runs it
        fam = family_of(self.model.config.model_type)
        chosen = set(resolve_targets(fam, tuple(TARGETS[family])))
        order = [p for group in fam.input_groups for p in group if p in chosen]  # a layer's targets, family order
        self.clock = DropoutClock()
        self.lora: list[tuple[int, LoraLayer]] = []
        for name, module in self.model.named_modules():
            if isinstance(module, LoraLayer):
                layer = int(re.search(r"\.(\d+)\.", name).group(1))
                path = name.split(f".{layer}.", 1)[1]
                self.lora.append((layer, module))
                if dropout > 0:  # PEFT's own dropout slot, drawing the keyed masks
                    module.lora_dropout["default"] = KeyedDropout(dropout, SEED, layer, order.index(path),
                                                                  self.clock).train()
        self.hooks: list[torch.utils.hooks.RemovableHandle] = []

    def weights(self) -> dict[str, torch.nn.Parameter]:
        """LoRA parameters by their saved-adapter key (PEFT's name without the adapter name)."""
        return {k.replace(".default", ""): p for k, p in self.model.named_parameters() if ".lora_" in k}

    def set_active(self, active: set[int], mode: KillMode) -> None:
        for h in self.hooks:
            h.remove()
        self.hooks = []
        for layer, module in self.lora:
            killed = layer not in active
            for p in (module.lora_A["default"].weight, module.lora_B["default"].weight):
                p.requires_grad_(not killed)
            module._disable_adapters = killed and mode == "dropped"
            if killed and mode == "detached":
                self.hooks.append(module.lora_dropout["default"].register_forward_pre_hook(
                    lambda _m, args: (args[0].detach(),)))

    def step(self, batch: Batch, step: int, micro_batches: int = 1) -> tuple[float, dict[str, torch.Tensor | None]]:
        """Loss and LoRA gradients of optimizer step `step`, accumulated over `micro_batches` consecutive row blocks."""
        self.model.zero_grad(set_to_none=True)
        total = 0.0
        n_all = int((batch.labels[:, 1:] != -100).sum())
        blocks = zip(*(t.tensor_split(micro_batches) for t in (batch.input_ids, batch.attention_mask, batch.labels)))
        for mb, (ids, mask, labels) in enumerate(blocks):
            width = int(mask.sum(dim=1).max())
            ids, mask, labels = ids[:, :width], mask[:, :width], labels[:, :width]
            share = int((labels[:, 1:] != -100).sum()) / n_all
            self.clock.now = (step, mb)
            loss = self.model(input_ids=ids, attention_mask=mask, labels=labels).loss * share
            self.clock.now = None
            loss.backward()
            total += float(loss.detach())
        return total, {k: p.grad for k, p in self.weights().items()}


def split_for(model_dir, family: str, address: str, tmp_path, ref: PeftReference, dropout: float,
              micro_batches: int = 1, **extra) -> SplitEngine:
    cfg = TrainConfig(model=model_dir, data=tmp_path / "unused.jsonl", output=tmp_path, cloud=address, rank=RANK,
                      alpha=ALPHA, lora_dropout=dropout, targets=tuple(TARGETS[family]), seed=SEED,
                      micro_batches=micro_batches, progress=False, **extra)
    split = SplitEngine(cfg)
    ref_weights = ref.weights()
    ours = dict(split.adapter.named_lora_parameters())
    assert set(ours) == set(ref_weights), "the split trains other modules than PEFT selects"
    with torch.no_grad():
        for key, p in ours.items():
            p.copy_(ref_weights[key])
    assert all(bool(ref_weights[k].detach().any()) for k in ours if ".lora_B." in k), "B must be non-zero"
    return split


def split_step(split: SplitEngine, batch: Batch, step: int, active: set[int],
               mode: KillMode) -> tuple[float, dict[str, torch.Tensor | None]]:
    for p in split.parameters():
        p.grad = None
    split.set_active(active, mode)
    roles = layer_roles(active, split.num_layers, mode)
    loss, traffic = split.train_step(batch, step, roles)
    assert traffic.payload_up > 0 and traffic.payload_down > 0
    if split.link.protocol == "adapter":  # LoRA on the cloud: no layer calls; weights and gradients layer by layer
        assert 1 <= traffic.messages.get("up:step_weights", 0) <= split.num_layers
        assert traffic.messages.get("down:lora_grads") == len(active)
        assert not any(k.endswith(("lora_forward", "lora_backward")) for k in traffic.messages), traffic.messages
    return loss, {k: p.grad for k, p in split.adapter.named_lora_parameters()}


def check_step(what: str, ref: PeftReference, split: SplitEngine, batch: Batch, step: int, active: set[int],
               mode: KillMode, micro_batches: int = 1) -> None:
    """One optimizer step with these active modules in `mode`, PEFT's and the split's, compared."""
    ref.set_active(active, mode)
    want = ref.step(batch, step, micro_batches)
    got = split_step(split, batch, step, active, mode)
    assert_same_step(f"{what} {mode} active={sorted(active)}", active, got, want)


def sgd_both(theirs: dict[str, torch.Tensor], ours: dict[str, torch.Tensor], lr: float = 0.5) -> None:
    """The same update on both sides, from PEFT's gradients: a plain SGD step on PEFT's trained weights,
    then ours set to exactly those (so the next step starts from equal, new, non-zero B)."""
    with torch.no_grad():
        for key, p in theirs.items():
            if p.grad is not None:
                p -= lr * p.grad
            ours[key].copy_(p)


def assert_same_step(what: str, active: set[int], got: tuple[float, dict], want: tuple[float, dict]) -> None:
    (loss_s, grads_s), (loss_p, grads_p) = got, want
    assert loss_s == pytest.approx(loss_p, rel=1e-5), what
    assert set(grads_s) == set(grads_p)
    for key, gp in grads_p.items():
        gs = grads_s[key]
        layer = int(re.search(r"\.(\d+)\.", key).group(1))
        if layer not in active:  # killed: PEFT has no gradient, nor may the split
            assert gp is None, f"{what} {key}: the reference trains a killed module"
            assert gs is None, f"{what} {key}: the split trains a killed module"
            continue
        assert gp is not None and gs is not None, f"{what} {key}: no gradient"
        assert bool(gp.any()), f"{what} {key}: a zero gradient proves nothing"
        torch.testing.assert_close(gs, gp, rtol=1e-5, atol=GRAD_ATOL * float(gp.abs().max()),
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


@pytest.mark.parametrize("mode", ["frozen", "detached", "dropped"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_equals_peft_per_kill_mode(family, mode, tiny_dir, cloud, tmp_path):
    """M = 1 with LoRA dropout 0.1 (the same draws on both sides): loss and every LoRA gradient, for
    every active set of ACTIVE_SETS, in one session."""
    model_dir = tiny_dir(family, layers=LAYERS)
    ref = PeftReference(model_dir, family, dropout=0.1, init_seed=11)
    split = split_for(model_dir, family, cloud(model_dir), tmp_path, ref, dropout=0.1)
    batch = make_batch(model_dir)
    try:
        for step, active in enumerate(ACTIVE_SETS):
            check_step(family, ref, split, batch, step, active, mode)
    finally:
        split.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_micro_batches_equal_peft(family, tiny_dir, cloud, tmp_path):
    """M = 2 or 3 micro-batches of unequal width (each drops its own padding columns), all active and
    each kill mode with a killed layer below and above the active one, LoRA dropout 0.1: the masks are
    keyed by micro-batch, so the order in which the cloud's threads reach the layers does not matter."""
    m = 2 if FAMILIES.index(family) % 2 == 0 else 3
    model_dir = tiny_dir(family, layers=LAYERS)
    ref = PeftReference(model_dir, family, dropout=0.1, init_seed=12)
    split = split_for(model_dir, family, cloud(model_dir), tmp_path, ref, dropout=0.1, micro_batches=m)
    batch = make_batch(model_dir)
    cases: list[tuple[set[int], KillMode]] = [({0, 1, 2}, "detached"), ({1}, "frozen"), ({1}, "detached"),
                                              ({1}, "dropped"), ({0, 2}, "frozen")]
    try:
        for step, (active, mode) in enumerate(cases):
            check_step(f"{family} M={m}", ref, split, batch, step, active, mode, m)
    finally:
        split.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_protocol_equals_peft(family, tiny_dir, cloud, tmp_path):
    """The adapter protocol (LoRA applied on the cloud from weights sent once per step), M = 2 or 3, LoRA
    dropout 0.1, over every kill mode with killed layers below and above the active ones: loss and every
    LoRA gradient equal PEFT's within the module docstring's tolerances. The steps run in one session, so
    later steps use weights the cloud already holds. Between steps the weights change (a plain SGD step
    on the trained modules) so each step's B is new and non-zero on both sides."""
    m = 3 if FAMILIES.index(family) % 2 == 0 else 2
    model_dir = tiny_dir(family, layers=LAYERS)
    ref = PeftReference(model_dir, family, dropout=0.1, init_seed=13)
    split = split_for(model_dir, family, cloud(model_dir), tmp_path, ref, dropout=0.1, micro_batches=m,
                      protocol="adapter")
    batch = make_batch(model_dir)
    cases: list[tuple[set[int], KillMode]] = [({0, 1, 2}, "frozen"), ({1}, "frozen"), ({1}, "detached"),
                                              ({1}, "dropped"), ({0, 2}, "frozen"), ({0, 2}, "detached")]
    ours = dict(split.adapter.named_lora_parameters())
    theirs = ref.weights()
    try:
        for step, (active, mode) in enumerate(cases):
            check_step(f"{family} adapter M={m}", ref, split, batch, step, active, mode, m)
            sgd_both(theirs, ours)
    finally:
        split.close()
