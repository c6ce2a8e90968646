"""Two ways to compute one training step's loss and LoRA gradients, with one interface.

- SplitEngine (edge_client.remote.split_engine): the dlora way. Embedding, head, loss and LoRA on
  this device; the frozen decoder blocks on dlora-cloud, over one gRPC session.
- LocalEngine: plain `peft.get_peft_model` on one machine, the baseline dlora is compared with.

Both start from the same LoRA weights (LoraAdapter's seeded init), run the frozen base in eval mode
(its own dropout off), split a step into the same --micro-batches, and draw LoRA dropout masks keyed
by (seed, step, micro-batch, layer, target) (common/lora_math.py), so with the same seed they draw
the same masks and train the same adapter.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from common.config import KillMode, TrainConfig, torch_dtype
from common.lora_math import DropoutClock, KeyedDropout
from common.scheduler import Decision, KRState
from edge_client.train.data import Batch, lm_loss
from edge_client.train.kill_revive import LocalScheduler, kr_config
from edge_client.train.lora import LoraAdapter, live_key, lora_config
from edge_client.train.model_parts import EdgeModel

log = logging.getLogger(__name__)


@dataclass
class Traffic:
    """Bytes of one step by direction (up: device to cloud): tensor payload, and whole serialized
    messages as they cross the wire. All zero for a step computed locally."""

    payload_up: int = 0
    payload_down: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    messages: dict[str, int] = field(default_factory=dict)  # message kind -> count


class Engine(Protocol):
    """What the training loop needs of a way to compute a step."""

    tokenizer: PreTrainedTokenizerBase
    num_layers: int
    edge: EdgeModel

    session_id: str

    def parameters(self) -> list[nn.Parameter]: ...
    def named_parameters(self) -> list[tuple[str, nn.Parameter]]: ...
    def scheduler_state(self) -> str | None: ...
    def resume(self, session_id: str, scheduler_state: str | None) -> None: ...
    def params_by_layer(self) -> dict[int, list[nn.Parameter]]: ...
    def set_active(self, active: set[int], mode: KillMode) -> None: ...
    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision: ...
    def train_step(self, batch: Batch, step: int, roles: list[int]) -> tuple[float, Traffic]: ...
    def recover(self) -> None: ...
    def save(self, out_dir: Path) -> None: ...
    def close(self) -> None: ...


class LocalEngine:
    """PEFT LoRA on the whole model in this process (the cloud-only baseline)."""

    def __init__(self, cfg: TrainConfig, edge: EdgeModel | None = None) -> None:
        self.edge = edge or EdgeModel(cfg.model, cfg.targets)  # layout, tokenizer and init only: on the CPU
        self.tokenizer = self.edge.tokenizer
        self.num_layers = self.edge.num_layers
        init = LoraAdapter(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.seed)
        base = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=torch_dtype(cfg.dtype))
        # PEFT keeps LoRA weights in float32 on a bfloat16/float16 base (autocast_adapter_dtype)
        self.model = get_peft_model(base, lora_config(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout)).to(cfg.device)
        own = dict(self.model.named_parameters())
        self._params: list[nn.Parameter] = []
        self._names = [key for key, _ in init.named_lora_parameters()]  # PEFT adapter keys, as the split names them
        self.session_id = ""
        with torch.no_grad():
            for key, value in init.named_lora_parameters():
                value = value.to(cfg.device)
                name = live_key(key)
                own[name].copy_(value)
                self._params.append(own[name])
        self.model.eval()  # frozen base without its dropout, as on the cloud
        root = self.model.base_model.model
        self._lora = [(t.layer, root.get_submodule(t.name)) for t in self.edge.targets]  # PEFT LoraLayers
        # LoRA dropout with the split's keyed masks (common/lora_math.py), in PEFT's own dropout slot
        self.clock = DropoutClock()
        per_layer = len(self._lora) // self.num_layers
        for i, (layer, module) in enumerate(self._lora):
            if cfg.lora_dropout > 0:
                module.lora_dropout["default"] = KeyedDropout(cfg.lora_dropout, cfg.seed, layer, i % per_layer,
                                                              self.clock).train()
        self.micro_batches = cfg.micro_batches
        self._detach_hooks: list[torch.utils.hooks.RemovableHandle] = []
        self.scheduler = LocalScheduler(kr_config(cfg, self.num_layers))

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return list(zip(self._names, self._params))

    def scheduler_state(self) -> str | None:
        return self.scheduler.state.to_json()

    def resume(self, session_id: str, scheduler_state: str | None) -> None:
        if scheduler_state:
            self.scheduler.state = KRState.from_json(scheduler_state)

    def params_by_layer(self) -> dict[int, list[nn.Parameter]]:
        out: dict[int, list[nn.Parameter]] = {}
        for (layer, _), a, b in zip(self._lora, self._params[0::2], self._params[1::2]):
            out.setdefault(layer, []).extend([a, b])
        return out

    def set_active(self, active: set[int], mode: KillMode) -> None:
        """The kill modes in plain PEFT: requires_grad off (frozen), input detached (detached), adapter off (dropped)."""
        for h in self._detach_hooks:
            h.remove()
        self._detach_hooks = []
        for (layer, module), a, b in zip(self._lora, self._params[0::2], self._params[1::2]):
            killed = layer not in active
            a.requires_grad_(not killed)
            b.requires_grad_(not killed)
            module._disable_adapters = killed and mode == "dropped"
            if killed and mode == "detached":
                dropout = module.lora_dropout["default"]
                self._detach_hooks.append(dropout.register_forward_pre_hook(lambda _m, args: (args[0].detach(),)))

    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision:
        """The same policy as the cloud's, in this process."""
        return self.scheduler.decide(epoch, deltas)

    def train_step(self, batch: Batch, step: int, roles: list[int]) -> tuple[float, Traffic]:
        """The step as --micro-batches micro-batches one after another (gradient accumulation), split as the
        split run splits it, so both draw the same dropout masks."""
        dev = self._params[0].device
        total = 0.0
        for mb, part in enumerate(batch.split(self.micro_batches)):
            self.clock.now = (step, mb)
            try:
                logits = self.model(input_ids=part.input_ids.to(dev), attention_mask=part.attention_mask.to(dev),
                                    use_cache=False).logits
            finally:
                self.clock.now = None
            loss = lm_loss(logits, part.labels.to(dev), batch.label_tokens)  # the whole batch's count
            loss.backward()
            total += float(loss.detach())
        return total, Traffic()

    def recover(self) -> None:
        pass

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(str(out_dir))

    def close(self) -> None:
        pass
