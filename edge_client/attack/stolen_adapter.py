"""The adapter a curious cloud rebuilds from its recording, saved as a PEFT adapter, and how much of the
fine-tuning's held-out loss gain it gives (base model, the victim's adapter and the stolen one, scored
on the victim's held-out text with PEFT itself)."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from peft import get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from common.recording import RecordedMicroBatch
from edge_client.attack.recovery import factorise, fit_product
from edge_client.train.data import Example, collate, lm_loss
from edge_client.train.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_config, peft_key
from edge_client.train.model_parts import EdgeModel


def steal_adapter(edge: EdgeModel, mbs: list[RecordedMicroBatch], rank: int, alpha: float) -> tuple[dict[str, torch.Tensor], int]:
    """PEFT-keyed LoRA tensors rebuilt from the last recorded training step, and how many of the edge's
    target modules the recording showed (the others are zero: never seen).

    adapter protocol: the step's lora_A/lora_B as they crossed. layerwise: per layer group, delta on x
    by least squares, split by target, factorised at rank r with scaling alpha / r (only the product
    s B A matters, so the attacker's choice of r >= the true rank and of alpha changes nothing).
    """
    state = {peft_key(t, w): torch.zeros(rank, t.in_features) if w == "lora_A" else torch.zeros(t.out_features, rank)
             for t in edge.targets for w in ("lora_A", "lora_B")}
    train_steps = sorted({m.meta["step"] for m in mbs if m.meta["train"]})
    if not train_steps:
        return state, 0
    last = [m for m in mbs if m.meta["step"] == train_steps[-1]]
    seen = 0
    for t in edge.targets:
        a_name, b_name = f"lora_A.{t.layer}.{t.path}", f"lora_B.{t.layer}.{t.path}"
        holder = next((m for m in last if a_name in m.tensors and b_name in m.tensors), None)
        if holder is not None:
            state[peft_key(t, "lora_A")], state[peft_key(t, "lora_B")] = holder.tensors[a_name], holder.tensors[b_name]
            seen += 1
    if seen:
        return state, seen
    for layer in range(edge.num_layers):
        for group in sorted({t.group for t in edge.targets if t.layer == layer}):
            name = f"{layer}.{group}"
            xs = [_rows(m, f"lora_x.{name}") for m in last if f"lora_delta.{name}" in m.tensors]
            ds = [_rows(m, f"lora_delta.{name}") for m in last if f"lora_delta.{name}" in m.tensors]
            if not xs:
                continue
            m_all = fit_product(torch.cat(xs), torch.cat(ds))  # (in, sum of outs)
            start = 0
            for t in [t for t in edge.targets if t.layer == layer and t.group == group]:
                a, b = factorise(m_all[:, start : start + t.out_features], rank, alpha / rank)
                state[peft_key(t, "lora_A")], state[peft_key(t, "lora_B")] = a, b
                start += t.out_features
                seen += 1
    return state, seen


def _rows(m: RecordedMicroBatch, name: str) -> torch.Tensor:
    """The token rows (N, d) of a recorded (B, T, d) tensor (padding left out)."""
    keep = m.tensors["attention_mask"].bool()
    return m.tensors[name][keep]


def save_adapter(state: dict[str, torch.Tensor], like: Path, out_dir: Path) -> Path:
    """`state` as a PEFT adapter folder with the config of the adapter in `like`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(like / ADAPTER_CONFIG, out_dir / ADAPTER_CONFIG)
    save_file({k: v.contiguous().float() for k, v in state.items()}, str(out_dir / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    return out_dir


@torch.no_grad()
def heldout_losses(edge: EdgeModel, adapters: dict[str, Path | None], examples: list[Example], rank: int,
                   alpha: float, batch_size: int = 8) -> dict[str, float]:
    """Mean next-token loss of the full model (PEFT) on `examples` with each adapter (None: the base)."""
    base = AutoModelForCausalLM.from_pretrained(str(edge.model_dir), dtype=torch.float32)
    model = get_peft_model(base, lora_config(edge, rank, alpha, 0.0)).eval()
    pad = int(edge.tokenizer.pad_token_id)
    batches = [collate(examples[i : i + batch_size], pad) for i in range(0, len(examples), batch_size)]
    n_tokens = sum(b.label_tokens for b in batches)
    out: dict[str, float] = {}
    for name, folder in adapters.items():
        if folder is not None:
            set_peft_model_state_dict(model, load_file(str(folder / ADAPTER_WEIGHTS)))
        total = 0.0
        for b in batches:
            if folder is None:
                with model.disable_adapter():
                    logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            else:
                logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            total += float(lm_loss(logits, b.labels, n_tokens))
        out[name] = total
    return out
