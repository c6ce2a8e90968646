"""How busy is each direction of an emulated device link during split steps? A picture per M.

Usage: python bench/wan_timeline.py [--wan 10ms,100mbit] [--wire int8] [--micro-batches 1,4] [--steps 3]
           [--model DIR] [--out docs/wan_link_timeline.png]

Runs `dlora bench`'s worker through the user-space link emulator (edge_client/tools/link_emulator.py) with
recording on, and draws, for the last two steps of each M, when the link carried bytes up (device to
cloud) and down, in 20 ms bins, with each direction's busy share, and how busy the machine's CPUs were
(from /proc/stat, sampled every 20 ms: cloud and device share them here).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.model_files import load_config  # noqa: E402
from edge_client.app.cli import default_cache  # noqa: E402
from edge_client.tools.bench_worker import attention_targets, run_worker  # noqa: E402
from edge_client.tools.cloud_process import CloudProcess  # noqa: E402
from edge_client.tools.link_emulator import LinkEmulator, parse_wan  # noqa: E402
from edge_client.tools.synthetic import BENCH_CONFIG, llama_config, write_random_model  # noqa: E402

BIN_S = 0.02


class CpuSampler:
    """Share of all CPUs busy, sampled from /proc/stat every BIN_S seconds: [(time.monotonic, share)]."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    @staticmethod
    def _read() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        idle = ticks[3] + ticks[4]  # idle + iowait
        return sum(ticks) - idle, sum(ticks)

    def _run(self) -> None:
        busy0, total0 = self._read()
        while not self._stop.wait(BIN_S):
            busy, total = self._read()
            if total > total0:
                self.samples.append((time.monotonic(), (busy - busy0) / (total - total0)))
            busy0, total0 = busy, total

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float:
        inside = [share for t, share in self.samples if start < t <= end]
        return sum(inside) / len(inside) if inside else 0.0


def busy_share(busy: list[tuple[str, float, float]], direction: str, start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for d, s, e in busy if d == direction) / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wan", default="10ms,100mbit")
    ap.add_argument("--wire", default="int8")
    ap.add_argument("--micro-batches", default="1,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--model", type=Path, help="model folder (default: the bench's random-weight model)")
    ap.add_argument("--out", type=Path, default=Path("docs/wan_link_timeline.png"))
    args = ap.parse_args()
    cache = default_cache()
    model = args.model or write_random_model(llama_config(**BENCH_CONFIG), cache / "bench" / "llama-bench")
    targets = ",".join(attention_targets(load_config(Path(model)).model_type))
    delay, rate, rate_down = parse_wan(args.wan)
    cloud = CloudProcess(model, extra=["--state-dir", str(cache / "bench" / "cloud-state")])
    ms = [int(m) for m in args.micro_batches.split(",")]
    fig, axes = plt.subplots(len(ms), 1, figsize=(10, 2.8 * len(ms)), squeeze=False)
    try:
        for ax, m in zip(axes[:, 0], ms):
            relay = LinkEmulator(cloud.address, delay, rate, record=True, rate_down=rate_down)
            cpu = CpuSampler()
            spec = {"model": str(model), "steps": args.steps, "batch_size": 8, "seq_len": 128, "kill_mode": "detached",
                    "device": "cpu", "local_dtype": "float32", "cloud": relay.address, "wire": args.wire, "budget": 10**9,
                    "micro_batches": m}
            relay_cpu = time.process_time()
            try:
                step_s = run_worker({**spec, "name": f"split M={m}"})["median_step_s"]
            finally:
                relay.close()
                cpu.close()
                relay_cpu = time.process_time() - relay_cpu
            busy = relay.busy or []
            end = max(e for _, _, e in busy)
            start = end - 2 * step_s
            bins = [start + i * BIN_S for i in range(int((end - start) / BIN_S))]
            for row, (direction, color) in enumerate((("up", "tab:orange"), ("down", "tab:blue"))):
                share = busy_share(busy, direction, start, end)
                ax.bar([b - start for b in bins], [busy_share(busy, direction, b, b + BIN_S) for b in bins], width=BIN_S,
                       bottom=row * 1.2, color=color, align="edge", label=f"{direction}: busy {share:.0%}")
                print(f"M={m}: {step_s:.2f} s/step, {direction} busy {share:.0%}", flush=True)
            cpu_share = cpu.mean(start, end)
            ax.bar([b - start for b in bins], [cpu.mean(b, b + BIN_S) for b in bins], width=BIN_S, bottom=2.4,
                   color="tab:gray", align="edge", label=f"CPUs ({os.cpu_count()}): busy {cpu_share:.0%}")
            print(f"M={m}: CPUs busy {cpu_share:.0%}; the relay (this process) used {relay_cpu / (args.steps + 1):.2f} "
                  "CPU-s per step", flush=True)
            ax.set_yticks([0.5, 1.7, 2.9], ["up", "down", "CPUs"])
            ax.set_xlim(0, end - start)
            ax.set_title(f"M={m}: {step_s:.2f} s/step ({args.wire}, {args.wan}, LoRA on {targets})", fontsize=9)
            ax.legend(loc="upper right", fontsize=7)
        axes[-1, 0].set_xlabel("seconds (last two steps)")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    finally:
        cloud.stop()


if __name__ == "__main__":
    main()
