"""The privacy table (issue 16): every defence setting attacked by `dlora attack` and priced in accuracy, resumably.

Usage:
  python bench/privacy_table.py [--settings none,edge-1,...] [--parts attack,arc_easy,sst2] [--max-hours H]
                                [--runs runs/privacy] [--cells docs/privacy] [--doc docs/privacy.md]
                                [--render-only | --dry-run]

A setting (SETTINGS below) is a set of defence flags of `dlora train`. Each setting has three parts, each one
JSON file under --cells/<setting>/<part>.json, written atomically with the commit and machine it ran on; a run
skips the parts whose file exists, so a killed run picks up at the part it was in:
- attack: `dlora attack` on SmolLM2-135M with the victim's ARC-Easy training items and OpenBookQA's as the
  attacker's public text (edge_client/attack/harness.py), 2 epochs;
- arc_easy, sst2: `dlora train` through a dlora-cloud with the setting's flags on the task's seeded 25% split,
  then every item of its 75% test split scored through the split path over a float32 link with no defence
  (the adapter is what the setting produced; paper_tables.score). Settings whose training is the same maths as
  no defence (--edge-layers alone: the golden test proves it equals PEFT) take their accuracy from `none`.
docs/privacy.md is rendered after every part (bench/privacy_results.py).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from paper_grid import Settings, hours, write_cell
from paper_tables import MODEL, ROOT, Grid, provenance, score
from privacy_results import write_doc

from common.config import AttackConfig, TrainConfig
from common.tuning import tune_process

FORMAT = 1
TASKS = ("arc_easy", "sst2")
PUBLIC_TASK = "openbookqa"  # the attacker's own text: another public source, disjoint from ARC-Easy's items


@dataclass(frozen=True)
class Setting:
    """One row of the table: a name and the `dlora train` defence fields it sets."""

    name: str
    flags: dict[str, Any] = field(default_factory=dict)
    same_training_as: str | None = None  # accuracy: the same maths as this setting (no training run of its own)

    def train_fields(self) -> dict[str, Any]:
        return dict(self.flags)


CLIP = 3.0  # just under SmolLM2-135M's median input-embedding row norm (3.15; 5% 2.38, 95% 4.20)
CLIP_AFTER = {2: 71.0, 8: 115.0}  # the median row norm after that many blocks (OpenBookQA text; 5%-95%: 58-182, 87-784)
GRAD_CLIP = 0.05  # about a loss row of HiddenGrad: ||W[y] - W^T p|| ~ 3.5 over N ~ 70 loss tokens a step
SETTINGS = (
    Setting("none"),
    *(Setting(f"edge-{k}", {"edge_layers": k}, same_training_as="none") for k in (1, 2, 4, 8)),
    *(Setting(f"noise-{s:g}", {"privacy_noise": s, "privacy_clip": CLIP}) for s in (0.15, 0.05, 0.5)),
    Setting("grad-noise-0.2", {"grad_noise": 0.2, "grad_clip": GRAD_CLIP}),
    Setting("edge-8+noise-0.15+grad-noise-0.2", {"edge_layers": 8, "privacy_noise": 0.15, "privacy_clip": CLIP_AFTER[8],
                                                 "grad_noise": 0.2, "grad_clip": GRAD_CLIP}),
    Setting("edge-2+noise-0.15", {"edge_layers": 2, "privacy_noise": 0.15, "privacy_clip": CLIP_AFTER[2]}),
    # gradient noise on the loss rows only: the cloud learns which positions are answers, training gets less noise
    Setting("grad-noise-0.2-loss-rows", {"grad_noise": 0.2, "grad_clip": GRAD_CLIP, "grad_noise_rows": "loss"}),
)
PARTS = ("attack", *TASKS)


@dataclass(frozen=True)
class Knobs:
    """What every part shares; recorded in each part's file."""

    attack_epochs: int = 2
    attack_max_length: int = 128
    victim_items: int = 16
    heldout_items: int = 32
    public_items: int = 96
    epochs: dict[str, int] = field(default_factory=lambda: {"arc_easy": 3, "sst2": 2})
    lr: float = 1e-3
    batch_size: int = 16
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    max_length: int = 256
    seed: int = 0
    noise_seed: int = 1234  # keys the noise: reproducible here; a real run keeps it secret (or unset: random)

    def to_json(self) -> dict[str, Any]:
        return {**self.__dict__, "targets": list(self.targets)}


