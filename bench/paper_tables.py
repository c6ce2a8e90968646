"""The paper's tables on real data (issue 17): Kill-and-Revive across six tasks on SmolLM2-135M, resumably.

Usage:
  python bench/paper_tables.py [--tasks arc_easy,...] [--configs all,kr8-detached,...] [--runs runs/paper_tables]
                               [--cells docs/results] [--doc docs/results.md] [--max-hours H] [--dry-run | --render-only]

Each cell (task, configuration, seed; bench/paper_grid.py) trains a LoRA adapter and scores it on the
task's held-out items, then lands as one JSON file under --cells (accuracy, per-item predictions, epoch
losses, bytes per epoch, seconds, commit, machine, date, settings), written atomically. A run skips the
cells whose file exists, so a killed run picks up at the cell it was in (that cell starts again: its
adapter and metrics under --runs are scratch). docs/results.md is rendered again after every cell,
from whatever cells exist (bench/paper_results.py), with its picture docs/results.png (bench/paper_figure.py).

- `split` cells train as `dlora train` does: SplitEngine + the trainer through a `dlora-cloud serve`
  child process (the codec of the configuration on the wire); `local` cells as `dlora local-train`
  (LocalEngine: the same Kill-and-Revive policy and kill modes in one process, float32 round-off apart).
  `kr15-detached-local` is a check, not a column: KR 15/30 detached trained as local-train, shown against
  its split cells under "Split against local-train" (issue 17: the split trains as well as local-train).
- Accuracy goes through the split path, as `dlora eval` does: the exported adapter over a float32 link.
- Bytes per epoch: the DESIGN.md formula (common/wire/cost.py) on every step's batch shape and that
  epoch's layer roles (kill mode, active set from kr_log.jsonl); split cells also record what their
  steps measured on the wire, which equals it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from paper_grid import (
    CONFIGS,
    FORMAT,
    RUN_ORDER,
    Cell,
    GridError,
    Settings,
    config_named,
    estimate_s,
    finished,
    grid,
    hours,
    write_cell,
)
from paper_results import write_doc

from common.config import TrainConfig
from common.tuning import tune_process

if TYPE_CHECKING:
    from edge_client.app.evaluate import EvalResult, Item
    from edge_client.train.lora import LoraAdapter
    from edge_client.train.model_parts import EdgeModel

ROOT = Path(__file__).resolve().parents[1]
MODEL = "smollm2-135m"


@dataclass
class Grid:
    """What every cell of one invocation shares: the model, the tasks, the cloud, where results go."""

    model_dir: Path
    task_dirs: dict[str, Path]
    runs: Path
    cells: Path
    settings: Settings
    command: str
    cloud: str = ""  # HOST:PORT of the dlora-cloud that scores (and trains the split cells)
    edge: EdgeModel | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def edge_model(self) -> EdgeModel:
        if self.edge is None:
            from edge_client.train.model_parts import EdgeModel

            self.edge = EdgeModel(self.model_dir, self.settings.targets)
        return self.edge


def provenance() -> dict[str, Any]:
    """The commit a cell runs on (with the tracked files that differ from it and a hash of that diff) and the
    machine."""
    import torch

    def git(*args: str) -> str:
        r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return r.stdout if r.returncode == 0 else ""

    changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if line]
    diff = git("diff", "HEAD")
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown", "changed_files": changed[:20],
            "diff_sha256": hashlib.sha256(diff.encode()).hexdigest()[:16] if diff else None,
            "machine": {"host": platform.node(), "cpu": cpu, "cores": cores, "torch": torch.__version__,
                        "torch_threads": torch.get_num_threads(), "python": platform.python_version()}}


def held_out_items(g: Grid, task: str) -> list[Item]:
    from edge_client.app.evaluate import load_items

    return load_items(g.task_dirs[task] / "test.jsonl", g.settings.test_items)


def score(g: Grid, items: list[Item], adapter: LoraAdapter | None) -> EvalResult:
    """Accuracy through the split path (forward only), over a float32 link of its own."""
    from edge_client.app.evaluate import evaluate
    from edge_client.remote.link import CloudLink, LinkConfig
    from edge_client.remote.remote_step import RemoteStack

    wire = g.settings.eval_wire
    link = CloudLink(LinkConfig(address=g.cloud, codec_up=wire, codec_down=wire), g.edge_model())
    link.open()
    try:
        return evaluate(g.edge_model(), RemoteStack(link, adapter), items, max_length=g.settings.max_length,
                        progress=False)
    finally:
        link.close()


def capped_train_file(g: Grid, task: str) -> tuple[Path, int]:
    """The first --train-items lines of the task's seeded training split, as a file of their own."""
    lines = (g.task_dirs[task] / "train.jsonl").read_text().splitlines()[: g.settings.train_items]
    path = g.runs / task / f"train-{g.settings.train_items}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path, len(lines)


