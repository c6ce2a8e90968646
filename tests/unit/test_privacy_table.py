"""bench/privacy_table.py's bookkeeping and bench/privacy_results.py's table, on synthetic part files: which
parts still run (resumability), the worst case in bold, the paired interval against no defence. The parts
themselves are `dlora attack` (tests/integration/test_attack.py) and a split training run scored like
docs/results.md's cells (tests/system/test_paper_tables.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import privacy_results  # noqa: E402
import privacy_table  # noqa: E402
from privacy_table import FORMAT, Setting, part_file, todo  # noqa: E402

NONE, EDGE, NOISE = Setting("none"), Setting("edge-1", {"edge_layers": 1}, "none"), Setting("noise", {"privacy_noise": 1})


def _attack(step_begin: float, labels: float) -> dict:
    return {"tensors": {"step_begin": {"nearest": step_begin, "ridge": 0.5, "mlp": None},
                        "lora_x.3.0": {"nearest": 0.0, "ridge": 0.2, "mlp": 0.25}},
            "averaged": {"groups": 4, "nearest": step_begin, "ridge": 0.1, "labels": labels},
            "labels": {"rows": 10, "labels": labels}, "adapter": {"recovery": 0.9},
            "cost": {"bytes_per_step": 2e8, "step_s": 10.0, "device_bytes": 2**20 * 110}}


def _write(cells: Path, s: Setting, part: str, record: dict) -> None:
    path = part_file(cells, s, part)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"format": FORMAT, "setting": s.name, "part": part, **record}))


def test_todo_skips_finished_parts_and_the_accuracy_of_the_same_maths(tmp_path: Path) -> None:
    cells = tmp_path / "cells"
    _write(cells, NONE, "attack", _attack(1.0, 1.0))
    pending = [(s.name, p) for s, p in todo(cells, [NONE, EDGE, NOISE], ("attack", "arc_easy"))]
    # none/attack is done; edge-1 trains the same maths as none, so it has no accuracy part of its own
    assert pending == [("edge-1", "attack"), ("noise", "attack"), ("none", "arc_easy"), ("noise", "arc_easy")]
    part_file(cells, NOISE, "attack").parent.mkdir(parents=True)
    part_file(cells, NOISE, "attack").write_text('{"format": 1, "setting": "noi')  # a torn write is not done
    assert ("noise", "attack") in [(s.name, p) for s, p in todo(cells, [NOISE], ("attack",))]


def test_the_table_bolds_the_worst_case_and_gives_the_paired_interval(tmp_path: Path) -> None:
    """Accuracy: none answers items 0-9 right and 10-19 wrong; noise answers 0-7 right. Paired differences: 2 of
    20 items at -1, mean -10 points, sd sqrt(0.1 - 0.01) = 0.3, half width 1.96 * 0.3 / sqrt(20) = 13.1 points."""
    cells = tmp_path / "cells"
    answers = [0] * 20
    _write(cells, NONE, "attack", _attack(1.0, 1.0))
    _write(cells, NOISE, "attack", _attack(0.02, 0.3))
    _write(cells, NONE, "arc_easy", {"accuracy": 0.5, "answers": answers, "predictions": [0] * 10 + [1] * 10})
    _write(cells, NOISE, "arc_easy", {"accuracy": 0.4, "answers": answers, "predictions": [0] * 8 + [1] * 12})
    text = privacy_results.render(cells, [NONE, EDGE, NOISE], "cmd")
    row = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| `")}
    assert "**100.0% n**" in row["`none`"]
    # the ridge probe's 50% on StepBegin beats the nearest row's 2% there and the labels' 30%
    assert "**50.0% r**" in row["`noise`"] and "| 30.0% / 30.0% |" in row["`noise`"]
    assert "0.400 (-10.0 [-23.1, +3.1])" in row["`noise`"]
    assert "same as none" in row["`edge-1`"]


def test_every_setting_name_is_unique_and_its_flags_are_train_flags() -> None:
    from common.config import TrainConfig

    names = [s.name for s in privacy_table.SETTINGS]
    assert len(names) == len(set(names))
    for s in privacy_table.SETTINGS:
        assert set(s.flags) <= set(TrainConfig.model_fields), s.name


def test_the_doc_names_the_command_that_fills_the_whole_table() -> None:
    """Not the last invocation's selection: a run of some parts, or a dry run, renders the same command line."""
    base = ".venv/bin/python bench/privacy_table.py"
    assert privacy_table.fill_command([]) == base
    assert privacy_table.fill_command(["--settings", "none,edge-1", "--parts=attack", "--dry-run"]) == base
    assert privacy_table.fill_command(["--max-hours", "2", "--cells", "c d", "--render-only"]) == base + " --cells 'c d'"
