"""End-of-epoch checkpoints: everything a run needs to continue exactly where it was.

A checkpoint folder `epoch-NNNN/` holds the LoRA weights and the torch RNG state (safetensors),
the optimizer state (torch.save, loaded with weights_only=True: no pickle), and trainer.json (epoch,
step, schedule position, active modules, scheduler state, cloud session id). manifest.json, written
last, lists every file's SHA-256; the folder is built under a temporary name and renamed into place,
so a crash never leaves a half-written checkpoint that looks complete. Loading checks the manifest
and falls back to the previous checkpoint, saying why, when the newest one is damaged.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from common.errors import ConfigError

log = logging.getLogger(__name__)
_FILES = ("lora.safetensors", "optimizer.pt", "trainer.json")
KEEP = 2  # checkpoints kept on disk: the newest and one to fall back on


@dataclass
class TrainerState:
    """Where a run stands at the end of an epoch."""

    epochs_done: int
    step: int
    active: list[int]
    epoch_losses: list[float]
    scheduler: dict[str, Any]  # the LR schedule's state_dict
    kr_state: str | None = None  # LocalScheduler state (local-train); the cloud keeps its own
    session_id: str = ""  # the cloud session to resume (train)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _by_epoch(root: Path) -> list[Path]:
    """The checkpoint folders under root, oldest first by epoch NUMBER (as text, epoch-10000 < epoch-9999)."""
    found = []
    for folder in root.glob("epoch-*"):
        number = folder.name.removeprefix("epoch-")
        if number.isascii() and number.isdigit():
            found.append((int(number), folder))
    return [folder for _, folder in sorted(found)]


def save(root: Path, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
         state: TrainerState) -> Path:
    """Write checkpoint `epoch-NNNN` atomically and prune old ones; returns its folder."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"epoch-{state.epochs_done:04d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors = {k: p.detach().contiguous().clone() for k, p in named_params}
    tensors["__rng__"] = torch.get_rng_state()
    save_file(tensors, str(tmp / "lora.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "trainer.json").write_text(json.dumps(asdict(state), indent=1))
    (tmp / "manifest.json").write_text(json.dumps({f: _sha256(tmp / f) for f in _FILES}, indent=1))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in _by_epoch(root)[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _verify(folder: Path) -> None:
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise ConfigError(f"checkpoint {folder} is incomplete (no manifest.json)")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise ConfigError(f"checkpoint {folder} has a corrupt manifest.json") from None
    for name in _FILES:
        path = folder / name
        if not path.is_file() or manifest.get(name) != _sha256(path):
            raise ConfigError(f"checkpoint {folder}: {name} is missing, truncated or corrupt")


@dataclass
class Checkpoint:
    folder: Path
    state: TrainerState
    tensors: dict[str, torch.Tensor]
    optimizer: dict[str, Any]

    def restore(self, named_params: list[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer) -> None:
        """Put weights, optimizer state and the RNG back.

        Raises:
            ConfigError: the checkpoint was written for other LoRA tensors.
        """
        with torch.no_grad():
            for key, p in named_params:
                if key not in self.tensors or self.tensors[key].shape != p.shape:
                    raise ConfigError(f"checkpoint {self.folder} does not match this run ({key}); "
                                      "was it written with other --targets or --rank?")
                p.copy_(self.tensors[key])
        optimizer.load_state_dict(self.optimizer)
        torch.set_rng_state(self.tensors["__rng__"])


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint that verifies; a damaged one is skipped with a warning naming it."""
    for folder in reversed(_by_epoch(root)):
        try:
            _verify(folder)
            fields = json.loads((folder / "trainer.json").read_text())
            fields.pop("extra", None)  # older checkpoints carry an always-empty "extra"
            state = TrainerState(**fields)
            tensors = load_file(str(folder / "lora.safetensors"))
            opt = torch.load(folder / "optimizer.pt", weights_only=True)
        except (ConfigError, SafetensorError, OSError, ValueError, TypeError, RuntimeError) as e:
            log.warning("skipping checkpoint %s: %s; falling back to the previous one", folder.name, e)
            continue
        return Checkpoint(folder, state, tensors, opt)
    return None