def epoch_bytes(out: Path, edge: EdgeModel, cfg: TrainConfig) -> tuple[list[int], list[int], list[list[int]]]:
    """Per epoch: bytes by the formula, bytes the steps measured (payloads; 0 for local-train), active set."""
    from common.wire.cost import step_cost
    from edge_client.train.kill_revive import layer_roles

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kr = [json.loads(line) for line in (out / "kr_log.jsonl").read_text().splitlines()]
    formula, measured, active = [], [], []
    for epoch, decision in enumerate(kr, 1):
        roles = layer_roles(set(decision["active"]), edge.num_layers, cfg.kill_mode)
        steps = [m for m in metrics if m["epoch"] == epoch]
        total = 0
        for m in steps:
            b, t = m["batch_shape"]
            c = step_cost(b * t, edge.embed_width, edge.head_width, edge.group_shapes(), roles, True, cfg.codec_up,
                          cfg.int8_block_size, cfg.codec_down)
            total += c.up + c.down
        formula.append(total)
        measured.append(sum(m["payload_to_cloud"] + m["payload_from_cloud"] for m in steps))
        active.append(sorted(decision["active"]))
    return formula, measured, active


def train_cell(g: Grid, cell: Cell) -> dict[str, Any]:
    """Train the cell's adapter (split or local), score it; the fields of its record this adds."""
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.engines import LocalEngine
    from edge_client.train.lora import LoraAdapter
    from edge_client.train.trainer import train

    s, c = g.settings, cell.config
    out = cell.work_dir(g.runs)
    shutil.rmtree(out, ignore_errors=True)  # what a killed run left: this cell starts again
    data, n_train = capped_train_file(g, cell.task)
    cfg = TrainConfig(model=g.model_dir, data=data, output=out, cloud=g.cloud if c.path == "split" else None,
                      epochs=s.epochs, rank=s.rank, alpha=s.alpha, lora_dropout=s.lora_dropout, targets=s.targets,
                      lr=s.lr, batch_size=s.batch_size, max_length=s.max_length, seed=cell.seed, wire=c.wire,
                      int8_block_size=s.int8_block_size, warmup_epochs=s.warmup_epochs, budget=c.budget,
                      revive=s.revive, kill_mode=c.kill_mode, progress=False)
    edge = g.edge_model()
    t0 = time.perf_counter()
    engine = SplitEngine(cfg, edge) if c.path == "split" else LocalEngine(cfg, edge)
    try:
        result = train(cfg, engine)
    finally:
        engine.close()
    train_s = time.perf_counter() - t0
    adapter = LoraAdapter(edge, s.rank, s.alpha, 0.0)
    adapter.load(out)
    adapter.eval()
    items = held_out_items(g, cell.task)
    t1 = time.perf_counter()
    res = score(g, items, adapter)
    formula, measured, active = epoch_bytes(out, edge, cfg)
    return {"accuracy": res.accuracy, "correct": res.correct, "total": res.total, "predictions": res.predictions,
            "answers": [it.answer for it in items], "train_items": n_train, "steps": result.steps,
            "epoch_losses": result.epoch_losses, "bytes_per_epoch": formula,
            "measured_bytes_per_epoch": measured if c.path == "split" else None, "active_per_epoch": active,
            "train_seconds": train_s, "eval_seconds": time.perf_counter() - t1,
            "train_config": json.loads(cfg.model_dump_json())}


