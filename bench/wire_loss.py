"""Does the wire codec change what is learned? Fine-tune the demo task through the split per codec.

Usage: python bench/wire_loss.py [--task arc_easy] [--wires float32,int8] [--epochs 3]

Same data order, LoRA init and dropout draws for every codec; prints each run's loss per epoch and
bytes per step, and the final-epoch loss relative to float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from common.config import TrainConfig
from edge_client.app.cli import default_cache
from edge_client.remote.split_engine import SplitEngine
from edge_client.tools.cloud_process import CloudProcess
from edge_client.tools.demo import MODEL, TARGETS
from edge_client.tools.model_prep import prepare_model
from edge_client.tools.tasks import prepare_task
from edge_client.train.trainer import train


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", default="arc_easy")
    ap.add_argument("--wires", default="float32,int8")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--runs", type=Path, default=Path("runs/wire_loss"))
    args = ap.parse_args()
    cache = default_cache()
    model_dir, task_dir = prepare_model(MODEL, cache), prepare_task(args.task, cache)
    cloud = CloudProcess(model_dir, extra=["--state-dir", str(args.runs / "cloud-state")])
    rows = {}
    try:
        for wire in args.wires.split(","):
            cfg = TrainConfig(model=model_dir, data=task_dir / "train.jsonl", output=args.runs / wire, cloud=cloud.address,
                              epochs=args.epochs, lr=1e-3, targets=TARGETS, wire=wire, progress=False)
            result = train(cfg, SplitEngine(cfg))
            metrics = [json.loads(x) for x in (cfg.output / "metrics.jsonl").read_text().splitlines()]
            rows[wire] = {"epoch_losses": result.epoch_losses, "seconds": result.seconds,
                          "payload_mb_per_step": statistics.mean(m["payload_to_cloud"] + m["payload_from_cloud"]
                                                                 for m in metrics) / 1e6}
            print(wire, json.dumps(rows[wire]), flush=True)
    finally:
        cloud.stop()
    base = rows.get("float32")
    for wire, r in rows.items():
        rel = r["epoch_losses"][-1] / base["epoch_losses"][-1] - 1 if base else 0.0
        print(f"{wire}: final-epoch loss {r['epoch_losses'][-1]:.4f} ({rel:+.2%} vs float32), "
              f"{r['payload_mb_per_step']:.1f} MB/step")


if __name__ == "__main__":
    main()
