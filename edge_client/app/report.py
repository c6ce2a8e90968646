"""`dlora report RUN_DIR`: pictures and a Markdown summary of a training run.

Reads RUN_DIR/metrics.jsonl and kr_log.jsonl (and demo_result.json or eval.json when present) and
writes loss.png, modules.png (the paper's Figure 3: Δ of every module per epoch, killed and revived
modules marked), bytes.png (bytes per epoch by direction), accuracy.png (when the run was
evaluated) and report.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from common.errors import ConfigError  # noqa: E402


def _wire(cfg: dict) -> str:
    """"int8", or "int8 up, bfloat16 down" when the directions differ."""
    up, down = cfg.get("wire_up") or cfg.get("wire"), cfg.get("wire_down") or cfg.get("wire")
    return str(up) if up == down else f"{up} up, {down} down"


def _jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not JSONL ({e.msg} on line {e.lineno})") from None


def _loss(metrics: list[dict], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 3.5))
    steps = [m["step"] for m in metrics]
    ax.plot(steps, [m["loss"] for m in metrics], lw=1.2, label="loss per step")
    for e in sorted({m["epoch"] for m in metrics})[1:]:
        ax.axvline(min(m["step"] for m in metrics if m["epoch"] == e) - 0.5, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("optimizer step (dotted: epoch boundaries)")
    ax.set_ylabel("loss")
    ax.set_title("Training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "loss.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _modules(kr: list[dict], layers: int, out: Path) -> Path:
    grid = np.full((layers, len(kr)), np.nan)  # (module, epoch): delta where the module trained
    for j, d in enumerate(kr):
        for k, v in d["deltas"].items():
            grid[int(k), j] = v
    fig, ax = plt.subplots(figsize=(2.2 + 0.9 * len(kr), 1.5 + 0.22 * layers))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#dddddd")
    im = ax.imshow(grid, aspect="auto", cmap=cmap, origin="lower", interpolation="nearest")
    for j, d in enumerate(kr):
        for m in d["killed"]:  # killed after this epoch
            ax.plot(j, m, marker="x", color="red", ms=7, mew=2)
        for m in d["revived"]:  # revived for the next epoch
            ax.plot(j + 0.5, m, marker="^", color="orange", ms=7, mec="black")
    ax.set_xticks(range(len(kr)), [f"epoch {d['epoch']}" for d in kr])
    ax.set_ylabel("module (decoder layer)")
    ax.set_title("Module change Δ per epoch\n(grey: not trained; x: killed after the epoch; ^: revived)", fontsize=9)
    fig.colorbar(im, ax=ax, label="Δ = ‖θ_end − θ_start‖₂")
    fig.tight_layout()
    path = out / "modules.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _bytes(metrics: list[dict], out: Path) -> Path:
    epochs = sorted({m["epoch"] for m in metrics})
    up = [sum(m["bytes_to_cloud"] for m in metrics if m["epoch"] == e) / 1e6 for e in epochs]
    down = [sum(m["bytes_from_cloud"] for m in metrics if m["epoch"] == e) / 1e6 for e in epochs]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(epochs))
    ax.bar(x - 0.2, up, 0.4, label="device → cloud")
    ax.bar(x + 0.2, down, 0.4, label="cloud → device")
    ax.set_xticks(x, [f"epoch {e}" for e in epochs])
    ax.set_ylabel("MB")
    ax.set_title("Bytes on the wire per epoch")
    ax.legend()
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = out / "bytes.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _accuracy(result: dict, out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(4, 3.5))
    vals = [result["accuracy_before"], result["accuracy_after"]]
    ax.bar(["before", "after"], vals, color=["#999999", "#2a7"])
    for i, v in enumerate(vals):
        ax.text(i, v + 0.01, f"{v:.3f}", ha="center")
    ax.set_ylim(0, 1)
    ax.set_title(f"Test accuracy ({result.get('task', '')}, {result.get('test_items', '?')} items)")
    fig.tight_layout()
    path = out / "accuracy.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dir: Path) -> Path:
    """Write the pictures and report.md into run_dir; returns report.md's path.

    Raises:
        ConfigError: run_dir has no metrics.jsonl (not a dlora run folder).
    """
    run_dir = Path(run_dir)
    if not (run_dir / "metrics.jsonl").is_file():
        raise ConfigError(f"{run_dir} has no metrics.jsonl; pass the --output folder of `dlora train`")
    metrics = _jsonl(run_dir / "metrics.jsonl")
    if not metrics:
        raise ConfigError(f"{run_dir}/metrics.jsonl is empty; the run has not finished a step yet")
    kr = _jsonl(run_dir / "kr_log.jsonl") if (run_dir / "kr_log.jsonl").is_file() else []
    cfg = json.loads((run_dir / "run_config.json").read_text()) if (run_dir / "run_config.json").is_file() else {}
    layers = max([int(k) for d in kr for k in d["deltas"]] + [m.get("active_modules", 1) - 1 for m in metrics]) + 1
    pictures = [_loss(metrics, run_dir)]
    if kr:
        pictures.append(_modules(kr, layers, run_dir))
    split = any(m["bytes_to_cloud"] for m in metrics)
    if split:
        pictures.append(_bytes(metrics, run_dir))
    result = None
    for name in ("demo_result.json", "eval.json"):
        if (run_dir / name).is_file():
            result = json.loads((run_dir / name).read_text())
    if result and "accuracy_before" in result:
        pictures.append(_accuracy(result, run_dir))
    lines = [f"# dlora run: {run_dir.name}", ""]
    if cfg:
        lines += [f"Model `{cfg.get('model')}`, data `{cfg.get('data')}`; {cfg.get('epochs')} epochs, LoRA r={cfg.get('rank')}, "
                  f"lr {cfg.get('lr')}, kill mode {cfg.get('kill_mode')}, budget {cfg.get('budget') or 'all'}, "
                  f"revive {cfg.get('revive')}, wire {_wire(cfg)}.", ""]
    lines += ["| epoch | steps | mean loss | active modules | MB to cloud | MB from cloud | killed | revived |",
              "|---|---|---|---|---|---|---|---|"]
    for e in sorted({m["epoch"] for m in metrics}):
        rows = [m for m in metrics if m["epoch"] == e]
        d = next((d for d in kr if d["epoch"] == e), {})
        lines.append(f"| {e} | {len(rows)} | {np.mean([m['loss'] for m in rows]):.4f} | {rows[0].get('active_modules', '')} "
                     f"| {sum(m['bytes_to_cloud'] for m in rows) / 1e6:.1f} | {sum(m['bytes_from_cloud'] for m in rows) / 1e6:.1f} "
                     f"| {d.get('killed', '')} | {d.get('revived', '')} |")
    if result and "accuracy_before" in result:
        lines += ["", f"Test accuracy: {result['accuracy_before']:.3f} before, {result['accuracy_after']:.3f} after."]
    lines += [""] + [f"![{p.stem}]({p.name})" for p in pictures]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