def zero_shot_cell(g: Grid, cell: Cell) -> dict[str, Any]:
    items = held_out_items(g, cell.task)
    t0 = time.perf_counter()
    res = score(g, items, None)
    return {"accuracy": res.accuracy, "correct": res.correct, "total": res.total, "predictions": res.predictions,
            "answers": [it.answer for it in items], "train_items": 0, "steps": 0, "epoch_losses": [],
            "bytes_per_epoch": [], "measured_bytes_per_epoch": None, "active_per_epoch": [],
            "train_seconds": 0.0, "eval_seconds": time.perf_counter() - t0}


def run_cell(g: Grid, cell: Cell) -> dict[str, Any]:
    """Run one cell; its whole record (not yet written)."""
    t0 = time.perf_counter()
    fields = zero_shot_cell(g, cell) if cell.config.path == "none" else train_cell(g, cell)
    meta_file = g.task_dirs[cell.task] / "meta.json"
    return {"format": FORMAT, "cell": cell.id, "task": cell.task, "config": cell.config.name, "seed": cell.seed,
            "config_spec": cell.config.spec(), "settings": g.settings.to_json(), **fields,
            "seconds": time.perf_counter() - t0, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": g.command, "task_meta": json.loads(meta_file.read_text()) if meta_file.exists() else None,
            **g.provenance}


