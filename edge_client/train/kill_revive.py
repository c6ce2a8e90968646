"""Kill-and-Revive on the device: measuring each module's change, and applying a decision.

A module is all LoRA tensors of one decoder layer. The device measures, for every module trained
in an epoch, Δ = ‖θ(end) − θ(start)‖₂ over all its tensors, reports it, and applies the next
active set before the next epoch's first step. What a killed module costs depends on --kill-mode
(DESIGN.md): `frozen` keeps its delta and its low-rank gradient path, `detached` keeps only the
delta, `dropped` removes it from the forward pass and from the wire.
"""

from __future__ import annotations

import torch

from common.config import KillMode, TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import Decision, KRConfig, SchedulerInputError, decide, initial_state


def layer_roles(active: set[int] | frozenset[int], num_layers: int, mode: KillMode) -> list[int]:
    """What each layer's LoRA group does in a training step, given the active modules.

    Active layers take part in forward and backward. A killed layer: `frozen` -> backward too when it
    lies above the lowest active layer (its dL/dx is needed below), else forward only; `detached` ->
    forward only; `dropped` -> absent.
    """
    lowest = min(active) if active else num_layers
    roles = []
    for layer in range(num_layers):
        if layer in active:
            roles.append(pb.FORWARD_BACKWARD)
        elif mode == "frozen":
            roles.append(pb.FORWARD_BACKWARD if layer > lowest else pb.FORWARD)
        elif mode == "detached":
            roles.append(pb.FORWARD)
        else:
            roles.append(pb.ABSENT)
    return roles


class DeltaMeter:
    """Snapshots of the active modules at an epoch's start; their L2 change at its end."""

    def __init__(self, params_by_layer: dict[int, list[torch.nn.Parameter]]) -> None:
        self.params_by_layer = params_by_layer
        self._start: dict[int, list[torch.Tensor]] = {}

    def start(self, active: set[int] | frozenset[int]) -> None:
        self._start = {layer: [p.detach().clone() for p in self.params_by_layer[layer]] for layer in sorted(active)}

    def deltas(self) -> dict[int, float]:
        out = {}
        for layer, before in self._start.items():
            sq = sum(float((p.detach() - b).pow(2).sum()) for p, b in zip(self.params_by_layer[layer], before))
            out[layer] = sq**0.5
        return out


def kr_config(cfg: TrainConfig, num_layers: int) -> KRConfig:
    """The scheduler settings of a training run.

    Raises:
        SchedulerConfigError: a setting is out of range (the message names the flag).
    """
    return KRConfig(num_layers=num_layers, warmup_epochs=cfg.warmup_epochs, budget=cfg.budget,
                    revive=cfg.revive, kill_threshold=cfg.kill_threshold)


class LocalScheduler:
    """The cloud's policy run in this process (local-train), with the same state and decisions."""

    def __init__(self, cfg: KRConfig) -> None:
        self.cfg, self.state = cfg, initial_state(cfg)

    def decide(self, epoch: int, deltas: dict[int, float]) -> Decision:
        if epoch != self.state.epochs_done + 1:
            raise SchedulerInputError(f"epoch {epoch} reported after epoch {self.state.epochs_done}")
        self.state, decision = decide(self.cfg, self.state, deltas)
        return decision
