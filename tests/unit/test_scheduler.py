"""Kill-and-Revive scheduler: the rules of DESIGN.md "Kill and Revive (precise)", table by table.

Exact comparisons throughout, on any CPU: the scheduler is pure Python on the floats it is given
(comparisons and sorting of doubles; its only arithmetic, Early-Kill's tau x fsum(deltas) / n, is
correctly rounded IEEE 754 double on every CPU Python runs on), and a float's JSON text (Python's
shortest repr) parses back to the same double.
"""

from __future__ import annotations

import copy
import json
import math
import random

import pytest

from common.scheduler import (
    Decision,
    KRConfig,
    KRState,
    SchedulerConfigError,
    SchedulerInputError,
    decide,
    initial_state,
)


def run(cfg: KRConfig, table: list[list[float]]) -> list[Decision]:
    """Feed one epoch per row of `table` (Δ of every module); only the active ones are reported."""
    state, out = initial_state(cfg), []
    for row in table:
        state, d = decide(cfg, state, {i: row[i] for i in state.active})
        out.append(d)
    return out


def actives(decisions: list[Decision]) -> list[list[int]]:
    return [list(d.next_active) for d in decisions]


# ---- config and input validation -------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, flag",
    [
        ({"num_layers": 0}, "num_layers"),
        ({"num_layers": 4, "budget": 0}, "--budget"),
        ({"num_layers": 4, "budget": -2}, "--budget"),
        ({"num_layers": 4, "revive": -1}, "--revive"),
        ({"num_layers": 4, "warmup_epochs": -1}, "--warmup-epochs"),
        ({"num_layers": 4, "kill_threshold": 0.0}, "--kill-threshold"),
        ({"num_layers": 4, "kill_threshold": -0.5}, "--kill-threshold"),
        ({"num_layers": 4, "kill_threshold": math.nan}, "--kill-threshold"),
        ({"num_layers": 4, "budget": True}, "--budget"),
    ],
)
def test_config_errors_name_the_flag(kwargs: dict, flag: str) -> None:
    with pytest.raises(SchedulerConfigError) as info:
        KRConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert flag in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "state, deltas, words",
    [
        (KRState(0, (0, 1, 2), {}), {0: 1.0, 1: 1.0}, "missing [2]"),
        (KRState(0, (0, 1, 2), {}), {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0}, "unexpected [3]"),
        (KRState(1, (1, 2), {}), {0: 1.0, 1: 1.0, 2: 1.0}, "unexpected [0]"),
        (KRState(0, (0, 1), {}), {0: -0.1, 1: 1.0}, ">= 0"),
        (KRState(0, (0, 1), {}), {0: math.nan, 1: 1.0}, "finite"),
        (KRState(0, (0, 1), {}), {0: math.inf, 1: 1.0}, "finite"),
        (KRState(0, (0, 1), {}), {0: "1.0", 1: 1.0}, "finite"),
        (KRState(0, (0, 1), {}), {"0": 1.0, 1: 1.0}, "module index"),
        (KRState(0, (0, 9), {}), {0: 1.0, 9: 1.0}, "0..3"),
        (KRState(0, (1, 0), {}), {0: 1.0, 1: 1.0}, "sorted"),
        (KRState(0, (), {}), {}, "sorted"),
        (KRState(-1, (0, 1), {}), {0: 1.0, 1: 1.0}, "epochs_done"),
    ],
)
def test_bad_reports_and_states_are_rejected(state: KRState, deltas: dict, words: str) -> None:
    with pytest.raises(SchedulerInputError) as info:
        decide(KRConfig(num_layers=4), state, deltas)
    assert isinstance(info.value, ValueError)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_decide_changes_neither_state_nor_report() -> None:
    cfg = KRConfig(num_layers=4, budget=2, revive=1)
    state = KRState(1, (0, 3), {0: 0.5, 1: 0.2, 2: 0.1, 3: 0.9})
    report = {0: 0.4, 3: 0.8}
    before = (copy.deepcopy(state), dict(report))
    decide(cfg, state, report)
    assert (state, report) == before


# ---- warm-up, selection, swap, ties ----------------------------------------------------------

ROWS = [[0.1, 0.4, 0.3, 0.2]] * 4  # module 1 > 2 > 3 > 0 every epoch


@pytest.mark.parametrize(
    "warmup, expected",
    [
        (0, [[1, 2], [1, 2], [1, 2], [1, 2]]),  # warm-up 0: the first report selects, like warm-up 1
        (1, [[1, 2], [1, 2], [1, 2], [1, 2]]),
        (2, [[0, 1, 2, 3], [1, 2], [1, 2], [1, 2]]),
        (3, [[0, 1, 2, 3], [0, 1, 2, 3], [1, 2], [1, 2]]),
    ],
)
def test_warmup_keeps_everything_until_the_selection_epoch(warmup: int, expected: list[list[int]]) -> None:
    decisions = run(KRConfig(num_layers=4, warmup_epochs=warmup, budget=2), ROWS)
    assert actives(decisions) == expected
    assert [list(d.active) for d in decisions] == [[0, 1, 2, 3]] + expected[:-1]
    assert [d.epoch for d in decisions] == [1, 2, 3, 4]


