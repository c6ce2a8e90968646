"""The grid behind docs/results.md (issue 17): tasks, configurations, settings, and one file per cell.

A cell is (task, configuration, seed). A finished cell is one JSON file, written atomically (a
temporary file in the same folder, then `os.replace`), so a file that exists is whole: a run killed
mid-cell leaves no file for it, at most a `.tmp` one that nothing reads. Nothing here imports torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from common.config import KillMode

FORMAT = 1  # bump when a cell's JSON changes meaning; older files then count as not run

TASKS = ("boolq", "piqa", "siqa", "openbookqa", "arc_easy", "arc_challenge")  # the paper's column order
# the order cells run in: short items first, BoolQ (passages of ~150 tokens, 4x the others) last
RUN_ORDER = ("arc_easy", "arc_challenge", "openbookqa", "piqa", "siqa", "boolq")
TASK_LABELS = {"boolq": "BoolQ", "piqa": "PIQA", "siqa": "SIQA", "openbookqa": "OBQA", "arc_easy": "ARC-e",
               "arc_challenge": "ARC-c"}

TrainPath = Literal["none", "split", "local"]  # zero-shot (no training) | dlora train through a cloud | local-train


@dataclass(frozen=True)
class Config:
    """One column of the paper's tables: how the cells of this configuration train."""

    name: str  # id in file names and --configs
    label: str  # row label in docs/results.md
    path: TrainPath
    budget: int | None = None  # active modules after warm-up; None: every module
    kill_mode: KillMode = "detached"  # what a killed module costs (irrelevant when budget is None)
    wire: str = "float32"  # codec of the exchange, both directions (split only)
    seeds: tuple[int, ...] = (0,)  # training seeds (LoRA init, data order, dropout); the task split stays seed 0
    # a check, not a column: the configuration named here trained the other way (split against local-train);
    # shown beside it under "Split against local-train", left out of the paper's tables and the picture
    twin: str | None = None

    def spec(self) -> dict[str, Any]:
        """What a cell of this configuration was run with (compared before a cell counts as finished)."""
        return {"path": self.path, "budget": self.budget, "kill_mode": self.kill_mode, "wire": self.wire}


CONFIGS: tuple[Config, ...] = (
    Config("zero-shot", "zero-shot", "none"),
    Config("all", "all modules", "split", seeds=(0, 1)),
    Config("kr15-detached", "KR 15/30 detached", "split", 15, "detached"),
    Config("kr15-dropped", "KR 15/30 dropped", "local", 15, "dropped"),
    Config("kr8-detached", "KR 8/30 detached", "local", 8, "detached", seeds=(0, 1)),
    Config("kr8-dropped", "KR 8/30 dropped", "local", 8, "dropped"),
    Config("kr15-detached-int8", "KR 15/30 detached, int8", "split", 15, "detached", wire="int8"),
    Config("kr15-detached-local", "KR 15/30 detached, local-train", "local", 15, "detached", twin="kr15-detached"),
)
REFERENCE = "all"  # what every KR configuration is compared with
ZERO_SHOT = "zero-shot"


def config_named(name: str, configs: tuple[Config, ...] = CONFIGS) -> Config:
    """Raises: KeyError naming the known configurations."""
    for c in configs:
        if c.name == name:
            return c
    raise KeyError(f"unknown configuration {name!r}; known: {', '.join(c.name for c in configs)}")


@dataclass(frozen=True)
class Settings:
    """What every training cell shares (issue 17); defaults are the grid's."""

    epochs: int = 4
    warmup_epochs: int = 1
    revive: int = 2
    lr: float = 1e-3  # AdamW, cosine schedule, no warm-up steps
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    lora_dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    max_length: int = 256
    # the first N items of the seeded 25% training split (a seeded subset): 6 batches of 16, 24 steps a cell
    train_items: int = 96
    test_items: int = 300  # the first N of the 75% test split (all of it where fewer)
    split_seed: int = 0  # `dlora prepare`'s 25/75 split
    int8_block_size: int = 4096
    eval_wire: str = "float32"  # accuracy is scored over a float32 link, whatever the cell trained with

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["targets"] = list(self.targets)
        return d


