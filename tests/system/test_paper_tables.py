"""bench/paper_tables.py, the resumable grid behind docs/results.md, on tiny models and synthetic tasks.

A tiny grid runs every kind of cell (zero-shot, split float32, split int8 with Kill-and-Revive,
local-train dropped), writes one file per cell and renders the tables; a second run trains nothing;
a run that dies mid-grid (an exception, a half-written file, SIGKILL of the whole command) is picked
up at the cell it was in. Byte counts are integers, compared exactly: a split cell's measured
payloads equal the DESIGN.md formula the cell records. The real grid needs the real model and
data and hours of CPU: `test_real_model_cell` (slow) runs two small cells of it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

import paper_grid  # noqa: E402
import paper_results  # noqa: E402
import paper_tables  # noqa: E402
from paper_grid import CONFIGS, Cell, Config, GridError, Settings, grid  # noqa: E402

SETTINGS = Settings(epochs=2, revive=1, batch_size=4, train_items=8, test_items=5, max_length=64)
TINY = (
    Config("zero-shot", "zero-shot", "none"),
    Config("all", "all modules", "split", seeds=(0, 1)),
    Config("kr1-detached-int8", "KR 1/3 detached, int8", "split", 1, "detached", wire="int8"),
    Config("kr1-dropped", "KR 1/3 dropped", "local", 1, "dropped"),
)


def write_task(root: Path, name: str, offset: int) -> Path:
    """A multiple-choice task as `dlora prepare` writes it: train.jsonl (prompt, completion), test.jsonl."""
    folder = root / name
    folder.mkdir(parents=True)
    words = ["red", "green", "blue", "black"]
    train = [{"prompt": f"Q: colour {i + offset}?\nA:", "completion": f" {words[(i + offset) % 4]}"} for i in range(10)]
    test = [{"prompt": f"Q: colour {i + offset}?\nA:", "choices": [f" {w}" for w in words], "answer": (i + offset) % 4}
            for i in range(10, 16)]
    for file, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (folder / file).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


@pytest.fixture
def tiny_grid(tiny_dir, cloud, tmp_path):  # type: ignore[no-untyped-def]
    """A Grid over two synthetic tasks on a tiny llama, scored and split-trained by an in-process cloud."""
    model = tiny_dir("llama")
    tasks = {name: write_task(tmp_path / "tasks", name, k) for k, name in enumerate(("colours", "shades"))}
    return paper_tables.Grid(model, tasks, tmp_path / "runs", tmp_path / "cells", SETTINGS, "the command",
                             cloud=cloud(model), provenance=paper_tables.provenance())


def test_grid_runs_every_kind_of_cell_renders_and_skips_finished_cells(tiny_grid, tmp_path, monkeypatch):
    g = tiny_grid
    cells = grid(tuple(g.task_dirs), TINY)
    doc = tmp_path / "results.md"
    summary = paper_tables.run_grid(g, cells, doc, progress=False)
    assert summary == {"ran": [c.id for c in cells], "skipped": []}
    assert len(cells) == 10 and cells[-1].id == "shades/all/s1"  # second seeds last
    records = {c.id: json.loads(c.file(g.cells).read_text()) for c in cells}
    for cell in cells:
        r = records[cell.id]
        assert r["total"] == 5 and len(r["predictions"]) == len(r["answers"]) == 5
        assert r["correct"] == sum(p == a for p, a in zip(r["predictions"], r["answers"]))
        assert r["settings"] == SETTINGS.to_json() and r["commit"] and r["machine"]["cores"] >= 1 and r["date"]
        if cell.config.path == "none":
            assert r["bytes_per_epoch"] == [] and r["steps"] == 0
            continue
        assert r["train_items"] == 8 and r["steps"] == 4 and len(r["epoch_losses"]) == 2
        assert r["active_per_epoch"][0] == [0, 1, 2]
        assert len(r["active_per_epoch"][1]) == (3 if cell.config.budget is None else 1)
        if cell.config.path == "split":  # what the steps moved is the formula, to the byte
            assert r["measured_bytes_per_epoch"] == r["bytes_per_epoch"] and min(r["bytes_per_epoch"]) > 0
        else:
            assert r["measured_bytes_per_epoch"] is None and min(r["bytes_per_epoch"]) > 0
    full, int8, dropped = (records[f"colours/{n}/s0"]["bytes_per_epoch"] for n in ("all", "kr1-detached-int8",
                                                                                     "kr1-dropped"))
    assert full[0] / 4 < int8[0] < full[0] / 3  # int8 plus a scale per block, every layer in the warm-up
    assert dropped[0] == full[0] and int8[1] < int8[0] and dropped[1] < dropped[0]  # killed layers leave the wire
    assert records["colours/all/s0"]["predictions"] != [] and records["colours/all/s1"]["seed"] == 1

    text = doc.read_text()
    assert "**10 of 10 cells finished.**" in text and "| all modules | " in text and "gain over zero-shot" in text
    assert "| KR 1/3 dropped | " in text and " [" in text and "(none yet)" not in text
    assert "| colours/kr1-dropped/s0 | local |" in text
    assert "](results.png)" in text and (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    def no_training(*_: object) -> None:
        raise AssertionError("a finished cell ran again")

    monkeypatch.setattr(paper_tables, "run_cell", no_training)
    t0 = time.perf_counter()
    again = paper_tables.run_grid(g, cells, doc, progress=False)
    assert again == {"ran": [], "skipped": [c.id for c in cells]} and time.perf_counter() - t0 < 5


def test_a_run_that_dies_mid_grid_resumes_at_the_cell_it_was_in(tiny_grid, monkeypatch):
    g = tiny_grid
    configs = (TINY[0], Config("all", "all modules", "split"), TINY[3])
    cells = grid(("colours",), configs)
    real = paper_tables.run_cell

    def dies_at_the_second(g_: paper_tables.Grid, cell: Cell) -> dict:
        if cell.config.name == "all":
            raise RuntimeError("the cloud went away")
        return real(g_, cell)

    monkeypatch.setattr(paper_tables, "run_cell", dies_at_the_second)
    with pytest.raises(RuntimeError, match="the cloud went away"):
        paper_tables.run_grid(g, cells, None, progress=False)
    first = cells[0].file(g.cells)
    assert first.exists() and not cells[1].file(g.cells).exists()
    stamp = first.read_text()
    # a half-written cell (as a writer without os.replace would leave) and a temporary file of the atomic writer
    cells[2].file(g.cells).write_text(stamp[: len(stamp) // 2])
    (g.cells / "colours" / ".kr1-dropped-s0.json.x1.tmp").write_text("{")
    assert paper_grid.read_cell(cells[2].file(g.cells)) is None

    monkeypatch.setattr(paper_tables, "run_cell", real)
    summary = paper_tables.run_grid(g, cells, None, progress=False)
    assert summary == {"ran": [cells[1].id, cells[2].id], "skipped": [cells[0].id]}
    assert first.read_text() == stamp  # the finished cell was not touched
    assert set(paper_grid.load_cells(g.cells)) == {("colours", c.name, 0) for c in configs}


def test_a_cell_run_with_other_settings_is_not_taken_as_finished_nor_overwritten(tmp_path):
    cell = Cell("colours", TINY[0], 0)
    record = {"format": paper_grid.FORMAT, "accuracy": 0.5, "settings": SETTINGS.to_json(),
              "config_spec": TINY[0].spec()}
    paper_grid.write_cell(cell.file(tmp_path), record)
    assert [p.name for p in (tmp_path / "colours").iterdir()] == ["zero-shot-s0.json"]  # no temporary file left
    assert paper_grid.finished(cell, tmp_path, SETTINGS) == record
    with pytest.raises(GridError, match=r"other settings \(test_items\)"):
        paper_grid.finished(cell, tmp_path, Settings(**{**SETTINGS.__dict__, "test_items": 6}))


def test_paired_interval_on_a_hand_made_example():
    """10 items: 3 only KR got right (b), 1 only all modules got right (c), 6 both or neither: the
    difference is (b - c)/n = 0.2 and McNemar's Wald interval 0.2 ± 1.96·√(b + c - (b - c)²/n)/n."""
    diffs = [1, 1, 1, -1, 0, 0, 0, 0, 0, 0]
    mean, lo, hi = paper_results.paired_ci(diffs)
    half = paper_results.Z95 * math.sqrt(3 + 1 - 2**2 / 10) / 10
    assert mean == pytest.approx(0.2) and (lo, hi) == pytest.approx((0.2 - half, 0.2 + half))
    assert half == pytest.approx(0.371877, abs=1e-6)

    def rec(task: str, config: str, seed: int, right: list[int]) -> dict:
        return {"task": task, "config": config, "seed": seed, "answers": [0] * len(right),
                "predictions": [0 if ok else 1 for ok in right], "accuracy": sum(right) / len(right)}

    kr = Config("kr8-detached", "KR 8/30 detached", "local", 8, seeds=(0, 1))
    cells = {("t", "all", 0): rec("t", "all", 0, [0, 0, 0, 1, 1, 1, 0, 0, 0, 0]),
             ("t", "kr8-detached", 0): rec("t", "kr8-detached", 0, [1, 1, 1, 0, 1, 1, 0, 0, 0, 0])}
    assert paper_results.versus_reference(cells, "t", kr) == pytest.approx((0.2, 0.2 - half, 0.2 + half))
    # with a second seed of both, each item's correctness is averaged over the seeds first
    cells[("t", "all", 1)] = rec("t", "all", 1, [0] * 10)
    cells[("t", "kr8-detached", 1)] = rec("t", "kr8-detached", 1, [1] + [0] * 9)
    want = paper_results.paired_ci([1, 0.5, 0.5, -0.5, 0, 0, 0, 0, 0, 0])
    assert paper_results.versus_reference(cells, "t", kr) == pytest.approx(want)
    assert paper_results.accuracy_text(kr, [cells[("t", "kr8-detached", s)] for s in (0, 1)]) == "0.300 (0.100–0.500)"
    cells[("t", "all", 1)]["answers"] = [1] * 10  # other test items: nothing to pair
    assert paper_results.versus_reference(cells, "t", kr) is None


