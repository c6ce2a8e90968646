"""`dlora demo`: a local dlora-cloud child process and a real fine-tune of SmolLM2-135M on a real task.

It shows the whole product path on one machine: the cloud serves the frozen decoder stack, the
device keeps the data, embedding, head, loss and LoRA; accuracy on held-out items is measured
through the same split path before and after fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from common.config import TrainConfig
from edge_client.app.evaluate import evaluate, load_items
from edge_client.remote.remote_step import RemoteStack
from edge_client.remote.split_engine import SplitEngine
from edge_client.tools.cloud_process import CloudProcess
from edge_client.tools.model_prep import prepare_model
from edge_client.tools.tasks import prepare_task
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel
from edge_client.train.trainer import train

log = logging.getLogger(__name__)
MODEL = "smollm2-135m"
TARGETS = ("q_proj", "k_proj", "v_proj")  # the paper's targets


def run_demo(args: argparse.Namespace, cache: Path) -> int:
    started = time.perf_counter()
    print(f"[1/5] preparing {MODEL} and task {args.task} in {cache}", flush=True)
    model_dir = prepare_model(MODEL, cache)
    task_dir = prepare_task(args.task, cache)
    items = load_items(task_dir / "test.jsonl", args.test_items)
    print("[2/5] starting dlora-cloud (frozen decoder blocks) as a child process", flush=True)
    # its own state dir: a `dlora-cloud serve` already running on the default one holds that one's lock
    cloud = CloudProcess(model_dir, extra=["--state-dir", str(cache / "demo" / "cloud-state")])
    try:
        print(f"      cloud listening on {cloud.address}", flush=True)
        edge = EdgeModel(model_dir, TARGETS)
        cfg = TrainConfig(model=model_dir, data=task_dir / "train.jsonl", output=args.output, cloud=cloud.address,
                          epochs=args.epochs, lr=args.lr, targets=TARGETS, batch_size=16, seed=0)
        print(f"[3/5] accuracy before fine-tuning on {len(items)} test items", flush=True)
        engine = SplitEngine(cfg, edge)
        before = evaluate(edge, RemoteStack(engine.link), items)
        print(f"      before: {before.accuracy:.3f}", flush=True)
        print(f"[4/5] fine-tuning through the cloud: {args.epochs} epochs, lr {args.lr}, LoRA r=8 on q,k,v", flush=True)
        result = train(cfg, engine)
        for i, loss in enumerate(result.epoch_losses, 1):
            print(f"      epoch {i}: mean loss {loss:.4f}", flush=True)
        print("[5/5] accuracy after fine-tuning", flush=True)
        adapter: LoraAdapter = engine.adapter
        adapter.eval()
        after = evaluate(edge, RemoteStack(engine.link, adapter), items)
        engine.close()
    finally:
        cloud.stop()
    wall = time.perf_counter() - started
    summary = {
        "task": args.task, "test_items": len(items), "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy, "epoch_losses": result.epoch_losses, "train_seconds": result.seconds,
        "wall_seconds": wall, "adapter": str(args.output),
    }
    (args.output / "demo_result.json").write_text(json.dumps(summary, indent=1))
    print(f"\n{args.task}: accuracy {before.accuracy:.3f} -> {after.accuracy:.3f} "
          f"({len(items)} held-out items); wall time {wall / 60:.1f} min; adapter in {args.output}")
    return 0
