"""The frozen decoder stack the cloud hosts, with a remote-LoRA slot around every LoRA-able module.

The stack is the Hugging Face *base* model (AutoModel) run on `inputs_embeds`, so whatever the
architecture applies to the embeddings (positions, ALiBi, embedding layernorm, the final norm)
happens here, exactly as in the full model. Its input embedding table is dropped: the edge owns it.

A slot adds nothing unless the current thread is running a session step (`active_step`), in
which case it adds the delta the session's step obtains from the edge. Many sessions share one
stack: the step is looked up per thread, the weights are never written.

A session whose device runs the first k layers itself (`--edge-layers k`) starts at layer k: `run`
then goes through a view of the same model (common.model_views.start_view, made once per k and kept)
that has layers k.. only and skips what the model applies to `inputs_embeds` before its first layer.
Its slots are the stack's own, so they keep their true layer index.
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from transformers import AutoModel

from common.config import torch_dtype
from common.errors import ConfigError
from common.families import Family, family_of, hidden_width, linear_shape, max_positions
from common.model_files import fingerprint, load_config, tensor_index
from common.model_views import start_view

log = logging.getLogger(__name__)


class StepDeltas(Protocol):
    """What a slot asks of the running step (implemented by cloud_server.step.StepRun)."""

    def delta_for(self, layer: int, group: int, path: str, x: torch.Tensor) -> torch.Tensor | None: ...


_active: contextvars.ContextVar[StepDeltas | None] = contextvars.ContextVar("dlora_active_step", default=None)


@contextmanager
def active_step(step: StepDeltas) -> Iterator[None]:
    """Route every slot called in this thread to `step` while the block runs."""
    token = _active.set(step)
    try:
        yield
    finally:
        _active.reset(token)


class RemoteLoraSlot(nn.Module):
    """A frozen linear (nn.Linear or GPT-2's Conv1D) plus the LoRA delta of the active step."""

    def __init__(self, base: nn.Module, layer: int, group: int, path: str) -> None:
        super().__init__()
        self.base = base
        self.layer, self.group, self.path = layer, group, path
        self.in_features, self.out_features = linear_shape(base)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        step = _active.get()
        if step is None:
            return out
        delta = step.delta_for(self.layer, self.group, self.path, x)
        return out if delta is None else out + delta.to(out.device, out.dtype)


class DecoderStack:
    """The frozen base model of one model folder, ready to serve sessions.

    Raises:
        ConfigError: the folder is unusable, the architecture unsupported, or the device missing.
    """

    def __init__(self, model_dir: Path, device: str = "cpu", dtype: str = "float32", device_map: str | None = None) -> None:
        """device_map: accelerate's placement of the layers over the visible GPUs, then the CPU (it overrides
        `device`); `self.device` is then where the first layer runs, and each slot adds its delta where its
        module runs."""
        self.model_dir = Path(model_dir)
        self.config = load_config(self.model_dir)
        self.family: Family = family_of(self.config.model_type)
        tensor_index(self.model_dir)  # fail early, with a clear message, on a folder without weights
        if device == "cuda" and not torch.cuda.is_available() and device_map is None:
            raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
        self.dtype = torch_dtype(dtype)
        self.fingerprint = fingerprint(self.model_dir)
        model = AutoModel.from_pretrained(str(self.model_dir), dtype=self.dtype,
                                          **({"device_map": device_map} if device_map else {}))
        model.set_input_embeddings(None)  # the edge owns the embedding table
        model.requires_grad_(False)
        self.model = model.eval() if device_map else model.eval().to(device)
        self.layers = self.model.get_submodule(self.family.layers)
        self.device = next(self.layers[0].parameters()).device  # where the embeddings go in
        self.placement = sorted({str(p.device) for p in self.model.parameters()})  # for the log
        self.num_layers = len(self.layers)
        self.slots = self._install_slots()
        self.embed_width = self._embed_width()
        self.max_positions = max_positions(self.config)  # None: no known cap on T
        self._views: dict[int, nn.Module] = {}  # start layer k > 0 -> the model from layer k on (start_view)
        self._views_lock = threading.Lock()
        log.info(
            "loaded %s (%d layers, %s, %s) fingerprint %s",
            self.config.model_type, self.num_layers, dtype, ", ".join(self.placement), self.fingerprint,
        )

    def _install_slots(self) -> dict[tuple[int, str], RemoteLoraSlot]:
        slots: dict[tuple[int, str], RemoteLoraSlot] = {}
        for i, layer in enumerate(self.layers):
            for g, group in enumerate(self.family.input_groups):
                for path in group:
                    parent_path, _, attr = path.rpartition(".")
                    parent = layer.get_submodule(parent_path) if parent_path else layer
                    slot = RemoteLoraSlot(getattr(parent, attr), i, g, path)
                    setattr(parent, attr, slot)
                    slots[(i, path)] = slot
        return slots

    def _embed_width(self) -> int:
        # OPT may project embeddings (word_embed_proj_dim) before the first layer.
        return int(getattr(self.config, "word_embed_proj_dim", None) or self.config.hidden_size)

    def out_width(self, path: str) -> int:
        """Output width of a LoRA-able module (the same in every layer)."""
        return int(self.slots[(0, path)].out_features)

    def in_width(self, path: str) -> int:
        """Input width of a LoRA-able module."""
        return int(self.slots[(0, path)].in_features)

    def entry_width(self, start: int = 0) -> int:
        """Width of what goes in at layer `start`: the embeddings (E) at 0, the hidden states (H) after."""
        return self.embed_width if start == 0 else hidden_width(self.config)

    def entry_device(self, start: int = 0) -> torch.device:
        """Where layer `start` runs: where its input goes."""
        return self.device if start == 0 else next(self.layers[start].parameters()).device

    def view(self, start: int) -> nn.Module:
        """The model from layer `start` on (the model itself for 0), made on first use and kept.

        Raises:
            ValueError: start is not a layer of this model.
        """
        if start == 0:
            return self.model
        if not 0 < start < self.num_layers:
            raise ValueError(f"start layer {start}: this model has layers 0..{self.num_layers - 1}")
        with self._views_lock:
            if start not in self._views:
                self._views[start] = start_view(self.model, self.family, start)
            return self._views[start]

    def run(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Final hidden states (after the final norm) for embeddings (B, T, E) -> (B, T, E_out); from layer
        `start` on for the hidden states (B, T, H) after the device's layer start-1."""
        device = self.entry_device(start)
        out = self.view(start)(
            inputs_embeds=embeddings.to(device, self.dtype),
            attention_mask=attention_mask.to(device),
            use_cache=False,
        )
        return out.last_hidden_state
