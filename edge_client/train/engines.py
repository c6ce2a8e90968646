"""Two ways to compute one training step's loss and LoRA gradients, with one interface.

- SplitEngine: the dlora way. Embedding, head, loss and LoRA on this device; the frozen decoder
  blocks on dlora-cloud, over one gRPC session.
- LocalEngine: plain `peft.get_peft_model` on one machine, the baseline dlora is compared with.

Both start from the same LoRA weights (LoraAdapter's seeded init) and run the frozen base in
eval mode (its own dropout off) with LoRA dropout on, so with the same seed they draw the same
dropout masks and train the same adapter.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import torch
from peft import get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from common.config import TORCH_DTYPES, KillMode, TrainConfig
from common.scheduler import Decision, KRState
from edge_client.train.lora import LoraAdapter, lora_config
from edge_client.train.data import Batch, lm_loss
from edge_client.train.kill_revive import LocalScheduler, kr_config
from edge_client.remote.link import CloudLink, MicroBatch, Traffic
from edge_client.train.model_parts import EdgeModel

log = logging.getLogger(__name__)


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


class SplitEngine:
    """Edge half of split training; `roles` says per layer what this step does with its LoRA group."""

    def __init__(self, cfg: TrainConfig, edge: EdgeModel | None = None) -> None:
        if cfg.cloud is None:
            raise ValueError("SplitEngine needs cfg.cloud")
        self.edge = edge or EdgeModel(cfg.model, cfg.targets, cfg.device)
        self.tokenizer = self.edge.tokenizer
        self.num_layers = self.edge.num_layers
        self.adapter = LoraAdapter(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.seed)
        self.link = CloudLink(cfg.cloud, self.edge, cfg.codec_up, cfg.connect_timeout_s, cfg.reply_timeout_s,
                              cfg.max_message_mb, kr_config(cfg, self.num_layers), cfg.codec_down, cfg.int8_block_size)
        self.link.open()
        self.micro_batches = cfg.micro_batches

    @property
    def session_id(self) -> str:
        return self.link.session_id

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.adapter.named_lora_parameters()]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return self.adapter.named_lora_parameters()

    def scheduler_state(self) -> str | None:
        return None  # the cloud keeps it, under the session id

    def resume(self, session_id: str, scheduler_state: str | None) -> None:
        """Continue the checkpoint's cloud session (its Kill-and-Revive state lives there)."""
        if session_id and session_id != self.link.session_id:
            self.link.session_id = session_id
            self.link.open()

    def params_by_layer(self) -> dict[int, list[nn.Parameter]]:
        out: dict[int, list[nn.Parameter]] = {}
        for t, pair in zip(self.adapter.targets, self.adapter.pairs):
            out.setdefault(t.layer, []).extend([pair.A, pair.B])
        return out

    def set_active(self, active: set[int], mode: KillMode) -> None:
        """Killed modules get no weight gradients (their optimizer state stays); the roles do the rest."""
        for t, pair in zip(self.adapter.targets, self.adapter.pairs):
            pair.requires_grad_(t.layer in active)

    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision:
        """The cloud's scheduler decides."""
        return self.link.report_epoch(epoch, deltas)

    def train_step(self, batch: Batch, step: int, roles: list[int]) -> tuple[float, Traffic]:
        """One optimizer step's loss and gradients, as `micro_batches` overlapped micro-batches."""
        n_tokens = batch.label_tokens  # the whole batch's: micro-batch losses add up to its mean
        losses: list[float] = []
        parts = []
        dev = self.edge.device
        for ids, mask, labels in zip(*(t.to(dev).tensor_split(self.micro_batches) for t in
                                       (batch.input_ids, batch.attention_mask, batch.labels))):
            if ids.shape[0] == 0:
                continue
            width = int(mask.sum(dim=1).max())  # drop the padding columns this micro-batch does not need
            ids, mask, labels = ids[:, :width], mask[:, :width].cpu(), labels[:, :width]

            def on_hidden(h: torch.Tensor, labels: torch.Tensor = labels) -> torch.Tensor:
                h = h.detach().requires_grad_(True)  # (b, t, E_out)
                loss = lm_loss(self.edge.logits(h), labels, n_tokens)
                loss.backward()
                losses.append(float(loss.detach()))
                return h.grad  # type: ignore[return-value]

            with torch.no_grad():
                parts.append(MicroBatch(self.edge.embed(ids), mask, on_hidden))  # (b, t, E)
        traffic = self.link.run_micro_batches(step, parts, roles, True, self.adapter)
        return sum(losses), traffic

    def recover(self) -> None:
        """Reconnect after a broken stream, resuming the same cloud session id."""
        self.adapter.discard_pending()
        self.link.open()

    def save(self, out_dir: Path) -> None:
        self.adapter.save(out_dir)

    def close(self) -> None:
        self.link.close()


class LocalEngine:
    """PEFT LoRA on the whole model in this process (the cloud-only baseline)."""

    def __init__(self, cfg: TrainConfig, edge: EdgeModel | None = None) -> None:
        self.edge = edge or EdgeModel(cfg.model, cfg.targets)  # layout, tokenizer and init only: on the CPU
        self.tokenizer = self.edge.tokenizer
        self.num_layers = self.edge.num_layers
        init = LoraAdapter(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout, cfg.seed)
        base = AutoModelForCausalLM.from_pretrained(str(cfg.model), dtype=TORCH_DTYPES[cfg.dtype])
        # PEFT keeps LoRA weights in float32 on a bfloat16/float16 base (autocast_adapter_dtype)
        self.model = get_peft_model(base, lora_config(self.edge, cfg.rank, cfg.alpha, cfg.lora_dropout)).to(cfg.device)
        own = dict(self.model.named_parameters())
        self._params: list[nn.Parameter] = []
        self._names = [key for key, _ in init.named_lora_parameters()]  # PEFT adapter keys, as the split names them
        self.session_id = ""
        with torch.no_grad():
            for key, value in init.named_lora_parameters():
                value = value.to(cfg.device)
                name = key.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
                own[name].copy_(value)
                self._params.append(own[name])
        self.model.eval()  # frozen base without its dropout, as on the cloud
        for name, module in self.model.named_modules():
            if ".lora_dropout." in name:
                module.train()
        root = self.model.base_model.model
        self._lora = [(t.layer, root.get_submodule(t.name)) for t in self.edge.targets]  # PEFT LoraLayers
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
        dev = self._params[0].device
        logits = self.model(input_ids=batch.input_ids.to(dev), attention_mask=batch.attention_mask.to(dev),
                            use_cache=False).logits
        loss = lm_loss(logits, batch.labels.to(dev), batch.label_tokens)
        loss.backward()
        return float(loss.detach()), Traffic()

    def recover(self) -> None:
        pass

    def save(self, out_dir: Path) -> None:
        self.model.save_pretrained(str(out_dir))

    def close(self) -> None:
        pass