@pytest.mark.parametrize(
    "num_layers, budget, row, kept",
    [
        (4, 2, [0.1, 0.4, 0.3, 0.2], [1, 2]),
        (4, 1, [0.1, 0.4, 0.3, 0.2], [1]),
        (4, 3, [0.1, 0.4, 0.3, 0.2], [1, 2, 3]),
        (5, 2, [9.0, 0.0, 0.0, 0.0, 8.0], [0, 4]),
        (4, 2, [0.5, 0.5, 0.5, 0.5], [0, 1]),  # tie: lower index kept
        (4, 2, [0.1, 0.5, 0.5, 0.5], [1, 2]),  # tie among the best three
        (4, 2, [0.9, 0.2, 0.2, 0.0], [0, 1]),  # tie for the last seat
        (3, 2, [0.0, 0.0, 0.0], [0, 1]),  # all zero
    ],
)
def test_selection_keeps_the_budget_largest(
    num_layers: int, budget: int, row: list[float], kept: list[int]
) -> None:
    (d,) = run(KRConfig(num_layers=num_layers, budget=budget, revive=1), [row])
    assert list(d.next_active) == kept
    assert list(d.killed) == sorted(set(range(num_layers)) - set(kept))
    assert d.revived == ()


@pytest.mark.parametrize(
    "revive, active, last, report, killed, revived",
    [
        # kill the smallest active Δ, revive the killed module with the largest last Δ
        (1, (0, 1), {0: 0.9, 1: 0.8, 2: 0.3, 3: 0.5}, {0: 0.2, 1: 0.6}, [0], [3]),
        (2, (0, 1), {0: 0.9, 1: 0.8, 2: 0.3, 3: 0.5}, {0: 0.2, 1: 0.6}, [0, 1], [2, 3]),
        (1, (1, 3), {0: 0.4, 1: 0.8, 2: 0.1, 3: 0.5}, {1: 0.7, 3: 0.9}, [1], [0]),
        # ties: the lower index is killed first, and revived first
        (1, (0, 1), {0: 0.9, 1: 0.8, 2: 0.3, 3: 0.3}, {0: 0.5, 1: 0.5}, [0], [2]),
        (1, (2, 3), {0: 0.3, 1: 0.3, 2: 0.8, 3: 0.8}, {2: 0.4, 3: 0.4}, [2], [0]),
        # revive more than there are killed modules: swap only as many as there are
        (3, (0, 1, 2), {0: 0.9, 1: 0.8, 2: 0.7, 3: 0.5}, {0: 0.1, 1: 0.3, 2: 0.2}, [0], [3]),
        (9, (0, 1), {0: 0.9, 1: 0.8, 2: 0.3, 3: 0.5}, {0: 0.2, 1: 0.6}, [0, 1], [2, 3]),
        # a killed module that was never measured counts as -inf
        (1, (0, 1), {0: 0.9, 1: 0.8, 3: 0.0}, {0: 0.2, 1: 0.6}, [0], [3]),
        (2, (0, 1), {0: 0.9, 1: 0.8, 3: 0.0}, {0: 0.2, 1: 0.6}, [0, 1], [2, 3]),
        # revive 0: nothing moves
        (0, (0, 1), {0: 0.9, 1: 0.8, 2: 0.3, 3: 5.0}, {0: 0.2, 1: 0.6}, [], []),
    ],
)
def test_swap_after_selection(
    revive: int, active: tuple, last: dict, report: dict, killed: list[int], revived: list[int]
) -> None:
    cfg = KRConfig(num_layers=4, budget=len(active), revive=revive)
    state, d = decide(cfg, KRState(1, active, last), report)
    assert (list(d.killed), list(d.revived)) == (killed, revived)
    assert set(d.next_active) == (set(active) - set(killed)) | set(revived)
    assert len(d.next_active) == len(active)
    assert state.last_delta == {**last, **report}  # updated for every reported module
    assert state.epochs_done == 2 and state.active == d.next_active


@pytest.mark.parametrize("budget", [4, 5, 100, None])
@pytest.mark.parametrize("revive", [0, 1, 3])
def test_budget_at_least_layers_never_kills(budget: int | None, revive: int) -> None:
    rng = random.Random(budget or 0)
    rows = [[rng.random() for _ in range(4)] for _ in range(5)]
    for d in run(KRConfig(num_layers=4, budget=budget, revive=revive), rows):
        assert (d.killed, d.revived, d.next_active) == ((), (), (0, 1, 2, 3))


