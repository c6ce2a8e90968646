"""docs/results.png: each Kill-and-Revive configuration's accuracy against the bytes it saves, per task.

One panel per task. A point is one configuration: x is its bytes per epoch as a share of all modules'
(the DESIGN.md formula), y its accuracy minus all modules' in points, with the paired 95% interval of
docs/results.md (`versus_reference`). All modules sits at (1, 0). The dashed line is the paper's claim,
KR within about 4 points of training every module. The title gives all modules' accuracy and its gain over
zero-shot, so that a flat panel with no gain reads as "nothing to keep", not as "KR holds".
Drawn from the cells alone; nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from paper_grid import REFERENCE, TASK_LABELS, ZERO_SHOT, Config  # noqa: E402
from paper_results import Cells, gb_per_epoch, mean_accuracy, points, seeds_of, versus_reference  # noqa: E402

PAPER_CLAIM_POINTS = 4.0  # the paper: KR within about 4 points of training every module
MARKERS = {"detached": "o", "dropped": "s"}
COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def points_of(cells: Cells, task: str, configs: list[Config]) -> list[tuple[Config, float, float, float, float]]:
    """(config, bytes share of all modules, Δ points, interval low, interval high) for every KR
    configuration with a cell, its bytes and a shared seed with all modules on `task`."""
    ref = next((c for c in configs if c.name == REFERENCE), None)
    base = gb_per_epoch(seeds_of(cells, task, ref)) if ref is not None else None
    out = []
    for c in configs:
        if c.name in (REFERENCE, ZERO_SHOT):
            continue
        gb = gb_per_epoch(seeds_of(cells, task, c))
        diff = versus_reference(cells, task, c)
        if gb is None or diff is None or not base:
            continue
        out.append((c, gb / base, 100 * diff[0], 100 * diff[1], 100 * diff[2]))
    return out


def title(cells: Cells, task: str, configs: list[Config]) -> str:
    label = TASK_LABELS.get(task, task)
    ref = next((c for c in configs if c.name == REFERENCE), None)
    zero = next((c for c in configs if c.name == ZERO_SHOT), None)
    ours = seeds_of(cells, task, ref) if ref is not None else []
    base = seeds_of(cells, task, zero) if zero is not None else []
    if not ours:
        return label
    text = f"{label}: all modules {mean_accuracy(ours):.3f}"
    if base:
        text += f"\ngain over zero-shot {points(mean_accuracy(ours) - mean_accuracy(base))}"
    return text


def draw(cells: Cells, tasks: list[str], configs: list[Config], out: Path) -> bool:
    """Write the picture to `out`; False (and nothing written) while no task has a point to draw."""
    per_task = {t: points_of(cells, t, configs) for t in tasks}
    if not any(per_task.values()):
        return False
    kr = [c for c in configs if c.name not in (REFERENCE, ZERO_SHOT)]
    colour = {c.name: COLOURS[i % len(COLOURS)] for i, c in enumerate(kr)}
    cols = min(3, len(tasks))
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), sharex=True, sharey=True, squeeze=False)
    for ax, task in zip(axes.flat, tasks):
        ax.axhspan(-PAPER_CLAIM_POINTS, 0, color="0.92", zorder=0)
        ax.axhline(0, color="0.4", lw=0.8)
        ax.axhline(-PAPER_CLAIM_POINTS, color="0.4", lw=0.8, ls="--")
        ax.plot([1.0], [0.0], marker="*", ms=12, color="black", ls="none", label="all modules")
        for c, share, mid, low, high in per_task[task]:
            ax.errorbar(
                [share],
                [mid],
                yerr=[[mid - low], [high - mid]],
                marker=MARKERS.get(c.kill_mode, "o"),
                ms=6,
                color=colour[c.name],
                capsize=3,
                ls="none",
                label=c.label,
            )
        ax.set_title(title(cells, task, configs), fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax in axes[-1]:
        ax.set_xlabel("bytes per epoch / all modules'")
    for ax in axes[:, 0]:
        ax.set_ylabel("Δ accuracy vs all modules (points)")
    axes[0][0].set_xlim(0, 1.08)
    handles, labels = [], []
    for ax in axes.flat:  # one legend entry per configuration, whichever panel drew it first
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=8, frameon=False)
    fig.suptitle(
        f"Kill-and-Revive against all modules: paired 95% intervals; shaded, the paper's "
        f"'within about {PAPER_CLAIM_POINTS:g} points'",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.08, 1, 0.96))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{out.suffix}")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return True
