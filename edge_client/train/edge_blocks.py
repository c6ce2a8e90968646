"""The first k decoder blocks on the device (`dlora train --edge-layers k`), with their LoRA applied here.

The cloud then never sees the input embeddings, only the hidden states after block k-1 (issue 16's first
defence: a probe recovers fewer tokens the deeper the cut, DESIGN.md "What privacy it gives").

The blocks are the Hugging Face base model (AutoModel) built from a copy of the config with k layers
(common.families.with_layers), so positions, rotary embeddings, ALiBi and the embedding layernorm run
exactly as in the full model; its final norm is made the identity (common.model_views.drop_final), so it
outputs the hidden states after block k-1, what the cloud's view from layer k takes. The skeleton is
made with parameters on the `meta` device and only these k blocks' tensors are read from the folder: the
device never materialises a block >= k, nor a second embedding table (the input embedding is the
EdgeModel's, passed in as `inputs_embeds`).

Each LoRA target of these blocks is wrapped in a `_LocalLoraSlot` that adds the delta of the adapter's
own pair for it (LoraAdapter.target_delta: the same A and B, the same keyed dropout masks as if the cloud
had asked for it), so the exported adapter stays one PEFT adapter over every layer. A slot follows the
layer's role of the running step: ABSENT adds nothing (`dropped`), FORWARD adds a delta with no gradient
through it (`detached`, or evaluation), FORWARD_BACKWARD lets the gradient through.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModel

from common.errors import ConfigError
from common.families import Family, with_layers
from common.model_files import TensorEntry, find_tensor, read_tensors
from common.model_views import drop_final
from common.pb.dlora.v1 import dlora_pb2 as pb

if TYPE_CHECKING:
    from edge_client.train.lora import LoraAdapter


@dataclass(frozen=True)
class _Pass:
    """What the slots need of the forward that runs now."""

    lora: LoraAdapter | None
    roles: list[int]  # pb.LayerRole per layer of the whole model
    step: tuple[int, int] | None  # (optimizer step, micro-batch): keys the dropout masks; None: no dropout


_now: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar("dlora_edge_pass", default=None)


@contextmanager
def _running(p: _Pass) -> Iterator[None]:
    token = _now.set(p)
    try:
        yield
    finally:
        _now.reset(token)


class _LocalLoraSlot(nn.Module):
    """A frozen linear of an edge block plus its LoRA delta, as the running pass's role for the layer says."""

    def __init__(self, base: nn.Module, layer: int, path: str) -> None:
        super().__init__()
        self.base, self.layer, self.path = base, layer, path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        now = _now.get()
        if now is None or now.lora is None or now.roles[self.layer] == pb.ABSENT:
            return out
        through = now.roles[self.layer] == pb.FORWARD_BACKWARD  # the gradient goes through the low-rank path
        with torch.set_grad_enabled(torch.is_grad_enabled() and through):
            delta = now.lora.target_delta(self.layer, self.path, x if through else x.detach(), now.step)
        return out + delta  # outside: the gradient through the frozen path flows whatever the role


class EdgeBlocks(nn.Module):
    """Blocks 0..k-1 of the base model, frozen, with a local LoRA slot around each target.

    Raises:
        ConfigError: the folder lacks a tensor of these blocks.
    """

    def __init__(
        self,
        config: Any,
        family: Family,
        k: int,
        groups: list[tuple[str, ...]],
        index: dict[str, TensorEntry],
        model_dir: str,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.k = k
        with init_empty_weights(include_buffers=False):  # parameters on meta; rotary tables made for real
            model = AutoModel.from_config(with_layers(config, 0, k))
        model.set_input_embeddings(None)  # the EdgeModel's embedding feeds it (inputs_embeds)
        drop_final(model, family)
        prefix = model.base_model_prefix
        wanted = {
            n: find_tensor(index, family.stored_names(f"{prefix}.{n}"), prefix) for n, _ in model.named_parameters()
        }
        missing = [n for n, key in wanted.items() if key is None]
        if missing:
            raise ConfigError(f"model folder {model_dir} lacks {prefix}.{missing[0]}; is it a complete checkpoint?")
        loaded = read_tensors(index, [key for key in wanted.values() if key is not None])
        for name, key in wanted.items():
            owner_path, _, attr = name.rpartition(".")
            owner = model.get_submodule(owner_path)
            setattr(owner, attr, nn.Parameter(loaded.pop(key).to(device, torch.float32), requires_grad=False))  # type: ignore[arg-type]
        self.model = model.to(device).requires_grad_(False).eval()
        layers = self.model.get_submodule(family.layers)
        for i, layer in enumerate(layers):
            for group in groups:
                for path in group:
                    parent_path, _, attr = path.rpartition(".")
                    parent = layer.get_submodule(parent_path) if parent_path else layer
                    setattr(parent, attr, _LocalLoraSlot(getattr(parent, attr), i, path))

    def run(
        self,
        embeddings: torch.Tensor,
        attention_mask: torch.Tensor,
        lora: LoraAdapter | None,
        roles: list[int],
        step: tuple[int, int] | None,
    ) -> torch.Tensor:
        """Input embeddings (B, T, E) -> hidden states after block k-1 (B, T, H), with the LoRA of `lora` where
        `roles` (one per layer of the whole model) applies it. Autograd records the graph when grad mode is on.

        step: (optimizer step, micro-batch) when training, which keys the dropout masks; None: no dropout.
        """
        with _running(_Pass(lora, roles, step)):
            out = self.model(
                inputs_embeds=embeddings, attention_mask=attention_mask.to(embeddings.device), use_cache=False
            )
        return out.last_hidden_state  # type: ignore[no-any-return]