def setting_named(name: str) -> Setting:
    for s in SETTINGS:
        if s.name == name:
            return s
    raise KeyError(f"unknown setting {name!r}; known: {', '.join(s.name for s in SETTINGS)}")


def part_file(cells: Path, setting: Setting, part: str) -> Path:
    return cells / setting.name / f"{part}.json"


def done(cells: Path, setting: Setting, part: str) -> dict[str, Any] | None:
    try:
        record = json.loads(part_file(cells, setting, part).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("format") == FORMAT else None


def train_config(g: Grid, k: Knobs, setting: Setting, data: Path, out: Path, epochs: int, max_length: int) -> TrainConfig:
    return TrainConfig(model=g.model_dir, data=data, output=out, cloud=g.cloud, epochs=epochs, rank=k.rank,
                       alpha=k.alpha, targets=k.targets, lr=k.lr, batch_size=k.batch_size, max_length=max_length,
                       seed=k.seed, noise_seed=k.noise_seed, progress=False, **setting.train_fields())


def attack_part(g: Grid, k: Knobs, setting: Setting) -> dict[str, Any]:
    from edge_client.attack.harness import run_attack
    from edge_client.attack.report import defence

    out = g.runs / setting.name / "attack"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = train_config(g, k, setting, g.task_dirs["arc_easy"] / "train.jsonl", out / "victim", k.attack_epochs,
                       k.attack_max_length)
    ac = AttackConfig(public=g.task_dirs[PUBLIC_TASK] / "train.jsonl", victim_items=k.victim_items,
                      heldout_items=k.heldout_items, public_items=k.public_items)
    try:
        result = run_attack(cfg, ac, out)
    finally:
        shutil.rmtree(out / "recording", ignore_errors=True)
    return {**result, "defence": defence(cfg)}


def task_part(g: Grid, k: Knobs, setting: Setting, task: str) -> dict[str, Any]:
    from edge_client.app.evaluate import load_items
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.lora import LoraAdapter
    from edge_client.train.trainer import train

    out = g.runs / setting.name / task
    shutil.rmtree(out, ignore_errors=True)
    cfg = train_config(g, k, setting, g.task_dirs[task] / "train.jsonl", out, k.epochs[task], k.max_length)
    t0 = time.perf_counter()
    engine = SplitEngine(cfg)
    try:
        result = train(cfg, engine)
    finally:
        engine.close()
    train_s = time.perf_counter() - t0
    adapter = LoraAdapter(g.edge_model(), k.rank, k.alpha, 0.0)
    adapter.load(out)
    adapter.eval()
    items = load_items(g.task_dirs[task] / "test.jsonl")
    res = score(g, items, adapter)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"accuracy": res.accuracy, "correct": res.correct, "total": res.total, "predictions": res.predictions,
            "answers": [it.answer for it in items], "steps": result.steps, "epoch_losses": result.epoch_losses,
            "train_seconds": train_s, "step_s": sorted(m["step_s"] for m in metrics)[len(metrics) // 2],
            "train_config": json.loads(cfg.model_dump_json(exclude={"noise_seed"}))}


def run_part(g: Grid, k: Knobs, setting: Setting, part: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    fields = attack_part(g, k, setting) if part == "attack" else task_part(g, k, setting, part)
    return {"format": FORMAT, "setting": setting.name, "flags": setting.flags, "part": part, "knobs": k.to_json(),
            **fields, "seconds": time.perf_counter() - t0, "date": datetime.now(UTC).isoformat(timespec="seconds"),
            **g.provenance}


def todo(cells: Path, settings: list[Setting], parts: tuple[str, ...]) -> list[tuple[Setting, str]]:
    """The (setting, part) pairs still to run, attack parts first (the cheaper, and the table's first columns)."""
    out = []
    for part in parts:
        for s in settings:
            if part != "attack" and s.same_training_as is not None:
                continue
            if done(cells, s, part) is None:
                out.append((s, part))
    return out


PRIOR_S = {"attack": 600.0, "arc_easy": 900.0, "sst2": 900.0}  # on 2 cores, before any part has been measured


def estimate_s(part: str, cells: Path) -> float:
    seen = [r["seconds"] for r in (json.loads(p.read_text()) for p in cells.glob(f"*/{part}.json"))]
    return sum(seen) / len(seen) if seen else PRIOR_S[part]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--settings", default=",".join(s.name for s in SETTINGS), help="rows (default: all)")
    ap.add_argument("--parts", default=",".join(PARTS), help="columns to measure (default: %(default)s)")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "privacy", help="scratch: adapters, metrics")
    ap.add_argument("--cells", type=Path, default=ROOT / "docs" / "privacy", help="one JSON per finished part")
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "privacy.md", help="the rendered table")
    ap.add_argument("--cache-dir", type=Path, default=None, help="dlora's cache (default: $DLORA_CACHE or ~/.cache/dlora)")
    ap.add_argument("--max-hours", type=float, default=None, help="start no part expected to end after this")
    ap.add_argument("--dry-run", action="store_true", help="list the parts still to run")
    ap.add_argument("--render-only", action="store_true", help="only render --doc from the parts there are")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    tune_process()
    args = parse_args(argv)
    try:
        settings = [setting_named(n.strip()) for n in args.settings.split(",") if n.strip()]
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    if bad := [p for p in parts if p not in PARTS]:
        print(f"error: unknown part {bad[0]!r}; use some of {', '.join(PARTS)}", file=sys.stderr)
        return 2
    command = fill_command(argv if argv is not None else sys.argv[1:])
    pending = todo(args.cells, settings, parts)
    if args.render_only or args.dry_run or not pending:
        for s, p in pending if args.dry_run else []:
            print(f"to run  {s.name:<34} {p:<9} ~{estimate_s(p, args.cells) / 60:.0f} min")
        write_doc(args.doc, args.cells, list(SETTINGS), command)
        print(f"{len(pending)} parts to run; rendered {args.doc}")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that `finally` stops the cloud
    return run(args, settings, pending, command)


