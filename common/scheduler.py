"""Kill-and-Revive: which PEFT modules train in the next epoch (DESIGN.md, "Kill and Revive (precise)").

A pure policy: `decide(config, state, deltas)` maps the update norms Δ_i reported at the end of an
epoch to the next active set, with no I/O. The caller stores `KRState` (`to_json`) and logs each
`Decision` (`to_json`, one line of kr_log.jsonl). A module is one decoder layer's LoRA tensors.

Rules, with e the 1-based epoch just finished, L layers and B = min(budget, L):
- e < warm-up epochs: every module stays active.
- Selection point, e == max(warm-up, 1) (epoch 1 always trains every module, so with warm-up 0 the
  first report is the selection point too): the B modules with the largest Δ stay, the rest are killed.
- Every later epoch: the `revive` active modules with the smallest Δ are killed and the `revive`
  killed modules with the largest Δ from the last epoch they were active are revived (a module never
  measured counts as -inf). Fewer are swapped when fewer are killed. The active count stays B.
- Ties: at equal Δ the lower layer index is chosen first, whatever is being chosen (kept, killed,
  revived).
- Early-Kill threshold mode (`kill_threshold` = τ), at the selection point and every later epoch
  (no swap of the smallest then): an active module with Δ < τ·mean(Δ over the modules active in that
  epoch) is killed; of the rest at most B stay (largest Δ first); then up to `revive` modules killed
  before this epoch (largest last Δ first) are revived, but only to refill up to B.
  IN THIS MODE THE ACTIVE COUNT MAY FALL BELOW THE BUDGET, and with revive = 0 it never climbs back.
  The active set is never empty: if every module falls below the threshold, the largest Δ stays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from common.errors import ConfigError, ProtocolError


class SchedulerConfigError(ConfigError):
    """A Kill-and-Revive setting is out of range; the message names its flag."""


class SchedulerInputError(ProtocolError):
    """A report or a stored state does not fit the scheduler's state or config."""


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


@dataclass(frozen=True)
class KRConfig:
    """Kill-and-Revive settings of one session.

    Raises:
        SchedulerConfigError: on construction, for a value out of range.
    """

    num_layers: int  # L: one PEFT module per decoder layer
    warmup_epochs: int = 1  # epochs with every module active
    budget: int | None = None  # active modules after warm-up; None = all (= L); above L means L
    revive: int = 0  # modules swapped per later epoch; 0 = the active set is fixed after warm-up
    kill_threshold: float | None = None  # Early-Kill τ: kill active modules with Δ < τ·mean(Δ)

    def __post_init__(self) -> None:
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise SchedulerConfigError(f"num_layers must be an integer >= 1, got {self.num_layers!r}")
        if self.budget is not None and (not _is_int(self.budget) or self.budget < 1):
            raise SchedulerConfigError(f"--budget must be an integer >= 1 (unset = all), got {self.budget!r}")
        if not _is_int(self.revive) or self.revive < 0:
            raise SchedulerConfigError(f"--revive must be an integer >= 0, got {self.revive!r}")
        if not _is_int(self.warmup_epochs) or self.warmup_epochs < 0:
            raise SchedulerConfigError(f"--warmup-epochs must be an integer >= 0, got {self.warmup_epochs!r}")
        tau = self.kill_threshold
        if tau is not None and (not _is_number(tau) or tau <= 0):
            raise SchedulerConfigError(f"--kill-threshold must be finite and > 0 (or unset), got {tau!r}")

    @property
    def cap(self) -> int:
        """B = min(budget, L): the active count after warm-up (an upper bound in threshold mode)."""
        return self.num_layers if self.budget is None else min(self.budget, self.num_layers)

    @property
    def selection_epoch(self) -> int:
        """The epoch whose report first selects the budget (warm-up 0 behaves as warm-up 1)."""
        return max(self.warmup_epochs, 1)


@dataclass(frozen=True)
class KRState:
    """What the scheduler remembers between epochs."""

    epochs_done: int  # epochs reported so far
    active: tuple[int, ...]  # modules active in the NEXT epoch, sorted
    last_delta: dict[int, float] = field(default_factory=dict)  # Δ of the last epoch each was active

    def to_json(self) -> str:
        """One JSON object; `from_json` gives back an equal state."""
        last = {str(i): d for i, d in sorted(self.last_delta.items())}
        return json.dumps({"epochs_done": self.epochs_done, "active": list(self.active), "last_delta": last})

    @classmethod
    def from_json(cls, s: str) -> KRState:
        """The state `to_json` wrote (module keys back to int).

        Raises:
            SchedulerInputError: `s` is not such a state.
        """
        try:
            d = json.loads(s)
            ok = isinstance(d, dict) and set(d) == {"epochs_done", "active", "last_delta"}
            ok = ok and _is_int(d["epochs_done"]) and isinstance(d["active"], list)
            ok = ok and all(_is_int(i) for i in d["active"]) and isinstance(d["last_delta"], dict)
            ok = ok and all(_is_number(v) for v in d["last_delta"].values())
            if not ok:
                raise ValueError("wrong keys or types")
            last = {int(k): float(v) for k, v in d["last_delta"].items()}
        except (ValueError, TypeError) as e:  # JSONDecodeError and int("x") are ValueErrors
            raise SchedulerInputError(f"not a stored Kill-and-Revive state: {e}") from e
        return cls(epochs_done=d["epochs_done"], active=tuple(d["active"]), last_delta=last)


