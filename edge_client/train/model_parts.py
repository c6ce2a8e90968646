"""What the device holds of the base model: tokenizer, input embedding and output head; with
`--edge-layers k` also decoder blocks 0..k-1 (edge_blocks.py). Nothing else.

The full architecture is instantiated on the `meta` device only to read names and shapes (which
modules are targets, their widths, where the embedding and head live); meta tensors have no
storage, and that skeleton is dropped before this returns. The embedding and head weights are
read from the safetensors files by name, so the decoder blocks are never loaded on the device.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from common.errors import ConfigError, first_line
from common.families import (
    Family,
    family_of,
    hidden_width,
    linear_shape,
    max_positions,
    resolve_targets,
    target_groups,
)
from common.model_files import find_tensor, fingerprint, load_config, read_tensors, tensor_index
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.train.edge_blocks import EdgeBlocks

if TYPE_CHECKING:
    from edge_client.train.lora import LoraAdapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Target:
    """One LoRA target module in one decoder layer."""

    layer: int
    group: int
    path: str  # inside the layer, e.g. "self_attn.q_proj"
    name: str  # full module name in the causal-LM model, as PEFT names it
    in_features: int
    out_features: int


class EdgeModel:
    """Tokenizer, embedding and head of a model folder (and its first `edge_layers` decoder blocks), plus the
    LoRA target layout.

    Raises:
        ConfigError: the folder is unusable, the architecture unsupported, a target unknown, edge_layers
            out of range (checked before anything is loaded), or the tokenizer or weights are missing.
    """

    def __init__(self, model_dir: Path, targets: tuple[str, ...] | None = None, device: str = "cpu",
                 edge_layers: int = 0) -> None:
        """edge_layers: k, the decoder blocks this device runs itself (--edge-layers); 0 <= k < the model's layers."""
        self.model_dir = Path(model_dir)
        if device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("--device cuda: this machine has no usable CUDA device; use --device cpu")
        self.device = torch.device(device)
        self.config = load_config(self.model_dir)
        self.family: Family = family_of(self.config.model_type)
        total = int(self.config.num_hidden_layers)
        if edge_layers < 0:
            raise ConfigError(f"--edge-layers={edge_layers}: must be >= 0")
        if edge_layers >= total:
            raise ConfigError(f"--edge-layers={edge_layers}: the {self.config.model_type} model in {self.model_dir} "
                              f"has {total} decoder layers and the cloud needs at least one; use 0..{total - 1}")
        self.edge_layers = edge_layers
        self.target_paths = resolve_targets(self.family, targets)
        self.groups = target_groups(self.family, self.target_paths)
        index = tensor_index(self.model_dir)
        self.fingerprint = fingerprint(self.model_dir)
        self.tokenizer = self._tokenizer()

        with torch.device("meta"):
            skeleton = AutoModelForCausalLM.from_config(self.config)
        names = {id(m): n for n, m in skeleton.named_modules()}
        prefix = skeleton.base_model_prefix
        layers_name = f"{prefix}.{self.family.layers}"
        layers = skeleton.get_submodule(layers_name)
        self.num_layers = len(layers)
        self.targets: list[Target] = []
        for i, layer in enumerate(layers):
            for g, group in enumerate(self.groups):
                for path in group:
                    fin, fout = linear_shape(layer.get_submodule(path))
                    self.targets.append(Target(i, g, path, f"{layers_name}.{i}.{path}", fin, fout))

        emb, head = skeleton.get_input_embeddings(), skeleton.get_output_embeddings()
        emb_name, head_name = names[id(emb)], names[id(head)]
        self.embedding = self._materialise(emb, emb_name, index, prefix)
        tied = bool(getattr(self.config, "tie_word_embeddings", False))
        head_key = find_tensor(index, self.family.stored_names(f"{head_name}.weight"), prefix)
        if head_key is None and not tied:
            raise ConfigError(f"model folder {self.model_dir} has no {head_name}.weight and the config does not tie it")
        if head_key is None:
            self.head = self._materialise(head, head_name, index, prefix, shared={"weight": self.embedding.weight})
        else:
            self.head = self._materialise(head, head_name, index, prefix)
        self.tied = self.head.weight is self.embedding.weight
        del skeleton, layers
        # learned or rotary positions cap the sequence length (None: no known cap)
        self.max_positions: int | None = max_positions(self.config)
        self.embed_width = int(self.embedding.weight.shape[1])
        self.head_width = int(self.head.weight.shape[1])
        # blocks 0..k-1 (None: k = 0); what goes up is then their output, H wide, not the embeddings
        self.blocks: EdgeBlocks | None = None
        if edge_layers:
            self.blocks = EdgeBlocks(self.config, self.family, edge_layers, self.groups, index, str(self.model_dir),
                                     self.device)
        self.up_width = hidden_width(self.config) if edge_layers else self.embed_width

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        try:
            tok = AutoTokenizer.from_pretrained(str(self.model_dir))
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(
                f"model folder {self.model_dir} has no usable tokenizer ({first_line(e, 120)}); "
                "save one there with tokenizer.save_pretrained"
            ) from e
        if tok.pad_token_id is None:
            if tok.eos_token_id is None:
                raise ConfigError(f"the tokenizer in {self.model_dir} has neither a pad nor an eos token; add one")
            tok.pad_token = tok.eos_token
        return tok

    def _materialise(
        self, module: nn.Module, name: str, index: dict, prefix: str, shared: dict[str, nn.Parameter] | None = None
    ) -> nn.Module:
        """Give a meta module real, frozen weights read from the folder."""
        shared = shared or {}
        module.to_empty(device=self.device)
        wanted = {
            p: find_tensor(index, self.family.stored_names(f"{name}.{p}"), prefix)
            for p, _ in module.named_parameters(recurse=True)
        }
        missing = [p for p, k in wanted.items() if k is None and p not in shared]
        if missing:
            raise ConfigError(f"model folder {self.model_dir} lacks {name}.{missing[0]}; is it a complete checkpoint?")
        loaded = read_tensors(index, [k for k in wanted.values() if k is not None])
        for p, key in wanted.items():
            value = shared[p] if p in shared else nn.Parameter(loaded[key].to(self.device, torch.float32), requires_grad=False)  # type: ignore[index]
            setattr(module, p, value)
        return module.requires_grad_(False).eval()

    def cap_length(self, max_length: int) -> int:
        """max_length, lowered to what the model's positions allow."""
        return min(max_length, self.max_positions) if self.max_positions else max_length

    def group_shapes(self) -> list[tuple[int, int]]:
        """(input width, summed output width) of every input group that has targets, as one layer
        sends them on the wire (the same in every layer); what common.wire.cost.step_cost takes."""
        layer0 = [t for t in self.targets if t.layer == 0]
        groups = sorted({t.group for t in layer0})
        return [(next(t.in_features for t in layer0 if t.group == g), sum(t.out_features for t in layer0 if t.group == g))
                for g in groups]

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) token ids -> (B, T, E) input embeddings."""
        return self.embedding(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, T, E_out) final hidden states -> (B, T, V) logits."""
        return self.head(hidden)

    def up(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, lora: LoraAdapter | None = None,
           roles: list[int] | None = None, step: tuple[int, int] | None = None) -> torch.Tensor:
        """(B, T) token ids -> what a StepBegin carries: the input embeddings (B, T, E), or with edge layers the
        hidden states after block k-1 (B, T, H), LoRA applied where `roles` says (EdgeBlocks.run)."""
        return self.above(self.embed(input_ids), attention_mask, lora, roles, step)

    def above(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, lora: LoraAdapter | None = None,
              roles: list[int] | None = None, step: tuple[int, int] | None = None) -> torch.Tensor:
        """Input embeddings (B, T, E) through the edge's blocks, if it has any (else they go up as they are)."""
        if self.blocks is None:
            return embeddings
        return self.blocks.run(embeddings, attention_mask, lora, roles or [pb.ABSENT] * self.num_layers, step)

    def modules_on_device(self) -> dict[str, nn.Module]:
        """Every torch module this process holds of the base model (for the no-decoder-blocks test)."""
        return {"embedding": self.embedding, "head": self.head, **({"blocks": self.blocks} if self.blocks else {})}

    def resident_bytes(self) -> int:
        """Bytes of the base model's tensors this device holds (embedding, head, edge blocks; a tied head once),
        LoRA and optimizer state not included."""
        seen: dict[int, int] = {}
        for module in self.modules_on_device().values():
            for t in (*module.parameters(), *module.buffers()):
                seen[id(t)] = t.numel() * t.element_size()
        return sum(seen.values())