@dataclass(frozen=True)
class Cell:
    task: str
    config: Config
    seed: int

    @property
    def id(self) -> str:
        return f"{self.task}/{self.config.name}/s{self.seed}"

    def file(self, cells_dir: Path) -> Path:
        return cells_dir / self.task / f"{self.config.name}-s{self.seed}.json"

    def work_dir(self, runs_dir: Path) -> Path:
        return runs_dir / self.task / f"{self.config.name}-s{self.seed}"


def grid(tasks: tuple[str, ...], configs: tuple[Config, ...]) -> list[Cell]:
    """Every cell, in run order: the first seed of every configuration task by task (so that a task's
    row of comparisons completes early), then the second seeds."""
    cells = [Cell(t, c, c.seeds[0]) for t in tasks for c in configs]
    cells += [Cell(t, c, s) for t in tasks for c in configs for s in c.seeds[1:]]
    return cells


class GridError(Exception):
    """A cell file made with other settings than this run's, or a bad grid selection."""


def write_cell(path: Path, record: dict[str, Any]) -> None:
    """Write a finished cell atomically: readers see the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_cell(path: Path) -> dict[str, Any] | None:
    """A finished cell's record; None when there is no whole cell of this format there."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("format") != FORMAT or "accuracy" not in record:
        return None
    return record


def finished(cell: Cell, cells_dir: Path, settings: Settings) -> dict[str, Any] | None:
    """The cell's record if it has been run with these settings; None if it has not been run.

    Raises:
        GridError: the file holds this cell run with other settings (it is not overwritten silently).
    """
    path = cell.file(cells_dir)
    record = read_cell(path)
    if record is None:
        return None
    want = {"settings": settings.to_json(), "config_spec": cell.config.spec()}
    for key, value in want.items():
        if record.get(key) != value:
            got = record.get(key) or {}
            diff = sorted(k for k in set(value) | set(got) if value.get(k) != got.get(k))
            raise GridError(f"{path} was run with other {key} ({', '.join(diff)}); move it away to run the "
                            "cell again, or choose another --cells folder")
    return record


PRIOR_S = {"eval": 120.0, "train": 300.0}  # a cell's seconds on 2 cores before any has been measured
# a task's cell time relative to the others', for estimates before it has run: BoolQ's items carry a passage
# (~150 tokens, batches padded to the 256 cap) where the others have ~20-40 tokens
TASK_COST = {"boolq": 3.0}


def kind(path: str) -> str:
    """A cell's kind for time estimates: "eval" (zero-shot) or "train"."""
    return "eval" if path == "none" else "train"


def estimate_s(cell: Cell, done: list[dict[str, Any]]) -> float:
    """Expected seconds of a cell: the mean of the finished cells of its task and kind; before its task has
    one, the other tasks' cells of its kind (else the prior) scaled by TASK_COST."""
    same = [r for r in done if kind(r["config_spec"]["path"]) == kind(cell.config.path)]
    of_task = [r["seconds"] for r in same if r["task"] == cell.task]
    if of_task:
        return sum(of_task) / len(of_task)
    unit = [r["seconds"] / TASK_COST.get(r["task"], 1.0) for r in same] or [PRIOR_S[kind(cell.config.path)]]
    return sum(unit) / len(unit) * TASK_COST.get(cell.task, 1.0)


def hours(seconds: float) -> str:
    """1h05 for 3900 s."""
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}"


def load_cells(cells_dir: Path) -> dict[tuple[str, str, int], dict[str, Any]]:
    """Every finished cell under cells_dir by (task, configuration, seed), whatever its settings."""
    found = {}
    for path in sorted(cells_dir.glob("*/*.json")):
        record = read_cell(path)
        if record is not None:
            found[(record["task"], record["config"], int(record["seed"]))] = record
    return found
