"""How busy is each direction of an emulated device link during split steps? A picture per M.

Usage: python bench/wan_timeline.py [--wan 10ms,100mbit] [--wire int8] [--micro-batches 1,4] [--steps 3]
           [--out docs/wan_link_timeline.png]

Runs `dlora bench`'s worker through the user-space link emulator (edge_client/link_emulator.py) with
recording on, and draws, for the last two steps of each M, when the link carried bytes up (device to
cloud) and down, in 20 ms bins, with each direction's busy share.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from edge_client.bench import TARGETS, run_worker  # noqa: E402
from edge_client.cli import default_cache  # noqa: E402
from edge_client.cloud_process import CloudProcess  # noqa: E402
from edge_client.link_emulator import LinkEmulator, parse_wan  # noqa: E402
from edge_client.synthetic import BENCH_CONFIG, llama_config, write_random_model  # noqa: E402

BIN_S = 0.02


def busy_share(busy: list[tuple[str, float, float]], direction: str, start: float, end: float) -> float:
    return sum(max(0.0, min(e, end) - max(s, start)) for d, s, e in busy if d == direction) / (end - start)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--wan", default="10ms,100mbit")
    ap.add_argument("--wire", default="int8")
    ap.add_argument("--micro-batches", default="1,4")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("docs/wan_link_timeline.png"))
    args = ap.parse_args()
    cache = default_cache()
    model = write_random_model(llama_config(**BENCH_CONFIG), cache / "bench" / "llama-bench")
    delay, rate, rate_down = parse_wan(args.wan)
    cloud = CloudProcess(model, extra=["--state-dir", str(cache / "bench" / "cloud-state")])
    ms = [int(m) for m in args.micro_batches.split(",")]
    fig, axes = plt.subplots(len(ms), 1, figsize=(10, 2.2 * len(ms)), squeeze=False)
    try:
        for ax, m in zip(axes[:, 0], ms):
            relay = LinkEmulator(cloud.address, delay, rate, record=True, rate_down=rate_down)
            spec = {"model": str(model), "steps": args.steps, "batch_size": 8, "seq_len": 128, "kill_mode": "detached",
                    "device": "cpu", "local_dtype": "float32", "cloud": relay.address, "wire": args.wire, "budget": 10**9,
                    "micro_batches": m}
            try:
                step_s = run_worker({**spec, "name": f"split M={m}"})["median_step_s"]
            finally:
                relay.close()
            busy = relay.busy or []
            end = max(e for _, _, e in busy)
            start = end - 2 * step_s
            bins = [start + i * BIN_S for i in range(int((end - start) / BIN_S))]
            for row, (direction, color) in enumerate((("up", "tab:orange"), ("down", "tab:blue"))):
                share = busy_share(busy, direction, start, end)
                ax.bar([b - start for b in bins], [busy_share(busy, direction, b, b + BIN_S) for b in bins], width=BIN_S,
                       bottom=row * 1.2, color=color, align="edge", label=f"{direction}: busy {share:.0%}")
                print(f"M={m}: {step_s:.2f} s/step, {direction} busy {share:.0%}", flush=True)
            ax.set_yticks([0.5, 1.7], ["up", "down"])
            ax.set_xlim(0, end - start)
            ax.set_title(f"M={m}: {step_s:.2f} s/step ({args.wire}, {args.wan}, LoRA on {','.join(TARGETS)})", fontsize=9)
            ax.legend(loc="upper right", fontsize=7)
        axes[-1, 0].set_xlabel("seconds (last two steps)")
        fig.tight_layout()
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")
    finally:
        cloud.stop()


if __name__ == "__main__":
    main()