def test_the_picture_places_each_configuration_by_its_bytes_and_its_paired_difference(tmp_path):
    """Hand-made cells: KR sends 3 of all modules' 4 GB an epoch (x = 0.75) and gets 2 more items of 10
    right (Δ = +20 points, the interval of paired_ci); a configuration without a cell is not drawn."""
    import paper_figure

    def rec(config: str, right: list[int], gb: list[float]) -> dict:
        return {"task": "t", "config": config, "seed": 0, "answers": [0] * 10, "accuracy": sum(right) / 10,
                "predictions": [0 if ok else 1 for ok in right], "bytes_per_epoch": [g * 1e9 for g in gb]}

    configs = [TINY[0], Config("all", "all modules", "split"), TINY[2], TINY[3]]
    cells = {("t", "zero-shot", 0): rec("zero-shot", [1] * 3 + [0] * 7, []),
             ("t", "all", 0): rec("all", [1] * 5 + [0] * 5, [5.0, 3.0]),
             ("t", "kr1-detached-int8", 0): rec("kr1-detached-int8", [1] * 7 + [0] * 3, [4.0, 2.0])}
    [(config, share, mid, lo, hi)] = paper_figure.points_of(cells, "t", configs)
    want = paper_results.paired_ci([0] * 5 + [1, 1] + [0] * 3)
    assert config.name == "kr1-detached-int8" and share == pytest.approx(0.75)
    assert (mid, lo, hi) == pytest.approx(tuple(100 * w for w in want))
    assert paper_figure.title(cells, "t", configs) == "t: all modules 0.500\ngain over zero-shot +20.0"
    assert paper_figure.draw(cells, ["t", "u"], configs, tmp_path / "p.png") and (tmp_path / "p.png").stat().st_size
    assert not paper_figure.draw(cells, ["u"], configs, tmp_path / "q.png") and not (tmp_path / "q.png").exists()


