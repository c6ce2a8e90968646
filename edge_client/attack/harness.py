"""`dlora attack`: what a curious cloud can recover, measured on a real session it recorded.

1. Start a loopback `dlora-cloud serve --record` (the curious operator's view, docs/privacy.md).
2. The victim: a real `dlora train` session on the first --victim-items lines of --data, with the
   defences under test. A witness notes each micro-batch's true tokens, for scoring only.
3. The shadow: the attacker's own session on --public text (disjoint from the victim's, checked), through
   the same cloud with the same defence and settings: the attacker knows the defence (sigma, clip, k).
   Its recording trains the probes (edge_client/attack/probes.py).
4. Attacks on the victim's recording: token recovery (nearest row, ridge, MLP) on every tensor that
   crossed; the same after averaging each text's views over the epochs (fresh noise each epoch averages
   out); next tokens from HiddenGrad; the adapter (edge_client/attack/stolen_adapter.py).
5. report.json and report.md in --output (edge_client/attack/report.py renders them).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import torch
from tqdm import tqdm

from common.config import AttackConfig, TrainConfig
from common.errors import ConfigError
from common.recording import load_session
from edge_client.attack.probes import MlpProbe, RidgeProbe, clip_rows, nearest_row, trr
from edge_client.attack.recorded import (
    Session,
    position_modes,
    positions,
    prior_guess,
    prior_trr,
    rows,
    sequences,
    tensor_names,
)
from edge_client.attack.recovery import recover_labels, relative_gain
from edge_client.attack.stolen_adapter import heldout_losses, save_adapter, steal_adapter
from edge_client.remote.split_engine import SplitEngine
from edge_client.tools.cloud_process import CloudProcess
from edge_client.train.data import (
    IGNORE,
    Batch,
    Example,
    load_examples,
    next_labels,
    read_jsonl,
    steps_per_epoch,
)
from edge_client.train.engines import Engine
from edge_client.train.model_parts import EdgeModel
from edge_client.train.trainer import train

log = logging.getLogger(__name__)


class _Witness:
    """An engine that notes each micro-batch's tokens as it sends them (the victim's own knowledge,
    used only to score the attacks)."""

    def __init__(self, engine: SplitEngine, micro_batches: int) -> None:
        self._engine, self._m = engine, micro_batches
        self.parts: dict[tuple[int, int], Batch] = {}
        self.weights: dict[int, dict[str, torch.Tensor]] = {}  # step -> the adapter that step ran with (PEFT keys)

    def train_step(self, batch: Batch, step: int, roles: list[int]) -> Any:
        for mb, part in enumerate(batch.split(self._m)):
            self.parts[(step, mb)] = part
        self.weights = {step: {k: p.detach().clone() for k, p in self._engine.named_parameters()}}  # the last only
        return self._engine.train_step(batch, step, roles)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)


def split_texts(cfg: TrainConfig, ac: AttackConfig, out: Path) -> tuple[Path, Path, Path]:
    """victim.jsonl, heldout.jsonl (both from --data) and public.jsonl (from --public, minus any line whose
    text the victim's lines also hold) in out/data.

    Raises:
        ConfigError: too few lines for --victim-items + --heldout-items, or no public line left.
    """
    fields = (("text",), ("prompt", "completion"))
    private = read_jsonl(cfg.data, fields)
    public = read_jsonl(ac.public, fields)
    need = ac.victim_items + ac.heldout_items
    if len(private) < need:
        raise ConfigError(f"--data {cfg.data}: has {len(private)} examples; --victim-items + --heldout-items need {need}")
    seen = {_text(r) for r in private}
    public = [r for r in public if _text(r) not in seen][: ac.public_items]
    if len(public) < 2:
        raise ConfigError(f"--public {ac.public}: fewer than 2 examples that --data does not also hold; use other text")
    folder = out / "data"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, lines in (("victim", private[: ac.victim_items]), ("heldout", private[ac.victim_items : need]),
                        ("public", public)):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        paths.append(path)
    return paths[0], paths[1], paths[2]


def _text(row: dict) -> str:
    return row["text"] if "text" in row else row["prompt"] + row["completion"]


def run_session(cfg: TrainConfig) -> tuple[SplitEngine, _Witness, Any]:
    engine = SplitEngine(cfg)
    witness = _Witness(engine, cfg.micro_batches)
    try:
        result = train(cfg, cast(Engine, witness))
    finally:
        engine.close()
    return engine, witness, result


def record_sessions(cfg: TrainConfig, ac: AttackConfig, out: Path) -> tuple[Session, Session, Path]:
    """Run the victim and the shadow through one recording cloud; their recordings and the held-out file."""
    victim_data, heldout, public = split_texts(cfg, ac, out)
    rec = out / "recording"
    rec.mkdir(mode=0o700, parents=True, exist_ok=True)
    rec.chmod(0o700)
    n_public = len(read_jsonl(public, (("text",), ("prompt", "completion"))))
    victim_cfg = cfg.model_copy(update={"data": victim_data, "output": out / "victim"})
    # the attacker's own noise key: never the victim's (its draws must not line up with the victim's)
    shadow_noise = None if cfg.noise_seed is None else (cfg.noise_seed + 1) % (1 << 63)
    shadow_cfg = cfg.model_copy(update={"data": public, "output": out / "shadow", "seed": cfg.seed + 1, "epochs": 1,
                                        "noise_seed": shadow_noise})
    steps = max(cfg.epochs * steps_per_epoch(ac.victim_items, cfg.batch_size), steps_per_epoch(n_public, cfg.batch_size))
    cloud = CloudProcess(cfg.model, extra=["--record", str(rec), "--record-steps", str(steps),
                                           "--state-dir", str(out / "cloud-state")])
    sessions = []
    try:
        for scfg, n in ((victim_cfg, ac.victim_items), (shadow_cfg, n_public)):
            engine, witness, _ = run_session(scfg.model_copy(update={"cloud": cloud.address}))
            metrics = [json.loads(line) for line in (scfg.output / "metrics.jsonl").read_text().splitlines()]
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB; before any attack loads
            sessions.append(Session(load_session(rec, engine.session_id), witness.parts, witness.weights, metrics,
                                    device_bytes(engine), steps_per_epoch(n, scfg.batch_size), peak))
    finally:
        cloud.stop()
    return sessions[0], sessions[1], heldout


def device_bytes(engine: SplitEngine) -> int:
    """Bytes of every tensor the device holds for training: the base model's parts it runs, and the LoRA."""
    tensors = {id(p): p for m in engine.edge.modules_on_device().values() for p in m.parameters()}
    tensors.update({id(p): p for p in engine.parameters()})
    return sum(p.numel() * p.element_size() for p in tensors.values())


def mlp_wanted(name: str, first: int, last: int, every: int) -> bool:
    """The MLP probe runs on every whole-model tensor and on the layers first, last and every `every`-th."""
    parts = name.split(".")
    if len(parts) == 1:
        return True
    layer = int(parts[1])
    return layer in (first, last) or layer % every == 0


def token_attacks(victim: Session, shadow: Session, edge: EdgeModel, cfg: TrainConfig, ac: AttackConfig,
                  bar: Callable[[str], None]) -> dict[str, dict]:
    """TRR of each attack on every recorded tensor: {name: {rows, nearest, ridge, mlp}} (None: not run)."""
    table = edge.embedding.weight.detach().float()
    clipped = clip_rows(table, cfg.privacy_clip)  # what the device's clipped rows look like without noise
    layers = [int(n.split(".")[1]) for n in tensor_names(victim) if "." in n]
    first, last = (min(layers), max(layers)) if layers else (0, 0)
    modes = position_modes(sequences(shadow))  # once: every tensor is scored against the same prior
    out: dict[str, dict] = {}
    for name in tensor_names(victim):
        bar(name)
        xv, tv, where = rows(victim, name)
        xs, ts, _ = rows(shadow, name)
        t0 = time.perf_counter()
        if len(tv) == 0:
            continue
        content = prior_guess(modes, where) != tv  # the tokens a guess from the position alone misses
        entry: dict[str, Any] = {"rows": int(len(tv)), "content_rows": int(content.sum())}
        guesses: dict[str, torch.Tensor | None] = {"nearest": None, "ridge": None, "mlp": None}
        if xv.shape[1] == table.shape[1]:
            guesses["nearest"] = nearest_row(xv, clipped)
        if len(ts) >= 16 and xs.shape[1] == xv.shape[1]:
            guesses["ridge"] = RidgeProbe(table).fit(xs, ts, cfg.seed).predict(xv)
            if ac.mlp_steps and mlp_wanted(name, first, last, ac.mlp_every):
                guesses["mlp"] = MlpProbe(table, steps=ac.mlp_steps).fit(xs, ts, cfg.seed).predict(xv)
        for attack, guess in guesses.items():
            entry[attack] = None if guess is None else trr(guess, tv)
            entry[f"{attack}_content"] = None if guess is None else trr(guess[content], tv[content])
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        log.info("%s: %s", name, entry)
        out[name] = entry
    return out


# -- the same text over several epochs
def match_views(victim: Session) -> list[list[tuple[int, int]]]:
    """The attacker's grouping of the victim's sequences across epochs: each group is [(file index, row)],
    one per epoch, matched by token count and then by the nearest StepBegin rows to the first epoch's.
    Built from what the cloud sees only (the mask and step_begin), never from the truth."""
    seqs = []  # (file index, row, epoch, length, flat step_begin rows)
    for i, m in enumerate(victim.mbs):
        if not m.meta["train"] or "step_begin" not in m.tensors:
            continue
        lengths = m.tensors["attention_mask"].sum(dim=1).tolist()
        for b, n in enumerate(lengths):
            n = int(n)
            seqs.append((i, b, m.step // victim.per_epoch, n, m.tensors["step_begin"][b, :n].reshape(-1)))
    anchors = [s for s in seqs if s[2] == 0]
    groups = {(a[0], a[1]): [(a[0], a[1])] for a in anchors}
    for s in seqs:
        if s[2] == 0:
            continue
        same = [a for a in anchors if a[3] == s[3]]
        if not same:
            continue
        best = min(same, key=lambda a: float((a[4] - s[4]).square().sum()))
        groups[(best[0], best[1])].append((s[0], s[1]))
    return [g for g in groups.values() if len(g) > 1]


def averaged_attacks(victim: Session, shadow: Session, edge: EdgeModel, cfg: TrainConfig) -> dict[str, Any]:
    """Nearest row and ridge on each text's StepBegin rows averaged over its epochs, and the labels from
    all its epochs' HiddenGrads together; with how often the attacker's matching was right."""
    groups = match_views(victim)
    if not groups:
        return {"groups": 0}
    table = edge.embedding.weight.detach().float()
    head = edge.head.weight.detach().float()
    parts = {i: victim.parts.get((m.step, m.micro_batch)) for i, m in enumerate(victim.mbs)}
    right, xs, ids, label_views, labels = 0, [], [], [], []
    for g in groups:
        i0, b0 = g[0]
        p0 = parts[i0]
        if p0 is None:
            continue
        n = int(victim.mbs[i0].tensors["attention_mask"][b0].sum())
        truth = p0.input_ids[b0, :n]
        right += all(parts[i] is not None and torch.equal(parts[i].input_ids[b, :n], truth) for i, b in g)  # type: ignore[union-attr]
        xs.append(torch.stack([victim.mbs[i].tensors["step_begin"][b, :n] for i, b in g]).mean(dim=0))
        ids.append(truth)
        nxt = next_labels(p0.labels[b0])[:n]  # the token each position predicts
        scored = nxt != IGNORE
        if "hidden_grad" in victim.mbs[i0].tensors and scored.any():
            label_views.append([(victim.mbs[i].tensors["hidden"][b, :n][scored],
                                 victim.mbs[i].tensors["hidden_grad"][b, :n][scored]) for i, b in g])
            labels.append(nxt[scored])
    x, t = torch.cat(xs), torch.cat(ids)
    xs_shadow, ts_shadow, _ = rows(shadow, "step_begin")
    out: dict[str, Any] = {"groups": len(groups), "views": statistics.mean(len(g) for g in groups),
                           "matched": right / len(groups), "rows": int(len(t)),
                           "nearest": trr(nearest_row(x, clip_rows(table, cfg.privacy_clip)), t),
                           "ridge": trr(RidgeProbe(table).fit(xs_shadow, ts_shadow, cfg.seed).predict(x), t)
                           if len(ts_shadow) >= 16 else None}
    if label_views:
        out["labels"] = trr(torch.cat([recover_labels(views, head) for views in label_views]), torch.cat(labels))
    return out


def label_attack(victim: Session, edge: EdgeModel) -> dict[str, Any]:
    """Next tokens from each micro-batch's HiddenGrad and Hidden, one view at a time."""
    head = edge.head.weight.detach().float()
    guesses, truth = [], []
    for m, part in victim.recorded():
        if "hidden_grad" not in m.tensors:
            continue
        keep = positions("hidden_grad", part)
        guesses.append(recover_labels([(m.tensors["hidden"][keep], m.tensors["hidden_grad"][keep])], head))
        truth.append(next_labels(part.labels)[keep])
    if not truth:
        return {"rows": 0, "labels": None}
    y = torch.cat(truth)
    return {"rows": int(len(y)), "labels": trr(torch.cat(guesses), y)}


def adapter_attack(victim: Session, edge: EdgeModel, cfg: TrainConfig, heldout: Path, out: Path) -> dict[str, Any]:
    """The stolen adapter's share of the fine-tuning's held-out loss gain, and of the gain of the adapter the
    last recorded step really ran with (what the attacker could at best rebuild: the final adapter has one more
    update the cloud never saw applied)."""
    state, seen = steal_adapter(edge, victim.mbs, cfg.rank, cfg.alpha)
    stolen = save_adapter(state, out / "victim", out / "stolen")
    adapters: dict[str, Path | None] = {"base": None, "victim": out / "victim", "stolen": stolen}
    last = max((m.step for m in victim.mbs if m.meta["train"]), default=None)
    if last is not None and last in victim.weights:
        adapters["at_step"] = save_adapter(victim.weights[last], out / "victim", out / "at-last-step")
    examples: list[Example] = load_examples(heldout, edge.tokenizer, edge.cap_length(cfg.max_length))
    losses = heldout_losses(edge, adapters, examples, cfg.rank, cfg.alpha)
    out_ = {"modules_seen": seen, "modules": len(edge.targets), **{f"loss_{k}": v for k, v in losses.items()},
            "recovery": relative_gain(losses["base"], losses["victim"], losses["stolen"])}
    if "at_step" in losses:
        out_["recovery_at_step"] = relative_gain(losses["base"], losses["at_step"], losses["stolen"])
    return out_


def run_attack(cfg: TrainConfig, ac: AttackConfig, out: Path) -> dict[str, Any]:
    """Everything above, in order, with a progress bar; returns report.json's content."""
    victim, shadow, heldout = record_sessions(cfg, ac, out)
    edge = EdgeModel(cfg.model, cfg.targets, cfg.device)
    names = tensor_names(victim)
    with tqdm(total=len(names) + 3, desc="attacks", unit="attack", disable=not cfg.progress, dynamic_ncols=True) as bar:
        def tick(name: str) -> None:
            bar.set_postfix_str(name)
            bar.update(1)

        tokens = token_attacks(victim, shadow, edge, cfg, ac, tick)
        tick("averaged over epochs")
        averaged = averaged_attacks(victim, shadow, edge, cfg)
        tick("labels")
        labels = label_attack(victim, edge)
        tick("adapter")
        adapter = adapter_attack(victim, edge, cfg, heldout, out)
    steps = victim.metrics
    return {
        "tensors": tokens, "averaged": averaged, "labels": labels, "adapter": adapter,
        "worst": worst(tokens, averaged, labels),
        "prior": prior_trr(sequences(victim), sequences(shadow)),
        "worst_content": max(((v, name, attack) for name, e in tokens.items() for attack in ("nearest", "ridge", "mlp")
                              if (v := e.get(f"{attack}_content")) is not None and not math.isnan(v)), default=None),
        "cost": {"bytes_per_step": statistics.mean(r["bytes_to_cloud"] + r["bytes_from_cloud"] for r in steps),
                 "step_s": statistics.median(r["step_s"] for r in steps), "device_bytes": victim.device_bytes,
                 "device_peak_rss": victim.peak_rss},
        "victim_items": ac.victim_items, "public_items": sum(p.input_ids.shape[0] for p in shadow.parts.values()),
    }


def worst(tokens: dict[str, dict], averaged: dict[str, Any], labels: dict[str, Any]) -> dict[str, Any]:
    """The highest recovery rate over every attack and tensor, and where it was."""
    best: dict[str, Any] = {"trr": -1.0, "tensor": None, "attack": None}
    cands = [(name, attack, v) for name, e in tokens.items() for attack in ("nearest", "ridge", "mlp")
             if (v := e.get(attack)) is not None]
    cands += [("step_begin (averaged)", attack, averaged[attack]) for attack in ("nearest", "ridge")
              if averaged.get(attack) is not None]
    cands += [("hidden_grad", "labels", labels["labels"])] if labels.get("labels") is not None else []
    cands += [("hidden_grad (averaged)", "labels", averaged["labels"])] if averaged.get("labels") is not None else []
    for name, attack, v in cands:
        if not math.isnan(v) and v > best["trr"]:
            best = {"trr": v, "tensor": name, "attack": attack}
    return best
