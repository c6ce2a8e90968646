"""The model-family table: every Hugging Face naming detail dlora relies on, in one place.

A family entry says where the decoder layers live and which LoRA-able modules of a layer read
the same input. The cloud sends one LoraForward per *input group*, so q, k and v (which all
read the normed hidden states) cost one round trip, not three. A transformers upgrade that
renames a module touches this file only.

With `--edge-layers k` the base model runs in two pieces: the device runs it up to the output of
layer k-1 (`with_layers` builds it with k layers, `drop_final` removes what follows the last
layer), the cloud runs it from layer k on (`start_view`, which skips what the base model applies
to `inputs_embeds` before the first layer, because the device applied it already).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from common.errors import ConfigError


@dataclass(frozen=True)
class Family:
    """How one architecture names its decoder layers and LoRA targets."""

    model_type: str
    # Path of the decoder-layer ModuleList inside the *base* model (AutoModel), e.g. "layers".
    layers: str
    # Module paths inside one decoder layer, grouped by the input they read, groups in forward
    # order and paths in the order the forward calls them (LoRA dropout draws follow this order).
    input_groups: tuple[tuple[str, ...], ...]
    # PEFT's default LoRA targets for the family (peft.utils.constants mapping); a test keeps
    # this equal to PEFT's table.
    default_targets: tuple[str, ...]
    # (model name prefix, stored key prefix) pairs for checkpoints that store a tensor under an
    # older name, e.g. GPT-NeoX's head "lm_head." is stored as "embed_out.".
    stored_aliases: tuple[tuple[str, str], ...] = ()
    # The entry stage: modules of the base model that act on `inputs_embeds` before the first layer, each
    # with how a model starting at a later layer skips it: "zero" (an addend: positions) or "identity"
    # (a map: an embedding layernorm, an input projection). Rotary positions and ALiBi are made per
    # forward from the positions and the mask, on each side, and need nothing here.
    entry: tuple[tuple[str, str], ...] = ()
    # What the base model applies after the last layer (final norm, OPT's output projection), in order.
    final: tuple[str, ...] = ()

    def stored_names(self, name: str) -> list[str]:
        """The keys a model parameter may be stored under, its own name first."""
        return [name] + [stored + name[len(own) :] for own, stored in self.stored_aliases if name.startswith(own)]

    def all_paths(self) -> tuple[str, ...]:
        """Every LoRA-able path inside a layer, in forward order."""
        return tuple(p for group in self.input_groups for p in group)


_LLAMA_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)
_FUSED_QKV_GROUPS = {
    # BLOOM and GPT-NeoX fuse q, k and v into one linear.
    "bloom": (
        ("self_attention.query_key_value",),
        ("self_attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
    "gpt_neox": (
        ("attention.query_key_value",),
        ("attention.dense",),
        ("mlp.dense_h_to_4h",),
        ("mlp.dense_4h_to_h",),
    ),
}

FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "layers", _LLAMA_GROUPS, ("q_proj", "v_proj"), final=("norm",)),
    "mistral": Family("mistral", "layers", _LLAMA_GROUPS, ("q_proj", "v_proj"), final=("norm",)),
    "qwen2": Family("qwen2", "layers", _LLAMA_GROUPS, ("q_proj", "v_proj"), final=("norm",)),
    "opt": Family(
        "opt",
        "decoder.layers",
        (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), ("self_attn.out_proj",), ("fc1",), ("fc2",)),
        ("q_proj", "v_proj"),
        entry=(("decoder.embed_positions", "zero"), ("decoder.project_in", "identity")),
        final=("decoder.final_layer_norm", "decoder.project_out"),
    ),
    "bloom": Family("bloom", "h", _FUSED_QKV_GROUPS["bloom"], ("query_key_value",),
                    entry=(("word_embeddings_layernorm", "identity"),), final=("ln_f",)),
    # GPT-2 uses Conv1D (weight stored as (in, out)); PEFT handles it with fan_in_fan_out.
    "gpt2": Family(
        "gpt2", "h", (("attn.c_attn",), ("attn.c_proj",), ("mlp.c_fc",), ("mlp.c_proj",)), ("c_attn",),
        entry=(("wpe", "zero"),), final=("ln_f",),
    ),
    "gpt_neox": Family(
        "gpt_neox", "layers", _FUSED_QKV_GROUPS["gpt_neox"], ("query_key_value",), (("lm_head.", "embed_out."),),
        final=("final_layer_norm",),
    ),
}


def family_of(model_type: str) -> Family:
    """The family entry for a Hugging Face model_type.

    Raises:
        ConfigError: the architecture is not supported (the message lists the supported ones).
    """
    family = FAMILIES.get(model_type)
    if family is None:
        raise ConfigError(
            f"unsupported architecture {model_type!r}: dlora supports {', '.join(sorted(FAMILIES))}"
        )
    return family


def resolve_targets(family: Family, targets: list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """Turn PEFT-style target names into the layer-relative paths they select, in forward order.

    A name selects a path when it equals the path or is its dotted suffix, as PEFT matches
    `target_modules` ("c_proj" selects both "attn.c_proj" and "mlp.c_proj" in GPT-2).

    Raises:
        ConfigError: a name selects no LoRA-able module of a decoder layer.
    """
    names = tuple(targets) if targets else family.default_targets
    chosen: list[str] = []
    for name in names:
        hits = [p for p in family.all_paths() if p == name or p.endswith("." + name)]
        if not hits:
            known = ", ".join(p.rsplit(".", 1)[-1] for p in family.all_paths())
            raise ConfigError(
                f"--targets: {name!r} names no LoRA-able module of a {family.model_type} decoder layer; "
                f"use some of: {known}"
            )
        chosen.extend(hits)
    return tuple(p for p in family.all_paths() if p in set(chosen))


def target_groups(family: Family, targets: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The chosen targets split by input group; index i is group i of the family (may be empty)."""
    selected = set(targets)
    return [tuple(p for p in group if p in selected) for group in family.input_groups]


def linear_shape(module: Any) -> tuple[int, int]:
    """(in, out) of a LoRA-able module: nn.Linear stores its weight as (out, in), GPT-2's Conv1D as (in, out)."""
    rows, cols = int(module.weight.shape[0]), int(module.weight.shape[1])
    return (rows, cols) if type(module).__name__ == "Conv1D" else (cols, rows)


def max_positions(config: Any) -> int | None:
    """The longest sequence the model's learned or rotary positions allow (None: no known cap)."""
    return getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)


def hidden_width(config: Any) -> int:
    """H: the width of the hidden states between decoder layers."""
    return int(config.hidden_size)


def with_layers(config: Any, first: int, count: int) -> Any:
    """A copy of `config` for a model of the `count` decoder layers first..first+count-1 (per-layer attention
    types, Qwen2's `layer_types`, cut to match); `num_hidden_layers` reaches GPT-2's and BLOOM's n_layer."""
    out = copy.deepcopy(config)
    out.num_hidden_layers = count
    if getattr(config, "layer_types", None) is not None:
        out.layer_types = list(config.layer_types)[first : first + count]
    return out