@dataclass(frozen=True)
class Decision:
    """What happened at the end of one epoch, and what trains next."""

    epoch: int  # 1-based epoch just finished
    active: tuple[int, ...]  # modules that trained in it
    deltas: dict[int, float]  # the report: Δ per module in `active`
    killed: tuple[int, ...]  # active in `epoch`, not active next
    revived: tuple[int, ...]  # not active in `epoch`, active next
    next_active: tuple[int, ...]

    def to_json(self) -> dict[str, object]:
        """A JSON-ready dict (module keys of `deltas` as strings), one line of kr_log.jsonl."""
        return {
            "epoch": self.epoch,
            "active": list(self.active),
            "deltas": {str(i): d for i, d in sorted(self.deltas.items())},
            "killed": list(self.killed),
            "revived": list(self.revived),
            "next_active": list(self.next_active),
        }


def initial_state(cfg: KRConfig) -> KRState:
    """Epoch 0: every module active, nothing measured."""
    return KRState(epochs_done=0, active=tuple(range(cfg.num_layers)), last_delta={})


def _best_first(modules: Iterable[int], delta: Mapping[int, float]) -> list[int]:
    """Largest Δ first, lower index first at equal Δ; unmeasured modules last."""
    return sorted(modules, key=lambda i: (-delta.get(i, -math.inf), i))


def _check(cfg: KRConfig, state: KRState, deltas: Mapping[int, float]) -> dict[int, float]:
    """The report as floats, sorted by module.

    Raises:
        SchedulerInputError: the state does not fit `cfg`, or the report does not fit the state.
    """
    act = state.active
    if not _is_int(state.epochs_done) or state.epochs_done < 0:
        raise SchedulerInputError(f"state.epochs_done must be an integer >= 0, got {state.epochs_done!r}")
    in_range = all(_is_int(i) and 0 <= i < cfg.num_layers for i in (*act, *state.last_delta))
    if not act or not in_range or list(act) != sorted(set(act)):
        raise SchedulerInputError(f"state modules must be sorted, unique, in 0..{cfg.num_layers - 1}: {act}")
    if not isinstance(deltas, Mapping) or not all(_is_int(i) for i in deltas):
        raise SchedulerInputError(f"the report must map module index (int) -> delta, got {deltas!r}")
    missing, extra = sorted(set(act) - set(deltas)), sorted(set(deltas) - set(act))
    if missing or extra:
        raise SchedulerInputError(
            f"epoch {state.epochs_done + 1} report must hold exactly the active modules: "
            f"missing {missing}, unexpected {extra}"
        )
    bad = {i: d for i, d in deltas.items() if not _is_number(d) or d < 0}
    if bad:
        raise SchedulerInputError(f"deltas must be finite numbers >= 0, got {bad}")
    return {i: float(deltas[i]) for i in act}


def decide(cfg: KRConfig, state: KRState, deltas: Mapping[int, float]) -> tuple[KRState, Decision]:
    """Apply one end-of-epoch report: the next state and the logged decision. Inputs are not changed.

    Args:
        cfg: the session's settings.
        state: the state before the report (`state.active` trained in the epoch just finished).
        deltas: Δ_i for exactly the modules in `state.active`.

    Raises:
        SchedulerInputError: the report or the state does not fit (see `_check`).
    """
    report = _check(cfg, state, deltas)
    last = {**state.last_delta, **report}
    epoch, active, cap = state.epochs_done + 1, set(state.active), cfg.cap
    idle = _best_first(set(range(cfg.num_layers)) - active, last)  # killed before this epoch
    if epoch < cfg.selection_epoch:
        nxt = set(range(cfg.num_layers))
    elif cfg.kill_threshold is not None:
        cut = cfg.kill_threshold * math.fsum(report.values()) / len(report)
        kept = _best_first([i for i in active if report[i] >= cut], report)[:cap]
        kept = kept or _best_first(active, report)[:1]
        nxt = set(kept) | set(idle[: min(cfg.revive, cap - len(kept))])
    elif epoch == cfg.selection_epoch:
        nxt = set(_best_first(active, report)[:cap])
    else:
        n = min(cfg.revive, len(idle), len(active))
        worst = sorted(active, key=lambda i: (report[i], i))[:n]
        nxt = (active - set(worst)) | set(idle[:n])
    decision = Decision(
        epoch=epoch,
        active=state.active,
        deltas=report,
        killed=tuple(sorted(active - nxt)),
        revived=tuple(sorted(nxt - active)),
        next_active=tuple(sorted(nxt)),
    )
    return KRState(epochs_done=epoch, active=decision.next_active, last_delta=last), decision