def run_grid(g: Grid, cells: list[Cell], doc: Path | None, max_hours: float | None = None,
             progress: bool = True) -> dict[str, list[str]]:
    """Run every cell of `cells` that has no file yet, rendering `doc` after each; the ids run and skipped.

    Raises:
        GridError: a cell's file was made with other settings.
        Whatever a cell raises: the cells finished before it are kept; the next run starts at it.
    """
    from tqdm import tqdm

    records = {cell.id: finished(cell, g.cells, g.settings) for cell in cells}
    done = [r for r in records.values() if r is not None]
    todo = [cell for cell in cells if records[cell.id] is None]
    skipped = [cell.id for cell in cells if records[cell.id] is not None]
    ran: list[str] = []
    started = time.monotonic()
    with tqdm(total=len(cells), initial=len(cells) - len(todo), unit="cell", disable=not progress,
              dynamic_ncols=True) as bar:
        for i, cell in enumerate(todo):
            eta = sum(estimate_s(c, done) for c in todo[i:])
            bar.set_postfix_str(f"{cell.id}, ETA {hours(eta)}")
            if max_hours is not None and time.monotonic() - started + estimate_s(cell, done) > max_hours * 3600:
                bar.write(f"stopping: {cell.id} would end after --max-hours {max_hours}; {len(todo) - i} cells left")
                break
            record = run_cell(g, cell)
            write_cell(cell.file(g.cells), record)
            done.append(record)
            ran.append(cell.id)
            bar.update(1)
            bar.write(f"{cell.id}: accuracy {record['accuracy']:.3f} ({record['correct']}/{record['total']}) "
                      f"in {record['seconds'] / 60:.1f} min")
            if doc is not None:
                write_doc(doc, g.cells, cells, g.command)
    return {"ran": ran, "skipped": skipped}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Settings()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tasks", default=",".join(RUN_ORDER), help="tasks, in run order (default: %(default)s)")
    ap.add_argument("--configs", default=",".join(c.name for c in CONFIGS), help="configurations (default: %(default)s)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "paper_tables", help="scratch: adapters, metrics")
    ap.add_argument("--cells", type=Path, default=ROOT / "docs" / "results", help="one JSON per finished cell")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "results.md", help="the rendered tables")
    ap.add_argument("--model", type=Path, default=None, help=f"model folder (default: dlora prepare {MODEL})")
    ap.add_argument("--task-dir", type=Path, default=None,
                    help="folder of prepared tasks, TASK/{train,test}.jsonl (default: dlora prepare TASK)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="dlora's cache (default: $DLORA_CACHE or ~/.cache/dlora)")
    ap.add_argument("--train-items", type=int, default=d.train_items)
    ap.add_argument("--test-items", type=int, default=d.test_items)
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--max-hours", type=float, default=None, help="start no cell expected to end after this")
    ap.add_argument("--dry-run", action="store_true", help="list the cells still to run and the time they take")
    ap.add_argument("--render-only", action="store_true", help="only render --doc from the cells there are")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("-v", "--verbose", action="store_true", help="the trainer's INFO lines")
    return ap.parse_args(argv)


def grid_command(args: argparse.Namespace) -> str:
    """The command line that runs this grid: the flags that choose cells, settings and folders, where not default."""
    default = parse_args([])
    flags = []
    for name in ("tasks", "configs", "train_items", "test_items", "epochs", "batch_size", "model", "task_dir",
                 "cells", "runs"):
        value = getattr(args, name)
        if value != getattr(default, name):
            if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
                value = value.resolve().relative_to(ROOT)
            flags += [f"--{name.replace('_', '-')}", str(value)]
    return shlex.join([".venv/bin/python", "bench/paper_tables.py", *flags])


def main(argv: list[str] | None = None) -> int:
    tune_process()  # before anything imports torch: see common/tuning.py
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
        configs = tuple(config_named(n.strip()) for n in args.configs.split(",") if n.strip())
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    settings = Settings(train_items=args.train_items, test_items=args.test_items, epochs=args.epochs,
                        batch_size=args.batch_size)
    cells = grid(tasks, configs)
    command = grid_command(args)
    if args.render_only:
        write_doc(args.doc, args.cells, cells, command)
        print(f"rendered {args.doc}")
        return 0
    try:
        records = {c.id: finished(c, args.cells, settings) for c in cells}
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    done = [r for r in records.values() if r is not None]
    todo = [c for c in cells if records[c.id] is None]
    if args.dry_run:
        for c in todo:
            print(f"to run  {c.id:<36} {c.config.path:<5} ~{estimate_s(c, done) / 60:.0f} min")
        print(f"{len(done)} of {len(cells)} cells finished; {len(todo)} to run, about "
              f"{hours(sum(estimate_s(c, done) for c in todo))} on 2 cores")
        return 0
    if not todo:
        write_doc(args.doc, args.cells, cells, command)
        print(f"all {len(cells)} cells are finished; rendered {args.doc}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cloud
    return run(args, tasks, cells, settings, command)


def run(args: argparse.Namespace, tasks: tuple[str, ...], cells: list[Cell], settings: Settings, command: str) -> int:
    """Prepare the model and tasks, start a dlora-cloud, run the cells still to run, render."""
    # every module a cell runs, imported before the commit is recorded: the recorded code is the code that runs
    import edge_client.app.evaluate  # noqa: F401
    import edge_client.remote.split_engine  # noqa: F401
    import edge_client.train.engines  # noqa: F401
    import edge_client.train.trainer  # noqa: F401
    from edge_client.app.cli import default_cache
    from edge_client.tools.cloud_process import CloudProcess
    from edge_client.tools.model_prep import prepare_model
    from edge_client.tools.tasks import prepare_task

    cache = args.cache_dir or default_cache()
    model_dir = args.model or prepare_model(MODEL, cache)
    task_dirs = {t: args.task_dir / t if args.task_dir else prepare_task(t, cache, settings.split_seed) for t in tasks}
    missing = [str(d) for d in task_dirs.values() if not all((d / f).is_file() for f in ("train.jsonl", "test.jsonl"))]
    if missing:
        print(f"error: no train.jsonl and test.jsonl in {', '.join(missing)}", file=sys.stderr)
        return 2
    g = Grid(model_dir, task_dirs, args.runs, args.cells, settings, command, provenance=provenance())
    state = Path(tempfile.mkdtemp(prefix="dlora-grid-cloud-"))
    cloud = CloudProcess(model_dir, extra=["--state-dir", str(state)])
    print(f"dlora-cloud pid {cloud.proc.pid} on {cloud.address}, state in {state} (this command stops it and "
          "removes that; after a SIGKILL, stop it by that pid)", file=sys.stderr, flush=True)
    g.cloud = cloud.address
    try:
        summary = run_grid(g, cells, args.doc, args.max_hours, progress=not args.no_progress)
    except GridError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        cloud.stop()
        shutil.rmtree(state, ignore_errors=True)
    write_doc(args.doc, args.cells, cells, command)
    print(f"ran {len(summary['ran'])} cells, {len(summary['skipped'])} were finished already; see {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
