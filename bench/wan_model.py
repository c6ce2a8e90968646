"""A discrete-event model of one split step over a slow link: how fast could M micro-batches go?

Usage: python bench/wan_model.py

`dlora bench --wan 10ms,100mbit` measures int8 M=4 at ~1.9x the throughput of M=1 (docs/benchmarks.md).
This model asks whether any schedule of the same messages could reach 2x. It replays the step
protocol of DESIGN.md for one step: per micro-batch, StepBegin up; per layer, x down, the device's
LoRA, the deltas up, the cloud's layer; Hidden down, the head, HiddenGrad up; per layer from the
top, dL/d(delta) down, the device's LoRA backward, dL/dx up, the cloud's layer backward.

- The link is what the bench's emulator is: per direction, a FIFO queue serialising at RATE, then
  DELAY of flight. A schedule may instead give the queue ideal priorities (no such thing exists in
  gRPC over TCP: it hands every message to the socket at once, so the queue is the link's).
- The device answers layer calls on one thread and computes heads on another (as edge_client/remote/link.py
  does); the cloud runs each micro-batch on its own thread. Compute times scale with tokens and
  do not model two processes sharing two cores.

Times are per layer and micro-batch of 256 tokens (8x128 split in four), medians of a traced run on
the CI machine (int8, M=4, 2026-11-26); the model is compared with a measured M=1 (`--m1`).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass, field

RATE, DELAY = 12.5e6, 0.010  # --wan 10ms,100mbit
LAYERS = 8
UNIT = 256 * 512 * (1 + 4 / 4096)  # bytes of one (256 tokens, hidden 512) tensor in int8, with a float32 scale per 4096
CLOUD_FWD, CLOUD_BWD = 0.015, 0.020  # s per layer (the layer's base, codec, framing)
DEVICE_FWD, DEVICE_BWD = 0.005, 0.004  # s per LoRA call (decode, three rank-8 products, encode)
HEAD = 0.045  # s: logits, loss and its backward over a vocabulary of 8192

Priority = Callable[[int, str], int]  # (micro-batch, "up"|"down") -> class, lower first


@dataclass
class _Link:
    busy: bool = False
    queue: list[tuple[int, float, int, float, Callable[[float], None]]] = field(default_factory=list)


def step_time(m: int = 4, starts: list[float] | None = None, priority: Priority | None = None) -> float:
    """Seconds from the first StepBegin to the last StepDone of one step of m micro-batches."""
    scale = 4 / m  # tokens per micro-batch, relative to 256 (compute too: an upper bound for M < 4)
    unit = UNIT * scale
    events: list[tuple[float, int, Callable[[float], None]]] = []
    order = itertools.count()
    links = {"up": _Link(), "down": _Link()}
    free = {"device": 0.0, "head": 0.0}
    done: list[float] = []

    def at(t: float, fn: Callable[[float], None]) -> None:
        heapq.heappush(events, (t, next(order), fn))

    def send(t: float, direction: str, size: float, mb: int, then: Callable[[float], None]) -> None:
        rank = priority(mb, direction) if priority else 0
        links[direction].queue.append((rank, t, next(order), size, then))
        pump(t, direction)

    def pump(t: float, direction: str) -> None:
        link = links[direction]
        if link.busy or not link.queue:
            return
        link.queue.sort(key=lambda q: q[:3])
        _, _, _, size, then = link.queue.pop(0)
        link.busy = True
        end = t + size / RATE

        def finished(t: float) -> None:
            link.busy = False
            pump(t, direction)

        at(end, finished)
        at(end + DELAY, then)

    def compute(t: float, where: str | None, seconds: float, then: Callable[[float], None]) -> None:
        start = t if where is None else max(t, free[where])
        if where is not None:
            free[where] = start + seconds
        at(start + seconds, then)

    def forward(mb: int, layer: int) -> Callable[[float], None]:
        if layer == LAYERS:
            return lambda t: send(t, "down", unit, mb, lambda t: compute(t, "head", HEAD * scale, lambda t: send(
                t, "up", unit, mb, lambda t: compute(t, None, CLOUD_BWD * scale, backward(mb, LAYERS - 1)))))
        return lambda t: send(t, "down", unit, mb, lambda t: compute(t, "device", DEVICE_FWD * scale, lambda t: send(
            t, "up", 3 * unit, mb, lambda t: compute(t, None, CLOUD_FWD * scale, forward(mb, layer + 1)))))

    def backward(mb: int, layer: int) -> Callable[[float], None]:
        after = backward(mb, layer - 1) if layer > 0 else done.append
        return lambda t: send(t, "down", 3 * unit, mb, lambda t: compute(t, "device", DEVICE_BWD * scale, lambda t: send(
            t, "up", unit, mb, lambda t: compute(t, None, CLOUD_BWD * scale, after))))

    for mb, start in enumerate(starts or [0.0] * m):
        at(start, lambda t, mb=mb: send(t, "up", unit, mb, lambda t: compute(t, None, CLOUD_FWD * scale, forward(mb, 0))))
    while events:
        t, _, fn = heapq.heappop(events)
        fn(t)
    return max(done) + DELAY  # the last StepDone reaches the device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--m1", type=float, default=4.19,
                    help="measured int8 M=1 s/step to compare with (default: docs/benchmarks.md's WAN table)")
    m1 = ap.parse_args().m1
    up = 4 * (LAYERS * 3 + 1 + LAYERS + 1) * UNIT / RATE  # StepBegin, deltas, dL/dx, HiddenGrad
    down = 4 * (LAYERS + 1 + LAYERS * 3) * UNIT / RATE  # x, Hidden, dL/d(delta)
    phases = 4 * (LAYERS * 3 + 1 + LAYERS * 3) * UNIT / RATE  # forward's up-link, then backward's down-link
    rng = random.Random(0)
    rows = [
        ("all micro-batches start together, FIFO link (what dlora does)", step_time(4)),
        ("best of 2000 random start times, FIFO link", min(
            step_time(4, [0.0] + sorted(rng.uniform(0, 0.9) for _ in range(3))) for _ in range(2000))),
        ("ideal link priorities: micro-batch 0 first, then 1, 2, 3", step_time(4, priority=lambda mb, d: mb)),
        ("ideal link priorities: 0-1 before 2-3 up, 2-3 before 0-1 down",
         step_time(4, priority=lambda mb, d: mb // 2 if d == "up" else -(mb // 2))),
        ("bytes only: forward on the up-link, then backward on the down-link", phases),
        ("bytes only: both directions busy all the time", max(up, down)),
    ]
    print(f"int8, M=4, {RATE * 8 / 1e6:.0f} Mbit/s, {DELAY * 1e3:.0f} ms each way; x = throughput over M=1's {m1:.2f} s/step")
    print("| schedule | s/step | x M=1 |\n|---|---|---|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.2f} | {m1 / seconds:.2f} |")


if __name__ == "__main__":
    main()
