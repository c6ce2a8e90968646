"""`dlora bench`: the split measured against local PEFT training, side by side, in one run.

Every configuration trains the same model on the same seeded batches from the same LoRA weights,
each in a fresh process (so CPU time and peak RSS are its own): (a) local-train, the cloud-only
baseline, and (b) the split through a dlora-cloud child process over 127.0.0.1 (or an emulated
device link, --wan), for each wire codec and budget. For budget b < L the active modules are b
layers spread evenly over the stack, killed ones in --kill-mode (the bench measures cost, not
accuracy). Reported per configuration: median step time and its ratio to (a), payload bytes per
step measured and by the DESIGN.md formula, the device's CPU seconds per step and peak RSS next
to the full model's size, and the final loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from common.config import TrainConfig
from common.errors import ConfigError
from common.wire_cost import step_cost
from edge_client.cloud_process import CloudProcess
from edge_client.data import Batch
from edge_client.kill_revive import layer_roles
from edge_client.link_emulator import LinkEmulator, netem_status, parse_wan
from edge_client.synthetic import BENCH_CONFIG, LLAMA_7B_CONFIG, llama_config, write_random_model

TARGETS = ("q_proj", "k_proj", "v_proj")


def spread(budget: int, layers: int) -> set[int]:
    """`budget` layer indices spread evenly over the stack, the top layer included."""
    return {layers - 1 - round(i * layers / budget) for i in range(budget)}


def parse_budget(text: str, layers: int) -> int:
    """"all" -> L, "L/4" -> L // 4, "3" -> 3.

    Raises:
        ConfigError: anything else.
    """
    text = text.strip()
    try:
        if text == "all":
            return layers
        if text.startswith("L/"):
            return max(1, layers // int(text[2:]))
        return min(layers, int(text))
    except ValueError:
        raise ConfigError(f"--budgets: {text!r} is not all, L/N or a number") from None


def synthetic_batches(n: int, batch: int, seq: int, vocab: int, seed: int) -> list[Batch]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (batch, seq), generator=gen)
        out.append(Batch(ids, torch.ones_like(ids), ids.clone()))
    return out


def peak_rss_mb() -> float:
    """This process image's peak RSS (VmHWM). ru_maxrss would include the parent's RSS at fork time,
    which Linux carries across exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration, in this (fresh) process."""
    from edge_client.engines import LocalEngine, SplitEngine

    cfg = TrainConfig(model=spec["model"], data=Path("synthetic"), output=Path("unused"), cloud=spec.get("cloud"),
                      wire=spec.get("wire", "float32"), targets=TARGETS, lora_dropout=0.0, lr=1e-3,
                      micro_batches=spec.get("micro_batches", 1), progress=False, reply_timeout_s=1200,
                      device=spec.get("device", "cpu"), dtype=spec.get("local_dtype", "float32"))
    engine = SplitEngine(cfg) if cfg.cloud else LocalEngine(cfg)
    layers = engine.num_layers
    active = spread(spec["budget"], layers) if spec["budget"] < layers else set(range(layers))
    engine.set_active(active, spec["kill_mode"])
    roles = layer_roles(active, layers, spec["kill_mode"])
    opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
    vocab = int(engine.edge.config.vocab_size)
    batches = synthetic_batches(spec["steps"] + 1, spec["batch_size"], spec["seq_len"], vocab, seed=0)
    times, cpu, loss, up, down, wire = [], [], 0.0, [], [], []
    for step, batch in enumerate(batches):
        t0, c0 = time.perf_counter(), time.process_time()
        opt.zero_grad(set_to_none=True)
        loss, traffic = engine.train_step(batch, step, roles)
        opt.step()
        if cfg.device == "cuda":
            torch.cuda.synchronize()
        if step == 0:
            continue  # warm-up: allocator, gRPC channel, lazy inits
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        up.append(traffic.payload_up)
        down.append(traffic.payload_down)
        wire.append(traffic.wire_up + traffic.wire_down)
    engine.close()
    edge = engine.edge
    n = spec["batch_size"] * spec["seq_len"]
    formula = step_cost(n, edge.embed_width, edge.head_width, edge.group_shapes(), roles, True, cfg.wire, 4096)
    return {
        "median_step_s": statistics.median(times), "cpu_s_per_step": statistics.mean(cpu),
        "peak_rss_mb": peak_rss_mb(), "final_loss": loss,
        "payload_per_step": statistics.mean(u + d for u, d in zip(up, down)) if cfg.cloud else 0,
        "formula_per_step": formula.up + formula.down if cfg.cloud else 0,
        "wire_per_step": statistics.mean(wire) if cfg.cloud else 0, "active": len(active), "layers": layers,
    }


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process; its result dict.

    Raises:
        ConfigError: the worker failed (its last stderr line says why).
    """
    r = subprocess.run([sys.executable, "-m", "edge_client.bench", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, timeout=3600)
    if r.returncode != 0:
        raise ConfigError(f"bench configuration {spec.get('name')} failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Model: {meta['model']} ({meta['layers']} layers, {meta['model_mb']:.0f} MB of weights); "
        f"batch {meta['batch_size']}x{meta['seq_len']} tokens; {meta['steps']} timed steps; link: {meta['link']}; "
        f"cloud {meta['cloud']}, device {meta['device']}, local-train base {meta['local_dtype']}"
        f"{'; GPU ' + meta['gpu'] if meta.get('gpu') else ''}; {meta['date']}.",
        "",
        "| config | wire | budget | M | median step s | x local | payload MB/step | formula MB/step | diff % "
        "| device CPU s/step | device peak RSS MB | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = 100 * (r["payload_per_step"] / r["formula_per_step"] - 1) if r["formula_per_step"] else 0.0
        lines.append(
            f"| {r['name']} | {r.get('wire', '-')} | {r['active']}/{r['layers']} | {r.get('micro_batches', 1)} "
            f"| {r['median_step_s']:.3f} | {r['ratio']:.2f} | {r['payload_per_step'] / 1e6:.2f} "
            f"| {r['formula_per_step'] / 1e6:.2f} | {diff:+.2f} | {r['cpu_s_per_step']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace, cache: Path) -> int:
    if args.model:
        model_dir = args.model
    elif args.shape == "llama-7b":
        gpu = torch.cuda.is_available()
        print("writing a LLaMA-7B-shaped random-weight model (bfloat16) ...", flush=True)
        model_dir = write_random_model(llama_config(**LLAMA_7B_CONFIG), cache / "bench" / "llama-7b-shape",
                                       dtype=torch.bfloat16, device="cuda" if gpu else "cpu")
    else:
        model_dir = write_random_model(llama_config(**BENCH_CONFIG), cache / "bench" / "llama-bench")
    model_mb = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 1e6
    wires = args.wires.split(",")
    micro = [int(m) for m in args.micro_batches.split(",")]
    base = {"model": str(model_dir), "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "kill_mode": args.kill_mode, "device": args.device, "local_dtype": args.local_dtype}
    link = "127.0.0.1 loopback"
    cloud = CloudProcess(Path(model_dir), extra=["--state-dir", str(cache / "bench" / "cloud-state"),
                                                 "--device", args.cloud_device, "--dtype", args.cloud_dtype])
    relay = None
    try:
        address = cloud.address
        if args.wan:
            delay, rate = parse_wan(args.wan)
            status = netem_status()
            relay = LinkEmulator(cloud.address, delay, rate)
            address = relay.address
            link = (f"{args.wan} emulated in user space (kernel netem {status})" if status != "available"
                    else f"{args.wan} emulated in user space")
            print(f"--wan {args.wan}: kernel netem {status}; using the user-space link emulator", flush=True)
        local = run_worker({**base, "name": "local-train", "budget": 10**9})
        layers = local["layers"]
        budgets = sorted({parse_budget(b, layers) for b in args.budgets.split(",")}, reverse=True)
        rows = [{**local, "name": "local-train", "ratio": 1.0}]
        print(f"local-train: {local['median_step_s']:.3f} s/step", flush=True)
        for wire in wires:
            for budget in budgets:
                for m in micro:
                    spec = {**base, "name": "split", "cloud": address, "wire": wire, "budget": budget, "micro_batches": m}
                    row = {**run_worker(spec), "name": "split", "wire": wire, "micro_batches": m}
                    row["ratio"] = row["median_step_s"] / local["median_step_s"]
                    rows.append(row)
                    print(f"split {wire} budget {budget}/{layers} M={m}: {row['median_step_s']:.3f} s/step "
                          f"({row['ratio']:.2f}x local)", flush=True)
    finally:
        if relay is not None:
            relay.close()
        cloud.stop()
    meta = {"model": str(model_dir), "layers": layers, "model_mb": model_mb, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "steps": args.steps, "link": link,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch_threads": torch.get_num_threads(),
            "cloud": f"{args.cloud_device}/{args.cloud_dtype}", "device": args.device, "local_dtype": args.local_dtype,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    table = markdown(rows, meta)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    return 0


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        sys.setswitchinterval(float(os.environ.get("DLORA_GIL_SWITCH_S", "0.005")))
        print(json.dumps(worker(json.loads(sys.argv[2]))), flush=True)
        sys.stderr.flush()
        # The result is out; skip the interpreter's teardown. In ~2% of runs here it aborted after the
        # result ("terminate called without an active exception", from a native thread at exit).
        os._exit(0)
    sys.exit("use `dlora bench`")


if __name__ == "__main__":
    main()
