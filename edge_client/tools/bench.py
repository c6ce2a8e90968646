"""`dlora bench`: the split measured against local PEFT training, side by side, in one run.

Every configuration trains the same model on the same seeded batches from the same LoRA weights,
each in a fresh process (so CPU time and peak RSS are its own): (a) local-train, the cloud-only
baseline, and (b) the split through a dlora-cloud child process over 127.0.0.1 (or an emulated
device link, --wan), for each wire codec and budget. Each split configuration runs alongside its
own local-train process, the two taking their steps in turn, so the ratio compares steps taken
seconds apart (a shared machine's speed drifts more than the difference being measured). For
budget b < L the active modules are b layers spread evenly over the stack, killed ones in
--kill-mode (the bench measures cost, not accuracy). Reported per configuration: median step time,
local-train's alongside it and their ratio, payload bytes per step measured and by the DESIGN.md
formula, the device's CPU seconds per step and peak RSS next to the full model's size, and the
final loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from common.config import TrainConfig, check_int8_block_size
from common.errors import ConfigError
from common.families import family_of, resolve_targets
from common.model_files import load_config
from common.wire.cost import step_cost
from common.wire.protocol import WIRE_CODECS
from edge_client.tools.cloud_process import CloudProcess
from edge_client.tools.link_emulator import LinkEmulator, NetemLink, netem_status, parse_wan
from edge_client.tools.synthetic import BENCH_CONFIG, LLAMA_7B_CONFIG, llama_config, write_random_model
from edge_client.train.data import Batch
from edge_client.train.kill_revive import layer_roles


def attention_targets(model_type: str) -> tuple[str, ...]:
    """The bench's default LoRA targets: the modules that read the attention's input, i.e. q, k and v
    (LLaMA, Mistral, Qwen2, OPT) or their fused projection (BLOOM, GPT-NeoX: query_key_value; GPT-2: c_attn).

    Raises:
        ConfigError: the architecture is not supported.
    """
    return tuple(path.rsplit(".", 1)[-1] for path in family_of(model_type).input_groups[0])


def check_targets(model_type: str, targets: str | None) -> tuple[str, ...]:
    """--targets (comma-separated, PEFT-style names) checked against the architecture, or its attention_targets.

    Raises:
        ConfigError: an unsupported architecture, or a name that selects no LoRA-able module (one line each).
    """
    if not targets:
        return attention_targets(model_type)
    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    resolve_targets(family_of(model_type), names)
    return names


def spread(budget: int, layers: int) -> set[int]:
    """`budget` layer indices spread evenly over the stack, the top layer included."""
    return {layers - 1 - round(i * layers / budget) for i in range(budget)}


def parse_wires(text: str) -> list[str]:
    """"float32,int8/bfloat16" -> ["float32", "int8/bfloat16"] (UP/DOWN: a codec per direction).

    Raises:
        ConfigError: an unknown codec.
    """
    wires = [w.strip() for w in text.split(",") if w.strip()]
    for w in wires or [text]:
        if not all(c in WIRE_CODECS for c in w.split("/")) or w.count("/") > 1:
            raise ConfigError(f"--wires: {w!r} is not one of {', '.join(WIRE_CODECS)}, or UP/DOWN of two of them")
    return wires


def parse_micro_batches(text: str) -> list[int]:
    """"1,4" -> [1, 4].

    Raises:
        ConfigError: anything but positive integers.
    """
    try:
        micro = [int(m) for m in text.split(",")]
    except ValueError:
        micro = []
    if not micro or min(micro) < 1:
        raise ConfigError(f"--micro-batches: {text!r} is not a comma-separated list of positive integers")
    return micro


def parse_budget(text: str, layers: int) -> int:
    """"all" -> L, "L/4" -> L // 4, "3" -> 3.

    Raises:
        ConfigError: anything else.
    """
    text = text.strip()
    if text == "all":
        return layers
    number = text[2:] if text.startswith("L/") else text
    if not number.isdigit() or int(number) < 1:
        raise ConfigError(f"--budgets: {text!r} is not all, L/N or a number of layers (N and the number >= 1)")
    return max(1, layers // int(number)) if text.startswith("L/") else min(layers, int(number))


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


class _Trainer:
    """One configuration's training loop, in this (fresh) process, one step at a time."""

    def __init__(self, spec: dict[str, Any]) -> None:
        from edge_client.remote.split_engine import SplitEngine
        from edge_client.train.engines import LocalEngine

        up, _, down = spec.get("wire", "float32").partition("/")  # "int8" or "int8/bfloat16" (up/down)
        self.cfg = cfg = TrainConfig(
            model=spec["model"], data=Path("synthetic"), output=Path("unused"), cloud=spec.get("cloud"),
            wire=up, wire_down=down or None, int8_block_size=spec.get("int8_block_size", 4096),
            targets=tuple(spec.get("targets") or attention_targets(load_config(Path(spec["model"])).model_type)),
            lora_dropout=0.0, lr=1e-3,
            micro_batches=spec.get("micro_batches", 1), progress=False, reply_timeout_s=1200,
            device=spec.get("device", "cpu"), dtype=spec.get("local_dtype", "float32"))
        self.spec = spec
        self.engine = engine = SplitEngine(cfg) if cfg.cloud else LocalEngine(cfg)
        layers = engine.num_layers
        self.active = spread(spec["budget"], layers) if spec["budget"] < layers else set(range(layers))
        engine.set_active(self.active, spec["kill_mode"])
        self.roles = layer_roles(self.active, layers, spec["kill_mode"])
        self.opt = torch.optim.AdamW(engine.parameters(), lr=1e-3)
        vocab = int(engine.edge.config.vocab_size)
        self.batches = synthetic_batches(spec["steps"] + 1, spec["batch_size"], spec["seq_len"], vocab, seed=0)
        self.next = 0
        self.times: list[float] = []
        self.cpu: list[float] = []
        self.payload: list[int] = []
        self.wire: list[int] = []
        self.loss = 0.0

    def step(self) -> float:
        """Train on the next batch; its wall seconds. Step 0 is the warm-up (allocator, gRPC channel, lazy
        inits) and is not recorded."""
        t0, c0 = time.perf_counter(), time.process_time()
        self.opt.zero_grad(set_to_none=True)
        self.loss, traffic = self.engine.train_step(self.batches[self.next], self.next, self.roles)
        self.opt.step()
        if self.cfg.device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        if self.next > 0:
            self.times.append(seconds)
            self.cpu.append(time.process_time() - c0)
            self.payload.append(traffic.payload_up + traffic.payload_down)
            self.wire.append(traffic.bytes_up + traffic.bytes_down)
        self.next += 1
        return seconds

    @property
    def remaining(self) -> int:
        return len(self.batches) - self.next

    def result(self) -> dict[str, Any]:
        self.engine.close()
        edge, spec, split = self.engine.edge, self.spec, self.cfg.cloud is not None
        n = spec["batch_size"] * spec["seq_len"]
        formula = step_cost(n, edge.embed_width, edge.head_width, edge.group_shapes(), self.roles, True,
                            self.cfg.codec_up, self.cfg.int8_block_size, self.cfg.codec_down)
        return {
            "median_step_s": statistics.median(self.times), "step_s": self.times,
            "cpu_s_per_step": statistics.mean(self.cpu), "peak_rss_mb": peak_rss_mb(), "final_loss": self.loss,
            "payload_per_step": statistics.mean(self.payload) if split else 0,
            "formula_per_step": formula.up + formula.down if split else 0,
            "wire_per_step": statistics.mean(self.wire) if split else 0,
            "active": len(self.active), "layers": len(self.roles),
        }


