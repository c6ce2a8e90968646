"""`dlora bench`: the split measured against local PEFT training, side by side, in one run.

Every configuration trains the same model on the same seeded batches from the same LoRA weights,
each in a fresh process (so CPU time and peak RSS are its own): (a) local-train, the cloud-only
baseline, and (b) the split through a dlora-cloud child process over 127.0.0.1 (or an emulated
device link, --wan), for each step protocol (--protocols), wire codec, budget and M. Each split
configuration runs alongside its own local-train process, the two taking their steps in turn, so
the ratio compares steps taken seconds apart (a shared machine's speed drifts more than the
difference being measured). For budget b < L the active modules are b layers spread evenly over
the stack, killed ones in --kill-mode (the bench measures cost, not accuracy). Reported per
configuration: median step time, local-train's alongside it and their ratio, payload bytes per step
measured and by the protocol's formula (common/wire/cost.py), the device's CPU seconds per step
and peak RSS next to the full model's size, and the final loss.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from tqdm import tqdm

from common.config import STEP_PROTOCOLS, ServeConfig, TrainConfig, check_int8_block_size, field_default
from common.errors import ConfigError
from common.families import family_of, max_positions, resolve_targets
from common.model_files import load_config
from common.wire.protocol import WIRE_CODECS
from edge_client.tools.bench_worker import BenchSpec, attention_targets, run_paired
from edge_client.tools.cloud_process import CloudProcess
from edge_client.tools.link_emulator import LinkEmulator, NetemLink, netem_status, parse_wan
from edge_client.tools.synthetic import BENCH_CONFIG, LLAMA_7B_CONFIG, llama_config, write_random_model


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


def parse_protocols(text: str) -> list[str]:
    """"layerwise,adapter" -> ["layerwise", "adapter"].

    Raises:
        ConfigError: an unknown protocol.
    """
    protocols = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in protocols if p not in STEP_PROTOCOLS]
    if bad or not protocols:
        raise ConfigError(f"--protocols: {(bad or [text])[0]!r} is not one of {', '.join(STEP_PROTOCOLS)}")
    return list(dict.fromkeys(protocols))


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


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"Model: {meta['model']} ({meta['layers']} layers, {meta['model_mb']:.0f} MB of weights); "
        f"batch {meta['batch_size']}x{meta['seq_len']} tokens; LoRA on {','.join(meta.get('targets', []))}; "
        f"{meta['steps']} timed steps; link: {meta['link']}; "
        f"cloud {meta['cloud']}, device {meta['device']}, local-train base {meta['local_dtype']}"
        f"{'; GPU ' + meta['gpu'] if meta.get('gpu') else ''}; {meta['date']}.",
        "",
        "| config | protocol | wire | budget | M | median step s | local-train alongside s | x local | payload MB/step "
        "| formula MB/step | diff % | device CPU s/step | device peak RSS MB | final loss |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        diff = 100 * (r["payload_per_step"] / r["formula_per_step"] - 1) if r["formula_per_step"] else 0.0
        lines.append(
            f"| {r['name']} | {r.get('protocol', '-')} | {r.get('wire', '-')} | {r['active']}/{r['layers']} "
            f"| {r.get('micro_batches', 1)} "
            f"| {r['median_step_s']:.3f} | {r['local_step_s']:.3f} | {r['ratio']:.2f} | {r['payload_per_step'] / 1e6:.2f} "
            f"| {r['formula_per_step'] / 1e6:.2f} | {diff:+.2f} | {r['cpu_s_per_step']:.2f} | {r['peak_rss_mb']:.0f} "
            f"| {r['final_loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


# flag -> (the config that owns its default, the field): what a bench flag left unset means
_DEFAULTS: dict[str, tuple[type[BaseModel], str]] = {
    "steps": (BenchSpec, "steps"), "batch_size": (BenchSpec, "batch_size"), "seq_len": (BenchSpec, "seq_len"),
    "int8_block_size": (TrainConfig, "int8_block_size"), "micro_batches": (TrainConfig, "micro_batches"),
    "kill_mode": (TrainConfig, "kill_mode"), "device": (TrainConfig, "device"), "local_dtype": (TrainConfig, "dtype"),
    "cloud_device": (ServeConfig, "device"), "cloud_dtype": (ServeConfig, "dtype"),
    "protocols": (TrainConfig, "protocol"), "weights_wire": (TrainConfig, "weights_wire"),
}


def with_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """The bench's flags, each left unset (None) replaced by its owner's default."""
    given = vars(args).copy()
    for flag, (owner, field) in _DEFAULTS.items():
        if given[flag] is None:
            given[flag] = field_default(owner, field)
    given["micro_batches"] = str(given["micro_batches"])  # a comma-separated list of M values
    return argparse.Namespace(**given)


def check_flags(args: argparse.Namespace) -> tuple[list[str], list[int], list[str]]:
    """Every flag that can be checked before any work (a model written, a cloud started); the codecs, Ms and
    protocols.

    Raises:
        ConfigError: one line naming the first bad flag.
    """
    wires, micro = parse_wires(args.wires), parse_micro_batches(args.micro_batches)
    protocols = parse_protocols(args.protocols)
    check_int8_block_size(args.int8_block_size)
    for flag, value in (("--steps", args.steps), ("--batch-size", args.batch_size), ("--seq-len", args.seq_len)):
        if value < 1:
            raise ConfigError(f"{flag}={value}: must be >= 1")
    for flag, where in (("--device", args.device), ("--cloud-device", args.cloud_device)):
        if where == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"{flag} cuda: no CUDA device is visible to torch here; use {flag} cpu")
    for budget in args.budgets.split(","):
        parse_budget(budget, layers=1)  # its syntax, before any work; the layers come with the model
    return wires, micro, protocols


def bench_model(args: argparse.Namespace, cache: Path) -> Path:
    """--model, or the random-weight model of --shape, written into the cache once."""
    if args.model:
        return Path(args.model)
    if args.shape == "llama-7b":
        gpu = torch.cuda.is_available()
        print("writing a LLaMA-7B-shaped random-weight model (bfloat16) ...", flush=True)
        return write_random_model(llama_config(**LLAMA_7B_CONFIG), cache / "bench" / "llama-7b-shape",
                                  dtype=torch.bfloat16, device="cuda" if gpu else "cpu")
    return write_random_model(llama_config(**BENCH_CONFIG), cache / "bench" / "llama-bench")


@dataclass
class Link:
    """Where the device reaches the cloud: loopback, or --wan by kernel netem or the user-space relay."""

    description: str
    wan: tuple[float, float, float] | None = None  # one-way delay (s), rate up, rate down (bytes/s): parse_wan
    netns: NetemLink | None = None  # the cloud's network namespace, where kernel netem is used
    tls_ca: Path | None = None  # with --tls, while cloud() runs: the CA the workers trust

    @classmethod
    def for_flag(cls, wan: str | None) -> Link:
        if not wan:
            return cls("127.0.0.1 loopback")
        delay, rate_up, rate_down = parse_wan(wan)
        link, status = cls("", (delay, rate_up, rate_down)), netem_status()
        if status == "available":
            try:
                link.netns = NetemLink(delay, rate_up, rate_down)
                link.description = f"{wan} by kernel netem (the cloud in a network namespace behind a veth pair)"
            except ConfigError as e:
                status = f"could not be set up: {e}"
        if link.netns is None:
            link.description = f"{wan} emulated in user space (kernel netem {status})"
        print(f"--wan {wan}: {link.description}", flush=True)
        return link

    @contextlib.contextmanager
    def cloud(self, model_dir: Path, args: argparse.Namespace, cache: Path) -> Iterator[str]:
        """A dlora-cloud child behind this link; yields the address the device uses. Cleans up in reverse:
        the relay, the cloud, then the namespace."""
        with contextlib.ExitStack() as cleanup:
            netns = self.netns
            if netns is not None:
                cleanup.callback(netns.close)
            tls: list[str] = []
            if args.tls:
                folder = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="dlora-bench-tls-")))
                self.tls_ca, tls = tls_certificates(folder, [netns.ns_ip] if netns else [])
                self.description += ", over TLS"
            cloud = CloudProcess(model_dir, extra=["--state-dir", str(cache / "bench" / "cloud-state"), *tls,
                                                   "--device", args.cloud_device, "--dtype", args.cloud_dtype,
                                                   *(["--host", netns.ns_ip, "--auth", "none", "--insecure"] if netns else [])],
                                 prefix=netns.prefix if netns else None)
            cleanup.callback(cloud.stop)
            if self.wan is None or netns is not None:
                yield cloud.address
                return
            delay, rate_up, rate_down = self.wan
            relay = LinkEmulator(cloud.address, delay, rate_up, rate_down=rate_down)
            cleanup.callback(relay.close)
            yield relay.address


def tls_certificates(folder: Path, hosts: list[str]) -> tuple[Path, list[str]]:
    """`dlora-cloud tls init` into `folder` for 127.0.0.1 and `hosts`: the CA the workers trust, and the serve flags.

    Raises:
        ConfigError: tls init failed (its last line says why).
    """
    done = subprocess.run([sys.executable, "-m", "cloud_server.cli", "tls", "init", str(folder), "--host", "127.0.0.1",
                           *(a for h in hosts for a in ("--host", h))], capture_output=True, text=True)
    if done.returncode:
        raise ConfigError(f"--tls: dlora-cloud tls init failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return folder / "ca.pem", ["--tls-cert", str(folder / "server.pem"), "--tls-key", str(folder / "server.key")]


def sweep(base: BenchSpec, address: str, grid: list[tuple[str, str, int, int]], layers: int,
          bar: tqdm) -> list[dict[str, Any]]:
    """Every split configuration (protocol, wire, budget, M) paired with its own local-train (the whole batch
    at once, the same baseline for every M); local-train's row first (its median over all pairs), then one
    row per configuration."""
    local_spec = base.model_copy(update={"name": "local-train"})
    rows: list[dict[str, Any]] = []
    local_steps: list[float] = []
    for protocol, wire, budget, m in grid:
        spec = base.model_copy(update={"name": "split", "cloud": address, "wire": wire, "budget": budget,
                                       "micro_batches": m, "protocol": protocol})
        bar.set_postfix_str(f"{protocol} {wire} {budget}/{layers} M={m}")
        local, split = run_paired(local_spec, spec, on_step=bar.update)
        if not rows:
            rows.append({**local, "name": "local-train"})
        local_steps += local["step_s"]
        row = {**split, "name": "split", "protocol": protocol, "wire": wire, "micro_batches": m,
               "local_step_s": local["median_step_s"]}
        row["ratio"] = row["median_step_s"] / row["local_step_s"]
        rows.append(row)
        bar.write(f"split {protocol} {wire} budget {budget}/{layers} M={m}: {row['median_step_s']:.3f} s/step, "
                  f"local-train alongside {row['local_step_s']:.3f} ({row['ratio']:.2f}x)")
    median = statistics.median(local_steps)
    rows[0].update(median_step_s=median, local_step_s=median, ratio=1.0)
    return rows


def run_bench(args: argparse.Namespace, cache: Path) -> int:
    """`dlora bench`: check the flags, get the model, start the cloud behind the link, sweep, report.

    Raises:
        ConfigError: a bad flag (before any work), or a configuration failed.
        RemoteError: the cloud did not start.
    """
    args = with_defaults(args)
    wires, micro, protocols = check_flags(args)
    model_dir = bench_model(args, cache)
    config = load_config(model_dir)
    targets = check_targets(config.model_type, args.targets)
    positions = max_positions(config)
    if positions and args.seq_len > positions:
        raise ConfigError(f"--seq-len={args.seq_len}: the model has {positions} positions; use --seq-len <= {positions}")
    base = BenchSpec(model=model_dir, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                     kill_mode=args.kill_mode, device=args.device, local_dtype=args.local_dtype,
                     int8_block_size=args.int8_block_size, targets=targets, weights_wire=args.weights_wire)
    layers = int(config.num_hidden_layers)
    budgets = sorted({parse_budget(b, layers) for b in args.budgets.split(",")}, reverse=True)
    grid = [(p, w, b, m) for p in protocols for w in wires for b in budgets for m in micro]
    link = Link.for_flag(args.wan)
    with link.cloud(model_dir, args, cache) as address, tqdm(
            total=len(grid) * args.steps, unit="step pair", desc="bench", disable=args.no_progress) as bar:
        rows = sweep(base.model_copy(update={"tls_ca": link.tls_ca}), address, grid, layers, bar)
    meta = {"model": str(model_dir), "layers": layers,
            "model_mb": sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 1e6,
            "batch_size": args.batch_size, "seq_len": args.seq_len, "steps": args.steps, "link": link.description,
            "targets": list(targets), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch_threads": torch.get_num_threads(), "cloud": f"{args.cloud_device}/{args.cloud_dtype}",
            "device": args.device, "local_dtype": args.local_dtype, "weights_wire": args.weights_wire,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    table = markdown(rows, meta)
    print("\n" + table)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if args.markdown:
        args.markdown.write_text(table)
    return 0
