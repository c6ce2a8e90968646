"""`dlora attack`'s entry: a fresh --output, the harness, the report, and the recording removed unless kept."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from pydantic import ValidationError

from common.config import AttackConfig, TrainConfig, flag_error
from common.errors import ConfigError
from edge_client.attack import report
from edge_client.attack.harness import run_attack

RUN_FOLDERS = ("data", "victim", "shadow", "stolen", "recording", "cloud-state")  # what a run writes under --output


def run_attack_command(args: argparse.Namespace, train_config: Callable[[argparse.Namespace, bool], TrainConfig]) -> int:
    """Check the flags (before any work), run the attack and print where the report went.

    Raises:
        ConfigError: a bad flag, --public missing; see the harness for the rest.
    """
    spec = {f: getattr(args, f) for f in AttackConfig.model_fields if getattr(args, f, None) is not None}
    try:
        ac = AttackConfig(**spec)
    except ValidationError as e:
        raise flag_error(e) from None
    out = args.output
    args.output, args.overwrite = out / "victim", True  # the victim's run folder; a rerun replaces it
    cfg = train_config(args, True)
    if not ac.public.is_file():
        raise ConfigError(f"--public {ac.public}: no such file")
    out.mkdir(parents=True, exist_ok=True)
    for name in RUN_FOLDERS:  # a rerun starts clean: the trainer would resume a checkpoint it found
        shutil.rmtree(out / name, ignore_errors=True)
    started = time.perf_counter()
    try:
        result = run_attack(cfg, ac, out)
    finally:
        if not ac.keep_recording:
            shutil.rmtree(out / "recording", ignore_errors=True)
        shutil.rmtree(out / "cloud-state", ignore_errors=True)
    result.update(defence=report.defence(cfg), commit=_commit(), seconds=round(time.perf_counter() - started, 1),
                  model=str(cfg.model))
    js, md = report.write(result, out)
    worst = result["worst"]
    print(f"worst case {100 * worst['trr']:.1f}% ({worst['attack']} on {worst['tensor']}); wrote {md} and {js}")
    return 0


def _commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