_SETTLE_S = 0.1  # between two workers' steps: the idle one's OpenMP threads stop spinning (libgomp's default: ~8 ms)
_REPLY = "dlora-bench "  # marks the worker's protocol lines on its stdout


def serve_worker(spec: dict[str, Any]) -> None:
    """The worker process: set up, take the warm-up step, then obey "step" / "finish" lines on stdin."""
    trainer = _Trainer(spec)
    trainer.step()
    print(_REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "step" and trainer.remaining:
            print(_REPLY + json.dumps({"step_s": trainer.step()}), flush=True)
        elif line.strip() == "finish":
            print(_REPLY + json.dumps(trainer.result()), flush=True)
            return
        else:  # the parent reads the last stderr line as the reason
            sys.exit(f"bench worker: cannot do {line.strip()!r} ({trainer.remaining} batches left)")


class Worker:
    """One configuration in a fresh process (so its CPU time and peak RSS are its own), stepped from here.

    Raises:
        ConfigError: the worker failed (its last stderr line says why).
    """

    def __init__(self, spec: dict[str, Any]) -> None:
        self.name = spec.get("name", "worker")
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._proc = subprocess.Popen([sys.executable, "-m", "edge_client.tools.bench", "--worker", json.dumps(spec)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self._stdin, self._stdout = self._proc.stdin, self._proc.stdout  # both set: PIPE

    def _ask(self, command: str | None) -> dict[str, Any]:
        try:
            if command is not None:
                self._stdin.write(command + "\n")  # type: ignore[union-attr]
                self._stdin.flush()  # type: ignore[union-attr]
            while line := self._stdout.readline():  # type: ignore[union-attr]
                if line.startswith(_REPLY):
                    return json.loads(line[len(_REPLY):])
        except BrokenPipeError:
            pass
        self._proc.wait()
        self._stderr.seek(0)
        last = (self._stderr.read().strip().splitlines() or ["(no output)"])[-1]
        raise ConfigError(f"bench configuration {self.name} failed: {last}")

    def ready(self) -> None:
        """Wait until the worker has set up and taken its warm-up step."""
        self._ask(None)

    def step(self) -> float:
        return float(self._ask("step")["step_s"])

    def finish(self) -> dict[str, Any]:
        result = self._ask("finish")
        self._proc.wait()
        self._stderr.close()
        return result

    def kill(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._stderr.close()


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """One configuration in a fresh process, its steps back to back; its result dict.

    Raises:
        ConfigError: the worker failed (its last stderr line says why).
    """
    worker = Worker(spec)
    try:
        worker.ready()
        for _ in range(spec["steps"]):
            worker.step()
        return worker.finish()
    finally:
        worker.kill()


def run_paired(local_spec: dict[str, Any], spec: dict[str, Any],
               on_step: Callable[[], None] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """local-train and one split configuration in two fresh processes, taking their steps in turn.

    On a shared machine the speed of the cores drifts by tens of percent within seconds; steps taken
    in alternation see the same drift, so their ratio holds where back-to-back runs do not.

    Raises:
        ConfigError: a worker failed.
    """
    local, split = Worker(local_spec), Worker(spec)
    try:
        local.ready()
        split.ready()
        for i in range(spec["steps"]):
            for worker in (local, split) if i % 2 == 0 else (split, local):
                time.sleep(_SETTLE_S)
                worker.step()
            if on_step is not None:
                on_step()
        return local.finish(), split.finish()
    finally:
        local.kill()
        split.kill()


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Model: {meta['model']} ({meta['layers']} layers, {meta['model_mb']:.0f} MB of weights); "
        f"batch {meta['batch_size']}x{meta['seq_len']} tokens; LoRA on {','.join(meta.get('targets', []))}; "
        f"{meta['steps']} timed steps; link: {meta['link']}; "
        f"cloud {meta['cloud']}, device {meta['device']}, local-train base {meta['local_dtype']}"
        f"{'; GPU ' + meta['gpu'] if meta.get('gpu') else ''}; {meta['date']}.",
        "",
        "| config | wire | budget | M | median step s | local-train alongside s | x local | payload MB/step "
        "| formula MB/step | diff % | device CPU s/step | device peak RSS MB | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = 100 * (r["payload_per_step"] / r["formula_per_step"] - 1) if r["formula_per_step"] else 0.0
        lines.append(
            f"| {r['name']} | {r.get('wire', '-')} | {r['active']}/{r['layers']} | {r.get('micro_batches', 1)} "
            f"| {r['median_step_s']:.3f} | {r['local_step_s']:.3f} | {r['ratio']:.2f} | {r['payload_per_step'] / 1e6:.2f} "
            f"| {r['formula_per_step'] / 1e6:.2f} | {diff:+.2f} | {r['cpu_s_per_step']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def run_bench(args: argparse.Namespace, cache: Path) -> int:
    wires, micro = parse_wires(args.wires), parse_micro_batches(args.micro_batches)
    block_size = check_int8_block_size(args.int8_block_size)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag}={value}: must be >= 1")
    for flag, where in (("--device", args.device), ("--cloud-device", args.cloud_device)):
        if where == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{flag} cuda: no CUDA device is visible to torch here; use {flag} cpu")
    for budget in args.budgets.split(","):
        parse_budget(budget, layers=1)  # its syntax, before any work; the layers come with the model
    if args.model:
        model_dir = args.model
    elif args.shape == "llama-7b":
        gpu = torch.cuda.is_available()
        print("writing a LLaMA-7B-shaped random-weight model (bfloat16) ...", flush=True)
        model_dir = write_random_model(llama_config(**LLAMA_7B_CONFIG), cache / "bench" / "llama-7b-shape",
                                       dtype=torch.bfloat16, device="cuda" if gpu else "cpu")
    else:
        model_dir = write_random_model(llama_config(**BENCH_CONFIG), cache / "bench" / "llama-bench")
    config = load_config(Path(model_dir))
    targets = check_targets(config.model_type, args.targets)
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions and args.seq_len > positions:
        raise ConfigError(f"--seq-len={args.seq_len}: the model has {positions} positions; use --seq-len <= {positions}")
    model_mb = sum(p.stat().st_size for p in Path(model_dir).glob("*.safetensors")) / 1e6
    base = {"model": str(model_dir), "steps": args.steps, "batch_size": args.batch_size, "seq_len": args.seq_len,
            "kill_mode": args.kill_mode, "device": args.device, "local_dtype": args.local_dtype,
            "int8_block_size": block_size, "targets": list(targets)}
    link, netns = "127.0.0.1 loopback", None
    if args.wan:
        delay, rate_up, rate_down = parse_wan(args.wan)
        status = netem_status()
        if status == "available":
            try:
                netns = NetemLink(delay, rate_up, rate_down)
                link = f"{args.wan} by kernel netem (the cloud in a network namespace behind a veth pair)"
            except ConfigError as e:
                status = f"could not be set up: {e}"
        if netns is None:
            link = f"{args.wan} emulated in user space (kernel netem {status})"
        print(f"--wan {args.wan}: {link}", flush=True)
    with contextlib.ExitStack() as cleanup:  # runs in reverse: the relay, the cloud, then the namespace
        if netns is not None:
            cleanup.callback(netns.close)
        cloud = CloudProcess(Path(model_dir), extra=["--state-dir", str(cache / "bench" / "cloud-state"),
                                                     "--device", args.cloud_device, "--dtype", args.cloud_dtype,
                                                     *(["--host", netns.ns_ip] if netns else [])],
                             prefix=netns.prefix if netns else None)
        cleanup.callback(cloud.stop)
        address = cloud.address
        if args.wan and netns is None:
            relay = LinkEmulator(cloud.address, delay, rate_up, rate_down=rate_down)
            cleanup.callback(relay.close)
            address = relay.address
        layers = int(config.num_hidden_layers)
        budgets = sorted({parse_budget(b, layers) for b in args.budgets.split(",")}, reverse=True)
        local_spec = {**base, "name": "local-train", "budget": 10**9}
        rows, local_steps = [], []
        bar = tqdm(total=len(wires) * len(budgets) * len(micro) * args.steps, unit="step pair", desc="bench",
                   disable=args.no_progress)
        cleanup.callback(bar.close)
        for wire in wires:
            for budget in budgets:
                for m in micro:
                    spec = {**base, "name": "split", "cloud": address, "wire": wire, "budget": budget, "micro_batches": m}
                    bar.set_postfix_str(f"{wire} {budget}/{layers} M={m}")
                    local, split = run_paired(local_spec, spec, on_step=bar.update)
                    if not rows:
                        rows.append({**local, "name": "local-train"})
                    local_steps += local["step_s"]
                    row = {**split, "name": "split", "wire": wire, "micro_batches": m,
                           "local_step_s": local["median_step_s"]}
                    row["ratio"] = row["median_step_s"] / row["local_step_s"]
                    rows.append(row)
                    bar.write(f"split {wire} budget {budget}/{layers} M={m}: {row['median_step_s']:.3f} s/step, "
                              f"local-train alongside {row['local_step_s']:.3f} ({row['ratio']:.2f}x)")
        rows[0].update(median_step_s=statistics.median(local_steps), local_step_s=statistics.median(local_steps),
                       ratio=1.0)
    meta = {"model": str(model_dir), "layers": layers, "model_mb": model_mb, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "steps": args.steps, "link": link, "targets": list(targets),
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
        serve_worker(json.loads(sys.argv[2]))
        sys.stderr.flush()
        # The result is out; skip the interpreter's teardown. In ~2% of runs here it aborted after the
        # result ("terminate called without an active exception", from a native thread at exit).
        os._exit(0)
    sys.exit("use `dlora bench`")


if __name__ == "__main__":
    main()
