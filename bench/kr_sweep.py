"""Kill-and-Revive on the real model: accuracy and bytes per epoch for several budgets and kill modes.

Usage: python bench/kr_sweep.py [--task arc_easy] [--budgets 30,15,8] [--revive 2] [--out docs/kr_sweep.json]

Training runs with `local-train` (the same policy and kill modes as the split path, in one process);
accuracy is measured through a local dlora-cloud, as `dlora eval` does; bytes per epoch are the
DESIGN.md formula (common/wire/cost.py) applied to every step's batch shape and the epoch's layer
roles — the tests check that formula byte-exact against measured traffic.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common.config import TrainConfig
from common.wire.cost import step_cost
from edge_client.app.cli import default_cache
from edge_client.app.evaluate import evaluate, load_items
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.remote_step import RemoteStack
from edge_client.tools.cloud_process import CloudProcess
from edge_client.tools.demo import MODEL, TARGETS
from edge_client.tools.model_prep import prepare_model
from edge_client.tools.tasks import prepare_task
from edge_client.train.engines import LocalEngine
from edge_client.train.kill_revive import layer_roles
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel
from edge_client.train.trainer import train


def bytes_per_epoch(out: Path, edge: EdgeModel, mode: str, wire: str = "float32") -> list[int]:
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    kr = [json.loads(line) for line in (out / "kr_log.jsonl").read_text().splitlines()]
    totals = []
    for epoch, decision in enumerate(kr, 1):
        roles = layer_roles(set(decision["active"]), edge.num_layers, mode)  # type: ignore[arg-type]
        total = 0
        for m in (m for m in metrics if m["epoch"] == epoch):
            b, t = m["batch_shape"]
            c = step_cost(b * t, edge.embed_width, edge.head_width, edge.group_shapes(), roles, True, wire, 4096)
            total += c.up + c.down
        totals.append(total)
    return totals


def render(result: dict) -> str:
    """The Markdown table of docs/kill-and-revive.md from the sweep's JSON."""
    rows = result["rows"]
    full = next((r for r in rows if r["mode"] == "all"), rows[0])
    full_total = sum(full["bytes_per_epoch"])
    out = [
        f"Task {result['task']}: train on its 25% split, accuracy on {result['test_items']} held-out items; "
        f"{result['epochs']} epochs (1 warm-up), lr {result['lr']}, LoRA r=8 on q,k,v, batch 16, revive "
        f"{result['revive']}.",
        "",
        "| budget | kill mode | accuracy | final-epoch loss | GB per epoch (1, 2, 3, 4) | total GB | vs budget 30 |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        per = ", ".join(f"{b / 1e9:.2f}" for b in r["bytes_per_epoch"])
        total = sum(r["bytes_per_epoch"])
        out.append(f"| {r['budget']} | {r['mode']} | {r['accuracy']:.3f} | {r['epoch_losses'][-1]:.3f} | {per} "
                   f"| {total / 1e9:.2f} | {total / full_total:.2f} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--render", type=Path, default=None, help="only print the Markdown table of a finished sweep JSON")
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--budgets", default="30,15,8")
    ap.add_argument("--modes", default="frozen,detached,dropped")
    ap.add_argument("--revive", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--test-items", type=int, default=300)
    ap.add_argument("--runs", type=Path, default=Path("runs/kr_sweep"))
    ap.add_argument("--out", type=Path, default=Path("docs/kr_sweep.json"))
    args = ap.parse_args()
    if args.render:
        print(render(json.loads(args.render.read_text())))
        return
    cache = default_cache()
    model_dir, task_dir = prepare_model(MODEL, cache), prepare_task(args.task, cache)
    items = load_items(task_dir / "test.jsonl", args.test_items)
    edge = EdgeModel(model_dir, TARGETS)
    results = []
    cloud = CloudProcess(model_dir)
    try:
        for budget in [int(b) for b in args.budgets.split(",")]:
            modes = ["all"] if budget >= edge.num_layers else args.modes.split(",")
            for mode in modes:
                out = args.runs / f"b{budget}-{mode}"
                cfg = TrainConfig(model=model_dir, data=task_dir / "train.jsonl", output=out, epochs=args.epochs,
                                  lr=args.lr, targets=TARGETS, budget=budget, revive=args.revive, warmup_epochs=1,
                                  kill_mode="detached" if mode == "all" else mode, progress=False)
                t0 = time.perf_counter()
                result = train(cfg, LocalEngine(cfg, edge))
                adapter = LoraAdapter(edge, cfg.rank, cfg.alpha, 0.0)
                adapter.load(out)
                adapter.eval()
                link = CloudLink(LinkConfig(address=cloud.address, codec_up="float32", codec_down="float32"), edge)
                link.open()
                acc = evaluate(edge, RemoteStack(link, adapter), items, progress=False).accuracy
                link.close()
                row = {"budget": budget, "mode": mode, "accuracy": acc, "epoch_losses": result.epoch_losses,
                       "bytes_per_epoch": bytes_per_epoch(out, edge, cfg.kill_mode), "seconds": time.perf_counter() - t0,
                       "active_per_epoch": [len(json.loads(x)["active"]) for x in (out / "kr_log.jsonl").read_text().splitlines()]}
                print(json.dumps(row), flush=True)
                results.append(row)
                args.out.write_text(json.dumps({"task": args.task, "test_items": len(items), "revive": args.revive,
                                                "epochs": args.epochs, "lr": args.lr, "rows": results}, indent=1))
    finally:
        cloud.stop()


if __name__ == "__main__":
    main()
