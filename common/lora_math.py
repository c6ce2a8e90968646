"""LoRA's maths, the same wherever it runs: PEFT's delta s * B(A(dropout(x))), s = alpha / r.

It runs on the device in `layerwise` and `local-train`, and on the cloud in `adapter`. So that all
three compute the same numbers, dropout does not draw from torch's global generator (whose order
would depend on which micro-batch's layer call a thread reaches first): every mask comes from its
own generator, seeded by a key of (seed, step, micro-batch, layer, target), and is drawn the same
way (`rand(x.shape, generator=g) >= p`) on x's device. With M > 1 a step is then reproducible, and
a retried step draws the same masks again.

A device and a cloud of the same kind (two CPUs, two CUDA GPUs) draw the same masks; a CPU and a
GPU do not (torch's generators differ), which only matters when one side applies LoRA and the other
is compared with it, as the tests do on CPUs.
"""

from __future__ import annotations

import hashlib
import struct

import torch
import torch.nn.functional as F


def dropout_key(seed: int, step: int, micro_batch: int, layer: int, target: int) -> int:
    """The generator seed of one mask: target = the module's index among its layer's targets (family order).

    blake2b of the five integers, so nearby keys give unrelated streams (consecutive seeds of one
    Mersenne Twister are not a problem, but a hash costs nothing and leaves no doubt).
    """
    raw = struct.pack("<q4Q", seed, step, micro_batch, layer, target)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") & ((1 << 63) - 1)


def keyed_dropout(x: torch.Tensor, p: float, key: int | None) -> torch.Tensor:
    """Inverted dropout of x with keep probability 1 - p, its mask drawn from a generator seeded with key.

    key None or p == 0: x itself (no dropout, as PEFT's nn.Identity for p == 0, and in evaluation).
    """
    if key is None or p == 0:
        return x
    gen = torch.Generator(device=x.device).manual_seed(key)
    keep = torch.rand(x.shape, generator=gen, device=x.device) >= p  # float32 draws, whatever x's dtype
    return x * (keep.to(x.dtype) * (1.0 / (1.0 - p)))  # each factor is exactly 0 or 1/(1-p)


def lora_delta(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float,
               key: int | None) -> torch.Tensor:
    """s * B(A(dropout(x))) for one target: x (..., in), A (r, in), B (out, r) -> (..., out). PEFT's op order."""
    return F.linear(F.linear(keyed_dropout(x, p, key), a), b) * scaling


class KeyedDropout(torch.nn.Module):
    """keyed_dropout as a module, for PEFT's `lora_dropout` slots (local-train, and the tests' PEFT reference).

    `clock` says which (step, micro-batch) is running: the caller sets it before each forward. In eval
    mode, or with the clock unset, it is the identity.
    """

    def __init__(self, p: float, seed: int, layer: int, target: int, clock: DropoutClock) -> None:
        super().__init__()
        self.p, self.seed, self.layer, self.target, self.clock = p, seed, layer, target, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        now = self.clock.now
        if not self.training or now is None:
            return x
        return keyed_dropout(x, self.p, dropout_key(self.seed, now[0], now[1], self.layer, self.target))


class DropoutClock:
    """The (step, micro-batch) a forward belongs to, shared by a model's KeyedDropout modules."""

    def __init__(self) -> None:
        self.now: tuple[int, int] | None = None