def test_a_twin_is_shown_against_the_configuration_it_checks_not_in_the_papers_tables(tmp_path):
    """Hand-made cells: the local-train twin of a split configuration answers 9 of 10 items alike and gets
    one more right: Δ = +10 points with paired_ci's interval; it has no row in the paper's tables."""
    split = Config("kr15-detached", "KR 15/30 detached", "split", 15)
    local = Config("kr15-detached-local", "KR 15/30 detached, local-train", "local", 15, twin="kr15-detached")

    def rec(config: str, predictions: list[int], loss: float, commit: str = "c3e6f488ef15") -> dict:
        return {"task": "arc_easy", "config": config, "seed": 0, "answers": [0] * 10, "predictions": predictions,
                "accuracy": predictions.count(0) / 10, "epoch_losses": [3.0, loss], "bytes_per_epoch": [2e9, 1e9],
                "commit": commit, "changed_files": []}

    cells = {("arc_easy", "kr15-detached", 0): rec("kr15-detached", [0] * 6 + [1] * 4, 2.48213),
             ("arc_easy", "kr15-detached-local", 0): rec("kr15-detached-local", [0] * 7 + [1] * 3, 2.48207)}
    lines = paper_results.twin_table(cells, ["arc_easy", "piqa"], local)
    half = paper_results.Z95 * math.sqrt(1 - 1 / 10) / 10
    assert lines[0] == "| task | split (`dlora train`) | local-train | Δ points [95%] | same answer | final loss (split, " \
                       "local-train) | commit |"
    interval = f"[{paper_results.points(0.1 - half)}, {paper_results.points(0.1 + half)}]"
    assert lines[2:] == [f"| ARC-e | 0.600 | 0.700 | +10.0 {interval} | 9/10 | 2.48213 / 2.48207 | c3e6f488e |"]  # no piqa
    # cells of two commits are flagged: the training code may have changed between them
    cells[("arc_easy", "kr15-detached-local", 0)].update(commit="ef0ce21c0ab", changed_files=["bench/paper_grid.py"])
    assert paper_results.twin_table(cells, ["arc_easy"], local)[2].endswith("| c3e6f488e / ef0ce21c0+ (two commits) |")
    tasks, configs = paper_results.columns([Cell("arc_easy", c, 0) for c in (split, local)])
    assert configs == [split]  # the paper's tables and the picture leave the twin out


