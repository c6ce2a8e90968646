"""The adapter protocol's module numbering and flat weight layout, shared by both ends.

A module is one LoRA target in one layer, numbered `layer * P + t` (P targets per layer, t the
target's index among them in the family's order). StepWeights.weights and LoraGrads.grads hold,
for each module named, lora_A (r, in) then lora_B (out, r), flattened and concatenated. Both ends
know every module's shape from the model and the Hello, so the message carries only numbers and one
tensor, and a receiver knows how many elements to expect before it decodes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from common.errors import ProtocolError


@dataclass(frozen=True)
class AdapterLayout:
    """Module numbering and sizes of one session's LoRA."""

    num_layers: int
    rank: int
    shapes: tuple[tuple[int, int], ...]  # (in, out) of each target of a layer, in family order

    @property
    def per_layer(self) -> int:
        return len(self.shapes)

    @property
    def num_modules(self) -> int:
        return self.num_layers * self.per_layer

    def module(self, layer: int, target: int) -> int:
        return layer * self.per_layer + target

    def layer_of(self, module: int) -> int:
        return module // self.per_layer

    def numel(self, module: int) -> int:
        """Elements of one module's A and B together: r * (in + out)."""
        fin, fout = self.shapes[module % self.per_layer]
        return self.rank * (fin + fout)

    def total_numel(self, modules: Sequence[int]) -> int:
        return sum(self.numel(m) for m in modules)

    def check_modules(self, modules: Sequence[int], what: str) -> list[int]:
        """`modules` as a list, checked: strictly ascending, each below num_modules.

        Raises:
            ProtocolError: a module out of range, repeated or out of order.
        """
        out = list(modules)
        if any(m >= self.num_modules for m in out):
            raise ProtocolError(f"{what}: module numbers must be below {self.num_modules} "
                                f"({self.num_layers} layers x {self.per_layer} targets)")
        if any(b <= a for a, b in zip(out, out[1:])):
            raise ProtocolError(f"{what}: module numbers must be strictly ascending")
        return out

    @staticmethod
    def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        """A, B, A, B, ... flattened into one float32 vector (the wire layout)."""
        if not tensors:
            return torch.empty(0)
        return torch.cat([t.detach().reshape(-1).float() for t in tensors])

    def unpack(self, flat: torch.Tensor, modules: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Views (A (r, in), B (out, r)) of each module into `flat`, whose length total_numel(modules) gives."""
        out, pos = [], 0
        for m in modules:
            fin, fout = self.shapes[m % self.per_layer]
            a = flat[pos: pos + self.rank * fin].view(self.rank, fin)
            pos += self.rank * fin
            b = flat[pos: pos + fout * self.rank].view(fout, self.rank)
            pos += fout * self.rank
            out.append((a, b))
        return out
