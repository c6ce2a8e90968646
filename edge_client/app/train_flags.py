"""The flag groups `dlora train`, `local-train`, `eval` and `attack` share: the wire, the step protocol and
the device's blocks, the LoRA and its optimizer, Kill-and-Revive, and the noise defences. A flag left unset is
None; the config field's default is what it means (`default`), the one owner of that fact."""

from __future__ import annotations

import argparse
from typing import Any

from common.config import (
    GRAD_NOISE_ROWS,
    KILL_MODES,
    STEP_PROTOCOLS,
    WEIGHT_CODECS,
    ServeConfig,
    TrainConfig,
    field_default,
)
from common.wire.protocol import WIRE_CODECS


def default(name: str, config: type[TrainConfig] | type[ServeConfig] = TrainConfig) -> Any:
    """What a flag left unset (None) means: the config field's default, the one owner of that fact."""
    return field_default(config, name)


def wire_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--wire", default=None, choices=WIRE_CODECS,
                   help=f"codec for activations and gradients on the wire (default {default('wire')})")
    p.add_argument("--wire-up", default=None, choices=WIRE_CODECS,
                   help="codec of what this device sends (default: --wire); e.g. int8 on a slow uplink")
    p.add_argument("--wire-down", default=None, choices=WIRE_CODECS, help="codec of what the cloud sends (default: --wire)")
    p.add_argument("--int8-block-size", type=int, default=None,
                   help=f"int8: elements per absmax scale, both directions (default {default('int8_block_size')})")


def protocol_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", default=None, choices=STEP_PROTOCOLS,
                   help="layerwise: LoRA runs on this device, the cloud asks for each layer's delta (the paper's protocol; "
                        "the LoRA weights never leave the device); adapter: the LoRA weights go to the cloud once per step "
                        f"and it applies them (30-60x fewer bytes, 2 round trips a step) (default {default('protocol')})")
    p.add_argument("--weights-wire", default=None, choices=WEIGHT_CODECS,
                   help=f"adapter protocol: codec of the LoRA weights and their gradients (default {default('weights_wire')})")
    p.add_argument("--edge-layers", type=int, default=None, metavar="K",
                   help="run the first K decoder blocks (and their LoRA) on this device: the cloud sees their output, "
                        f"not the input embeddings; costs K blocks of memory here (default {default('edge_layers')})")


def privacy_flags(p: argparse.ArgumentParser) -> None:
    """Noise on what `dlora train` sends up (edge_client/train/privacy.py; its docstring: what it guarantees)."""
    p.add_argument("--privacy-noise", type=float, default=None, metavar="SIGMA",
                   help="train: clip each token row of the input embeddings sent up to norm --privacy-clip C and add "
                        f"N(0, (SIGMA x C)^2) per coordinate (default {default('privacy_noise'):g}: off)")
    p.add_argument("--privacy-clip", type=float, default=None, metavar="C",
                   help="train: L2 norm each input-embedding row is clipped to (default: no clipping)")
    p.add_argument("--grad-noise", type=float, default=None, metavar="SIGMA",
                   help="train: the same on dL/dh, the gradient sent up, which otherwise gives the labels away; it "
                        f"changes training (default {default('grad_noise'):g}: off)")
    p.add_argument("--grad-clip", type=float, default=None, metavar="C",
                   help="train: L2 norm each dL/dh row is clipped to (default: no clipping)")
    p.add_argument("--grad-noise-rows", choices=GRAD_NOISE_ROWS, default=None,
                   help="train: which dL/dh rows get --grad-noise: every real row, so the cloud cannot tell prompt "
                        "from answer; or only the rows that carry a loss (far less noise in training; the cloud "
                        f"sees which positions are answers) (default {default('grad_noise_rows')})")
    p.add_argument("--noise-seed", type=int, default=None,
                   help="train: keys the noise, for a reproducible run; keep it secret: the cloud could subtract "
                        "the noise with it (default: a fresh random secret per process)")


def lora_flags(p: argparse.ArgumentParser) -> None:
    """The adapter and its optimizer."""
    p.add_argument("--epochs", type=int, default=None, help=f"default {default('epochs')} (the paper's Table 6)")
    p.add_argument("--rank", type=int, default=None, help=f"LoRA rank r (default {default('rank')})")
    p.add_argument("--alpha", type=float, default=None, help=f"LoRA alpha; scaling = alpha / r (default {default('alpha'):g})")
    p.add_argument("--lora-dropout", type=float, default=None,
                   help=f"dropout on the LoRA input (default {default('lora_dropout'):g})")
    p.add_argument("--targets", default=None, help="comma-separated target modules (default: PEFT's for the family)")
    p.add_argument("--lr", type=float, default=None, help=f"AdamW learning rate (default {default('lr'):g})")
    p.add_argument("--weight-decay", type=float, default=None, help=f"AdamW weight decay (default {default('weight_decay'):g})")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"linear warm-up steps before the cosine decay (default {default('warmup_steps')})")
    p.add_argument("--batch-size", type=int, default=None, help=f"examples per optimizer step (default {default('batch_size')})")
    p.add_argument("--max-length", type=int, default=None,
                   help=f"tokens per example, longer ones truncated (default {default('max_length')})")
    p.add_argument("--seed", type=int, default=None, help=f"seeds LoRA init, data order and dropout (default {default('seed')})")
    p.add_argument("--no-shuffle", action="store_true", help="keep the data file's order")


def kill_revive_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--warmup-epochs", type=int, default=None,
                   help=f"Kill-and-Revive: epochs with every module trained (default {default('warmup_epochs')})")
    p.add_argument("--budget", default=None,  # the config's None: every layer
                   help="Kill-and-Revive: modules (layers) trained after warm-up, N or all (default all)")
    p.add_argument("--revive", type=int, default=None,
                   help=f"Kill-and-Revive: modules swapped each later epoch (default {default('revive')})")
    p.add_argument("--kill-threshold", type=float, default=None,  # the config's None: off
                   help="Early-Kill: kill modules whose change is below X times the mean (default off)")
    p.add_argument("--kill-mode", default=None, choices=KILL_MODES,
                   help=f"what a killed module costs: frozen (delta + gradient path), detached (delta only), "
                        f"dropped (nothing) (default {default('kill_mode')})")