def test_the_grid_is_the_issues():
    by = {c.name: c for c in CONFIGS}
    assert list(by) == ["zero-shot", "all", "kr15-detached", "kr15-dropped", "kr8-detached", "kr8-dropped",
                        "kr15-detached-int8", "kr15-detached-local"]
    assert {n for n, c in by.items() if c.path == "split"} == {"all", "kr15-detached", "kr15-detached-int8"}
    assert by["kr15-detached-local"].twin == "kr15-detached" and by["kr15-detached-local"].path == "local"
    assert by["kr15-detached-int8"].wire == "int8" and by["kr8-dropped"].budget == 8
    assert {n for n, c in by.items() if len(c.seeds) == 2} == {"all", "kr8-detached"}
    s = Settings()
    assert (s.epochs, s.warmup_epochs, s.revive, s.lr, s.batch_size, s.rank, s.targets, s.test_items) == (
        4, 1, 2, 1e-3, 16, 8, ("q_proj", "k_proj", "v_proj"), 300)
    assert len(grid(paper_grid.RUN_ORDER, CONFIGS)) == 6 * 10 and set(paper_grid.RUN_ORDER) == set(paper_grid.TASKS)


def test_render_only_shows_what_is_left_and_keeps_the_reading(tmp_path):
    doc = tmp_path / "results.md"
    args = ["--render-only", "--cells", str(tmp_path / "cells"), "--doc", str(doc)]
    assert paper_tables.main(args) == 0
    text = doc.read_text()
    assert "**0 of 60 cells finished.** 60 not yet run" in text and "| zero-shot | - | - | - | - | - | - | - |" in text
    assert "results.png" not in text and not (tmp_path / "results.png").exists()  # nothing to draw yet
    doc.write_text(text.replace("To be written once the grid has run", "KR holds on ARC"))
    assert paper_tables.main(args) == 0
    assert "KR holds on ARC" in doc.read_text() and doc.read_text().count(paper_results.READING) == 1


