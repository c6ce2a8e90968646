"""report.json and report.md of one `dlora attack` run: every tensor kind's best attack, the worst case in
bold, the labels, the adapter and the price of the defence."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from common.config import TrainConfig

KIND_NAMES = {
    "step_begin": "StepBegin (what the device sends up)",
    "lora_x": "LoRA input x (per layer)",
    "lora_delta": "LoRA delta (per layer)",
    "hidden": "Hidden (final hidden states)",
    "hidden_grad": "HiddenGrad (dL/dh sent up)",
    "lora_grad_output": "LoRA dL/d(delta) (per layer)",
    "lora_grad_input": "LoRA dL/dx (per layer)",
    "input_grad": "InputGrad (dL/d StepBegin)",
}
DEFENCE_FIELDS = ("protocol", "edge_layers", "privacy_noise", "privacy_clip", "grad_noise", "grad_clip",
                  "grad_noise_rows")


def defence(cfg: TrainConfig) -> dict[str, Any]:
    """The settings that define the defence under test (what the attacker is assumed to know)."""
    return {f: getattr(cfg, f, None) for f in DEFENCE_FIELDS}


def by_kind(tensors: dict[str, dict]) -> dict[str, dict[str, Any]]:
    """Per tensor kind and attack: the highest TRR over its layers, and the layer where it was."""
    out: dict[str, dict[str, Any]] = {}
    for name, entry in tensors.items():
        kind = name.split(".")[0]
        row = out.setdefault(kind, {"tensors": 0})
        row["tensors"] += 1
        for attack in ("nearest", "ridge", "mlp"):
            v = entry.get(attack)
            if v is None or math.isnan(v):
                continue
            if v > row.get(attack, (-1.0, ""))[0]:
                row[attack] = (v, name)
    return out


def _pct(v: float | None, bold: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    text = f"{100 * v:.1f}%"
    return f"**{text}**" if bold else text


def render(result: dict[str, Any]) -> str:
    """The Markdown report."""
    worst = result["worst"]
    d = result["defence"]
    lines = [
        "# What the cloud recovered",
        "",
        "Defence: " + ", ".join(f"{k}={v}" for k, v in d.items()) + ".",
        f"Victim: {result['victim_items']} examples, recorded by the cloud; the attacker's probes trained on "
        f"{result['public_items']} examples of other public text, sent with the same defence.",
        "",
        f"Worst case: **{_pct(worst['trr'])}** ({worst['attack']} on {worst['tensor']}); a guess from the position "
        f"alone (the public text's most common token there) scores {_pct(result.get('prior'))}"
        + (f"; on the tokens that guess misses the worst attack recovers {_pct(result['worst_content'][0])} "
           f"({result['worst_content'][2]} on {result['worst_content'][1]})" if result.get("worst_content") else "")
        + ".",
        "",
        "| tensor | tensors | nearest row | ridge probe | MLP probe |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, row in by_kind(result["tensors"]).items():
        cells = []
        for attack in ("nearest", "ridge", "mlp"):
            if attack not in row:
                cells.append("–")
                continue
            v, name = row[attack]
            where = f" ({name})" if "." in name else ""
            cells.append(_pct(v, bold=name == worst["tensor"] and attack == worst["attack"]) + where)
        lines.append(f"| {KIND_NAMES.get(kind, kind)} | {row['tensors']} | " + " | ".join(cells) + " |")
    av = result["averaged"]
    if av.get("groups"):
        lines += ["", f"Averaged over epochs ({av['groups']} texts, {av['views']:.1f} views each, the attacker's "
                      f"matching right for {_pct(av['matched'])}): StepBegin nearest row {_pct(av.get('nearest'))}, "
                      f"ridge {_pct(av.get('ridge'))}; labels from every epoch's HiddenGrad {_pct(av.get('labels'))}."]
    lab, ad, cost = result["labels"], result["adapter"], result["cost"]
    lines += [
        "",
        f"Labels (next tokens) from HiddenGrad, one view: {_pct(lab.get('labels'))} of {lab['rows']} loss positions.",
        "",
        f"Adapter: {ad['modules_seen']} of {ad['modules']} modules seen; held-out loss base {ad['loss_base']:.4f}, "
        f"victim {ad['loss_victim']:.4f}, stolen {ad['loss_stolen']:.4f}: the stolen adapter gives "
        f"{_pct(ad['recovery'])} of the fine-tuning's gain"
        + (f" ({_pct(ad['recovery_at_step'])} of the gain of the adapter the last recorded step ran with)"
           if ad.get("recovery_at_step") is not None else "") + ".",
        "",
        f"Price: {cost['bytes_per_step'] / 1e6:.2f} MB per step, {cost['step_s']:.2f} s per step (median), "
        f"{cost['device_bytes'] / 2**20:.1f} MiB of tensors on the device"
        + (f" (the process's peak RSS {cost['device_peak_rss'] / 2**20:.0f} MiB)" if "device_peak_rss" in cost else "")
        + ".",
    ]
    return "\n".join(lines) + "\n"


def write(result: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """report.json and report.md in out."""
    js, md = out / "report.json", out / "report.md"
    js.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    md.write_text(render(result))
    return js, md


def _jsonable(v: Any) -> Any:
    return str(v) if isinstance(v, Path) else v