@pytest.mark.parametrize("seed", range(5))
def test_revive_zero_fixes_the_active_set_after_warmup(seed: int) -> None:
    rng = random.Random(seed)
    rows = [[rng.random() for _ in range(8)] for _ in range(6)]
    decisions = run(KRConfig(num_layers=8, warmup_epochs=2, budget=3, revive=0), rows)
    chosen = sorted(sorted(range(8), key=lambda i: -rows[1][i])[:3])
    assert actives(decisions) == [list(range(8))] + [chosen] * 5
    assert all(d.killed == d.revived == () for d in decisions[2:])


# ---- Early-Kill threshold mode ---------------------------------------------------------------


@pytest.mark.parametrize(
    "tau, budget, revive, active, last, report, expected",
    [
        # selection point (epoch 1): mean 0.25, cut 0.25 -> 2 and 3 stay; count may fall below budget
        (1.0, 3, 1, (0, 1, 2, 3), {}, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, [2, 3]),
        # small τ: everyone passes, then the budget cap keeps the largest
        (0.1, 2, 0, (0, 1, 2, 3), {}, {0: 0.1, 1: 0.2, 2: 0.3, 3: 0.4}, [2, 3]),
        # exactly at the cut is not below it
        (1.0, 4, 0, (0, 1, 2, 3), {}, {0: 0.25, 1: 0.25, 2: 0.25, 3: 0.25}, [0, 1, 2, 3]),
        # everybody below the cut: keep the single largest (tie -> lower index)
        (2.0, 4, 0, (0, 1, 2, 3), {}, {0: 0.5, 1: 0.5, 2: 0.5, 3: 0.5}, [0]),
        (5.0, 4, 0, (0, 1, 2, 3), {}, {0: 0.1, 1: 0.2, 2: 0.9, 3: 0.2}, [2]),
    ],
)
def test_threshold_at_selection(
    tau: float, budget: int, revive: int, active: tuple, last: dict, report: dict, expected: list[int]
) -> None:
    cfg = KRConfig(num_layers=4, budget=budget, revive=revive, kill_threshold=tau)
    _, d = decide(cfg, KRState(0, active, last), report)
    assert list(d.next_active) == expected and d.revived == ()


@pytest.mark.parametrize(
    "revive, budget, active, last, report, expected, revived",
    [
        # 1 falls below the cut (mean 0.5); one refill from the killed, largest last Δ (3)
        (1, 2, (0, 1), {2: 0.1, 3: 0.4}, {0: 0.9, 1: 0.1}, [0, 3], [3]),
        # revive 0: the count drops below the budget and stays
        (0, 2, (0, 1), {2: 0.1, 3: 0.4}, {0: 0.9, 1: 0.1}, [0], []),
        # refill only up to the budget, even when revive is larger
        (3, 2, (0, 1), {2: 0.1, 3: 0.4}, {0: 0.9, 1: 0.1}, [0, 3], [3]),
        (3, 3, (0, 1), {2: 0.1, 3: 0.4}, {0: 0.9, 1: 0.1}, [0, 2, 3], [2, 3]),
        # nobody below the cut and the set is full: nothing changes (no swap of the smallest)
        (1, 2, (0, 1), {2: 0.1, 3: 9.0}, {0: 0.5, 1: 0.5}, [0, 1], []),
        # refill ties: the lower index first
        (1, 2, (0, 1), {2: 0.4, 3: 0.4}, {0: 0.9, 1: 0.1}, [0, 2], [2]),
    ],
)
def test_threshold_after_selection(
    revive: int, budget: int, active: tuple, last: dict, report: dict, expected: list[int], revived: list[int]
) -> None:
    cfg = KRConfig(num_layers=4, budget=budget, revive=revive, kill_threshold=1.0)
    _, d = decide(cfg, KRState(2, active, last), report)
    assert (list(d.next_active), list(d.revived)) == (expected, revived)


# ---- the 6-layer example ---------------------------------------------------------------------


def reference(active: list[int], last: dict[int, float], report: dict[int, float], epoch: int) -> set[int]:
    """The rule, written out again for budget=2, revive=1, warm-up 1, L=6 (one swap per epoch)."""
    if epoch == 1:
        first = max(active, key=lambda i: (report[i], -i))
        second = max((i for i in active if i != first), key=lambda i: (report[i], -i))
        return {first, second}
    worst = min(active, key=lambda i: (report[i], i))
    best_idle = max((i for i in range(6) if i not in active), key=lambda i: (last[i], -i))
    return (set(active) - {worst}) | {best_idle}