def test_command_killed_mid_grid_resumes(tiny_dir, tmp_path):
    """The whole command (its own dlora-cloud child) SIGKILLed after its first cell; run again, it runs the rest."""
    model = tiny_dir("llama")
    write_task(tmp_path / "tasks", "colours", 0)
    cells_dir = tmp_path / "cells"
    args = ["--tasks", "colours", "--configs", "zero-shot,all,kr8-dropped", "--model", str(model), "--task-dir",
            str(tmp_path / "tasks"), "--runs", str(tmp_path / "runs"), "--cells", str(cells_dir), "--doc",
            str(tmp_path / "results.md"), "--train-items", "8", "--test-items", "5", "--epochs", "2",
            "--batch-size", "4", "--no-progress"]
    err = tmp_path / "stderr"
    with err.open("w") as f:
        proc = subprocess.Popen([sys.executable, str(ROOT / "bench" / "paper_tables.py"), *args], stderr=f,
                                stdout=subprocess.DEVNULL, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = cells_dir / "colours" / "zero-shot-s0.json"
    cloud_pid = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not first.exists() and proc.poll() is None:
            time.sleep(0.05)
        assert first.exists(), err.read_text()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        for line in err.read_text().splitlines():
            if "dlora-cloud pid" in line:
                cloud_pid = int(line.split("dlora-cloud pid ")[1].split()[0])
                state = Path(line.split(", state in ")[1].split()[0])
        if cloud_pid is not None and proc.returncode == -signal.SIGKILL:  # it had no chance to stop its child
            os.kill(cloud_pid, signal.SIGKILL)
            shutil.rmtree(state, ignore_errors=True)
    assert cloud_pid is not None
    stamp = first.read_text()
    before = len(list((cells_dir / "colours").glob("*.json")))
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "paper_tables.py"), *args], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    said = f"ran {4 - before} cells, {before} were finished already" if before < 4 else "all 4 cells are finished"
    assert said in r.stdout and first.read_text() == stamp
    assert {p.name for p in (cells_dir / "colours").glob("*.json")} == {
        "zero-shot-s0.json", "all-s0.json", "kr8-dropped-s0.json", "all-s1.json"}
    assert "**4 of 4 cells finished.**" in (tmp_path / "results.md").read_text()


@pytest.mark.slow
def test_real_model_cell(tmp_path):
    """Two cells of the real grid on SmolLM2-135M and ARC-Challenge, shortened (16 items, 2 epochs, 20
    test items): the int8 split cell's measured bytes equal the formula. ~3 minutes on 2 cores."""
    args = ["--tasks", "arc_challenge", "--configs", "zero-shot,kr15-detached-int8", "--runs", str(tmp_path / "runs"),
            "--cells", str(tmp_path / "cells"), "--doc", str(tmp_path / "results.md"), "--train-items", "16",
            "--test-items", "20", "--epochs", "2", "--no-progress"]
    assert paper_tables.main(args) == 0
    r = json.loads((tmp_path / "cells" / "arc_challenge" / "kr15-detached-int8-s0.json").read_text())
    assert r["measured_bytes_per_epoch"] == r["bytes_per_epoch"] and r["total"] == 20
    assert [len(a) for a in r["active_per_epoch"]] == [30, 15]