def fill_command(given: list[str]) -> str:
    """The command that fills the whole table (it is resumable): this invocation's folder flags, without the flags
    that only choose which parts run now or whether any runs."""
    keep, skip = [], False
    for a in given:
        name = a.split("=", 1)[0]
        if skip:
            skip = False
        elif name in ("--settings", "--parts", "--max-hours"):
            skip = "=" not in a
        elif name not in ("--render-only", "--dry-run"):
            keep.append(a)
    return shlex.join([".venv/bin/python", "bench/privacy_table.py", *keep])


def run(args: argparse.Namespace, settings: list[Setting], pending: list[tuple[Setting, str]], command: str) -> int:
    import edge_client.attack.harness  # noqa: F401  (imported before the commit is recorded)
    from edge_client.app.cli import default_cache
    from edge_client.tools.cloud_process import CloudProcess
    from edge_client.tools.model_prep import prepare_model
    from edge_client.tools.tasks import prepare_task

    cache = args.cache_dir or default_cache()
    model_dir = prepare_model(MODEL, cache)
    task_dirs = {t: prepare_task(t, cache, 0) for t in (*TASKS, PUBLIC_TASK)}
    # score() reads the eval wire (float32), max_length and targets from the issue-17 grid's Settings: the same here
    g = Grid(model_dir, task_dirs, args.runs, args.cells, Settings(), command, provenance=provenance())
    k = Knobs()
    state = Path(tempfile.mkdtemp(prefix="dlora-privacy-cloud-"))
    cloud = CloudProcess(model_dir, extra=["--state-dir", str(state)])
    print(f"dlora-cloud pid {cloud.proc.pid} on {cloud.address}", file=sys.stderr, flush=True)
    g.cloud = cloud.address
    started = time.monotonic()
    try:
        for i, (s, part) in enumerate(pending):
            left = sum(estimate_s(p, args.cells) for _, p in pending[i:])
            if args.max_hours is not None and time.monotonic() - started + estimate_s(part, args.cells) > args.max_hours * 3600:
                print(f"stopping: {s.name}/{part} would end after --max-hours; {len(pending) - i} parts left", flush=True)
                break
            print(f"[{i + 1}/{len(pending)}] {s.name}/{part} (ETA {hours(left)})", flush=True)
            record = run_part(g, k, s, part)
            write_cell(part_file(args.cells, s, part), record)
            write_doc(args.doc, args.cells, list(SETTINGS), command)
    finally:
        cloud.stop()
        shutil.rmtree(state, ignore_errors=True)
    print(f"rendered {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
