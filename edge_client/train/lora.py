"""The LoRA modules, held on the device: delta = s * B(A(dropout(x))), s = alpha / r, as in PEFT
(common/lora_math.py, with its keyed dropout masks).

Initialisation follows PEFT's default (A kaiming-uniform with a=sqrt(5), B zero), drawn from a
generator seeded by --seed in target order, so the split run and the local PEFT run start from
the same weights. Export writes a standard PEFT adapter folder.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import ConfigError
from common.lora_math import dropout_key, lora_delta
from common.wire.adapter import AdapterLayout
from edge_client.train.model_parts import EdgeModel, Target

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def peft_key(target: Target, which: str) -> str:
    """The key PEFT uses for a LoRA tensor in a saved adapter (which = "lora_A" | "lora_B")."""
    return f"base_model.model.{target.name}.{which}.weight"


def live_key(saved_key: str, adapter_name: str = "default") -> str:
    """A saved adapter's key as a live PeftModel names the parameter (PEFT inserts the adapter name)."""
    return saved_key.replace(".lora_A.weight", f".lora_A.{adapter_name}.weight").replace(
        ".lora_B.weight", f".lora_B.{adapter_name}.weight")


def saved_key(live: str, adapter_name: str = "default") -> str:
    """The inverse of live_key: a live PeftModel parameter name as a saved adapter stores it."""
    return live.replace(f".lora_A.{adapter_name}.", ".lora_A.").replace(f".lora_B.{adapter_name}.", ".lora_B.")


class LoraPair(nn.Module):
    """A and B of one target module."""

    def __init__(self, target: Target, rank: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, target.in_features))  # (r, in)
        self.B = nn.Parameter(torch.zeros(target.out_features, rank))  # (out, r)


class LoraAdapter(nn.Module):
    """Every target's LoRA pair, addressed by (layer, group) the way the cloud asks for them."""

    def __init__(self, edge: EdgeModel, rank: int, alpha: float, dropout: float, seed: int = 0) -> None:
        super().__init__()
        self.edge = edge
        self.rank, self.alpha, self.dropout_p, self.seed = rank, alpha, dropout, seed
        self.scaling = alpha / rank
        self.targets = edge.targets
        self.per_layer = len(self.targets) // edge.num_layers  # targets in every layer
        # the adapter protocol's module numbering: module i is self.pairs[i] (targets are layer-major)
        self.layout = AdapterLayout(edge.num_layers, rank,
                                    tuple((t.in_features, t.out_features) for t in self.targets[: self.per_layer]))
        self.pairs = nn.ModuleList(LoraPair(t, rank) for t in self.targets)
        self.by_group: dict[tuple[int, int], list[int]] = {}
        for i, t in enumerate(self.targets):
            self.by_group.setdefault((t.layer, t.group), []).append(i)
        self.by_target = {(t.layer, t.path): i for i, t in enumerate(self.targets)}  # (layer, path) -> pair index
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for pair in self.pairs:
                nn.init.kaiming_uniform_(pair.A, a=math.sqrt(5), generator=gen)
        self.to(edge.device)  # drawn on the CPU generator first, so every device starts from the same weights
        self.train()

    def delta(self, layer: int, group: int, x: torch.Tensor, step: tuple[int, int] | None) -> torch.Tensor:
        """s * B(A(dropout(x))) of every target of a layer group, concatenated: (B, T, H) -> (B, T, O).

        step: (optimizer step, micro-batch) when training, which keys the dropout masks; None: no dropout.
        Autograd records the graph when grad mode is on (the caller keeps it for the backward).
        """
        parts = [self._delta(i, x, step) for i in self.by_group[(layer, group)]]  # (B, T, out_i) each
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]

    def target_delta(self, layer: int, path: str, x: torch.Tensor, step: tuple[int, int] | None) -> torch.Tensor:
        """s * B(A(dropout(x))) of one target (x (..., in) -> (..., out)), as `delta` computes it for its group:
        what an edge block's local slot adds (edge_blocks.py)."""
        return self._delta(self.by_target[(layer, path)], x, step)

    def _delta(self, i: int, x: torch.Tensor, step: tuple[int, int] | None) -> torch.Tensor:
        p, layer = self.pairs[i], self.targets[i].layer
        key = None if step is None else dropout_key(self.seed, step[0], step[1], layer, i % self.per_layer)
        return lora_delta(x, p.A, p.B, self.scaling, self.dropout_p, key)

    def group_width(self, layer: int, group: int) -> int:
        return sum(self.targets[i].out_features for i in self.by_group[(layer, group)])

    def group_in_width(self, layer: int, group: int) -> int:
        return self.targets[self.by_group[(layer, group)][0]].in_features

    # -- PEFT interop
    def named_lora_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(PEFT key, parameter) for every A and B, in target order."""
        out: list[tuple[str, nn.Parameter]] = []
        for t, p in zip(self.targets, self.pairs):
            out += [(peft_key(t, "lora_A"), p.A), (peft_key(t, "lora_B"), p.B)]
        return out

    def peft_config(self) -> LoraConfig:
        return lora_config(self.edge, self.rank, self.alpha, self.dropout_p)

    def save(self, out_dir: Path) -> Path:
        """Write adapter_config.json and adapter_model.safetensors, loadable by PeftModel.from_pretrained."""
        out_dir.mkdir(parents=True, exist_ok=True)
        self.peft_config().save_pretrained(str(out_dir))
        state = {k: v.detach().contiguous().clone() for k, v in self.named_lora_parameters()}
        tmp = out_dir / (ADAPTER_WEIGHTS + ".tmp")
        save_file(state, str(tmp), metadata={"format": "pt"})
        tmp.replace(out_dir / ADAPTER_WEIGHTS)
        return out_dir

    def load(self, adapter_dir: Path) -> None:
        """Load a PEFT adapter folder written for this base model and these targets.

        Raises:
            ConfigError: files missing, or the adapter's rank, targets or shapes differ.
        """
        cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
        if not cfg_path.is_file() or not w_path.is_file():
            raise ConfigError(f"--adapter {adapter_dir}: need {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} there")
        state = load_file(str(w_path))
        state = {saved_key(k): v for k, v in state.items()}
        with torch.no_grad():
            for key, param in self.named_lora_parameters():
                if key not in state:
                    raise ConfigError(f"--adapter {adapter_dir}: has no {key}; was it trained with other --targets?")
                if tuple(state[key].shape) != tuple(param.shape):
                    raise ConfigError(f"--adapter {adapter_dir}: {key} has shape {tuple(state[key].shape)}, "
                                      f"expected {tuple(param.shape)} (another --rank or base model?)")
                param.copy_(state[key].to(param.device))


def lora_config(edge: EdgeModel, rank: int, alpha: float, dropout: float) -> LoraConfig:
    """The PEFT LoraConfig that selects exactly the edge's targets."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(edge.target_paths),
        fan_in_fan_out=edge.config.model_type == "gpt2",  # GPT-2's Conv1D stores weights as (in, out)
        task_type="CAUSAL_LM",
        base_model_name_or_path=str(edge.model_dir),
    )


def read_adapter_config(adapter_dir: Path) -> dict:
    """The adapter's saved PEFT config as a dict.

    Raises:
        ConfigError: missing or not JSON.
    """
    path = adapter_dir / ADAPTER_CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--adapter {adapter_dir}: cannot read {ADAPTER_CONFIG} ({e})") from e
