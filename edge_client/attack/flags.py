"""`dlora attack`'s flags: the victim's training flags (the defence under test among them) and the attacker's.
Kept apart from the command so that building the parser imports no torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from common.config import DEVICES, AttackConfig, TrainConfig, field_default
from edge_client.app.train_flags import kill_revive_flags, lora_flags, privacy_flags, protocol_flags, wire_flags


def add_attack_flags(p: argparse.ArgumentParser) -> None:
    """The attacker's flags, then the victim's training flags that `dlora train` has too."""
    p.add_argument("--model", required=True, type=Path, help="Hugging Face model folder (the public base model)")
    p.add_argument("--data", required=True, type=Path,
                   help="the victim's JSONL: its first --victim-items lines are trained on, the next --heldout-items "
                        "score the stolen adapter")
    p.add_argument("--public", required=True, type=Path,
                   help="the attacker's own JSONL (other public text; any line --data also holds is dropped)")
    p.add_argument("--output", required=True, type=Path, help="folder for report.json, report.md and the runs")
    for name, help_text in (("victim_items", "examples of --data the victim trains on"),
                            ("heldout_items", "the next examples of --data: held-out text scoring the stolen adapter"),
                            ("public_items", "examples of --public the attacker's shadow session sends"),
                            ("mlp_steps", "AdamW steps per MLP probe, 0: none"),
                            ("mlp_every", "MLP probe on every Nth layer's tensors, plus the first and last")):
        p.add_argument("--" + name.replace("_", "-"), type=int, default=None,
                       help=f"{help_text} (default {field_default(AttackConfig, name)})")
    p.add_argument("--keep-recording", action="store_true",
                   help="keep the cloud's recording in --output/recording (it holds the victim's text, in effect)")
    for group in (wire_flags, protocol_flags, lora_flags, kill_revive_flags, privacy_flags):
        group(p)
    p.add_argument("--micro-batches", type=int, default=None, help=f"default {field_default(TrainConfig, 'micro_batches')}")
    p.add_argument("--device", default=None, choices=DEVICES, help=f"default {field_default(TrainConfig, 'device')}")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