def test_six_layers_budget_2_revive_1_four_epochs() -> None:
    # the two kept after warm-up slow down, so the runner-up from epoch 1 comes back
    rows = [
        [0.9, 0.1, 0.8, 0.7, 0.2, 0.3],
        [0.2, 0.0, 0.6, 0.0, 0.0, 0.0],
        [0.0, 0.0, 0.1, 0.5, 0.0, 0.0],
        [0.0, 0.0, 0.0, 0.4, 0.0, 0.1],
    ]
    cfg = KRConfig(num_layers=6, warmup_epochs=1, budget=2, revive=1)
    state, last, decisions = initial_state(cfg), dict[int, float](), list[Decision]()
    for epoch, row in enumerate(rows, start=1):
        report = {i: row[i] for i in state.active}
        expected = reference(list(state.active), {**last, **report}, report, epoch)
        last = {**last, **report}
        state, d = decide(cfg, state, report)
        assert set(d.next_active) == expected, epoch
        decisions.append(d)
    assert [len(d.active) for d in decisions] == [6, 2, 2, 2]
    assert actives(decisions) == [[0, 2], [2, 3], [3, 5], [0, 3]]  # epoch 4: 0 and 4 tie at 0.2, 0 wins
    assert [list(d.revived) for d in decisions] == [[], [3], [5], [0]]
    assert [list(d.killed) for d in decisions] == [[1, 3, 4, 5], [0], [2], [5]]


# ---- JSON ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "state",
    [
        KRState(0, (0, 1, 2), {}),
        KRState(3, (1, 4), {0: 0.1, 1: 1 / 3, 4: 1e-300, 2: 0.0, 3: 123456.789}),
        KRState(12, (0,), {10: 2.5, 0: 7.0}),
    ],
)
def test_state_json_round_trip(state: KRState) -> None:
    text = state.to_json()
    back = KRState.from_json(text)
    assert back == state and all(type(k) is int for k in back.last_delta)
    assert back.to_json() == text


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"epochs_done": 0, "active": [0]}',
        '{"epochs_done": 1.5, "active": [0], "last_delta": {}}',
        '{"epochs_done": 0, "active": ["0"], "last_delta": {}}',
        '{"epochs_done": 0, "active": [0], "last_delta": {"x": 1.0}}',
        '{"epochs_done": 0, "active": [0], "last_delta": {"0": NaN}}',
    ],
)
def test_bad_state_json_is_rejected(text: str) -> None:
    with pytest.raises(SchedulerInputError):
        KRState.from_json(text)


def test_decision_json_is_a_log_line() -> None:
    (d,) = run(KRConfig(num_layers=3, budget=1), [[0.1, 0.3, 0.2]])
    line = d.to_json()
    assert json.loads(json.dumps(line)) == line  # JSON-ready as it is: string keys, lists
    assert line == {
        "epoch": 1,
        "active": [0, 1, 2],
        "deltas": {"0": 0.1, "1": 0.3, "2": 0.2},
        "killed": [0, 2],
        "revived": [],
        "next_active": [1],
    }


# ---- invariants over random runs -------------------------------------------------------------


def random_run(rng: random.Random, threshold: bool) -> tuple[KRConfig, list[Decision]]:
    L = rng.randint(1, 12)
    cfg = KRConfig(
        num_layers=L,
        warmup_epochs=rng.randint(0, 3),
        budget=rng.choice([None, rng.randint(1, L + 2)]),
        revive=rng.randint(0, L),
        kill_threshold=rng.choice([0.3, 0.8, 1.0, 1.5]) if threshold else None,
    )
    values = [0.0, 0.5, 1.0] if rng.random() < 0.3 else None  # often ties
    rows = [
        [rng.choice(values) if values else rng.random() for _ in range(L)] for _ in range(rng.randint(1, 8))
    ]
    return cfg, run(cfg, rows)


@pytest.mark.parametrize("threshold", [False, True])
def test_invariants_over_random_runs(threshold: bool) -> None:
    rng = random.Random(1234 + threshold)
    for _ in range(300):
        cfg, decisions = random_run(rng, threshold)
        L = cfg.num_layers
        cap = L if cfg.budget is None else min(cfg.budget, L)
        for d in decisions:
            before, after = set(d.active), set(d.next_active)
            assert set(d.killed) <= before and not set(d.revived) & before
            assert after == (before - set(d.killed)) | set(d.revived)
            assert list(d.next_active) == sorted(after) and after <= set(range(L))
            assert set(d.deltas) == before
            if d.epoch < max(cfg.warmup_epochs, 1):
                assert after == set(range(L))
            elif threshold:
                assert 1 <= len(after) <= cap
            else:
                assert len(after) == cap
                if d.epoch > max(cfg.warmup_epochs, 1):
                    assert len(d.killed) == len(d.revived) <= cfg.revive
