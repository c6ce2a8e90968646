"""The training loop both `dlora train` and `dlora local-train` run: data, AdamW + cosine, metrics, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common.config import TrainConfig
from common.errors import RETRYABLE, RemoteError
from edge_client.train import checkpoint
from edge_client.train.data import epoch_batches, load_examples, steps_per_epoch
from edge_client.train.engines import Engine
from edge_client.train.kill_revive import DeltaMeter, layer_roles

log = logging.getLogger(__name__)
_RETRYABLE_NAMES = {c.name for c in RETRYABLE}
MAX_RETRIES = 5  # per step; backoff 0.5 s doubling, capped at 8 s
T = TypeVar("T")


@dataclass(frozen=True)
class TrainResult:
    output: Path
    steps: int
    epoch_losses: list[float]  # mean loss per epoch
    seconds: float


def _with_retry(engine: Engine, what: str, fn: Callable[[], T], params: list) -> T:  # type: ignore[type-arg]
    """Run fn; after UNAVAILABLE or DEADLINE_EXCEEDED, reconnect and run it again with the same dropout draws."""
    rng = torch.get_rng_state()
    for attempt in range(MAX_RETRIES + 1):
        try:
            return fn()
        except RemoteError as e:
            if e.code not in _RETRYABLE_NAMES or attempt == MAX_RETRIES:
                raise
            wait = min(0.5 * 2**attempt, 8.0)
            log.warning("%s: %s; retrying in %.1fs (%d/%d)", what, e, wait, attempt + 1, MAX_RETRIES)
            time.sleep(wait)
            for p in params:
                p.grad = None
            torch.set_rng_state(rng)
            try:
                engine.recover()
            except RemoteError as again:
                log.warning("reconnect failed: %s", again)
    raise RemoteError("UNAVAILABLE", f"{what}: gave up after {MAX_RETRIES} retries")


class Stopped(Exception):
    """should_stop() said so; the run can continue from its last checkpoint."""


def _keep_lines(path: Path, keep: Callable[[dict], bool]) -> None:
    """Drop the lines a resumed run will write again."""
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line and keep(json.loads(line))]
        path.write_text("".join(line + "\n" for line in lines))


def train(cfg: TrainConfig, engine: Engine, checkpoints: Path | None = None,
          observer: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Fine-tune and write the adapter, metrics.jsonl, kr_log.jsonl and run_config.json into cfg.output.

    With `checkpoints`, a checkpoint is written there at the end of every epoch, and a run that finds
    one continues from it exactly (weights, optimizer, schedule, data order, RNG, active modules, the
    cloud session). `observer` gets every step's metrics row and every epoch's decision;
    `should_stop` is polled after every step.

    Raises:
        ConfigError: bad data file, or a checkpoint of another run.
        RemoteError: the cloud failed in a way a retry does not fix.
        Stopped: should_stop() returned True.
    """
    started = time.perf_counter()
    examples = load_examples(cfg.data, engine.tokenizer, engine.edge.cap_length(cfg.max_length))
    params = engine.parameters()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    per_epoch = steps_per_epoch(len(examples), cfg.batch_size)
    total = per_epoch * cfg.epochs
    sched = get_cosine_schedule_with_warmup(opt, cfg.warmup_steps, total)
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / "run_config.json").write_text(cfg.model_dump_json(indent=2))
    pad = engine.tokenizer.pad_token_id
    layers = engine.num_layers
    active = set(range(layers))
    meter = DeltaMeter(engine.params_by_layer())
    named = engine.named_parameters()
    log.info("%d examples, %d steps per epoch, %d epochs", len(examples), per_epoch, cfg.epochs)

    torch.manual_seed(cfg.seed)  # LoRA dropout draws: the same sequence on every path
    step, first_epoch, epoch_losses = 0, 0, []
    ck = checkpoint.load_latest(checkpoints) if checkpoints else None
    if ck is not None:
        ck.restore(named, opt)
        sched.load_state_dict(ck.state.scheduler)
        step, first_epoch, epoch_losses = ck.state.step, ck.state.epochs_done, list(ck.state.epoch_losses)
        active = set(ck.state.active)
        engine.resume(ck.state.session_id, ck.state.kr_state)
        log.info("resuming from %s: epoch %d done, step %d", ck.folder.name, first_epoch, step)
    _keep_lines(cfg.output / "metrics.jsonl", lambda row: row["step"] <= step)
    _keep_lines(cfg.output / "kr_log.jsonl", lambda row: row["epoch"] <= first_epoch)
    with (cfg.output / "metrics.jsonl").open("a") as metrics, (cfg.output / "kr_log.jsonl").open("a") as kr_log, tqdm(
        total=total, initial=step, disable=not cfg.progress, unit="step", dynamic_ncols=True
    ) as bar:
        for epoch in range(first_epoch, cfg.epochs):
            engine.set_active(active, cfg.kill_mode)
            roles = layer_roles(active, layers, cfg.kill_mode)
            meter.start(active)
            losses = []
            for batch in epoch_batches(examples, cfg.batch_size, pad, cfg.seed, epoch, cfg.shuffle):
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss, traffic = _with_retry(engine, f"step {step + 1}",
                                            lambda b=batch, s=step, r=roles: engine.train_step(b, s, r), params)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                dt = time.perf_counter() - t0
                losses.append(loss)
                row = {
                    "epoch": epoch + 1, "step": step + 1, "loss": loss, "lr": lr, "step_s": round(dt, 4),
                    "tokens": int(batch.attention_mask.sum()), "batch_shape": list(batch.input_ids.shape),
                    "bytes_to_cloud": traffic.bytes_up, "bytes_from_cloud": traffic.bytes_down,
                    "payload_to_cloud": traffic.payload_up, "payload_from_cloud": traffic.payload_down,
                    "active_modules": len(active),
                }
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                step += 1
                log.info("step=%d loss=%.4f active=%d/%d up=%.1fMB down=%.1fMB %.2fs", step, loss,
                         len(active), layers, traffic.bytes_up / 1e6, traffic.bytes_down / 1e6, dt)
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", active=f"{len(active)}/{layers}")
                bar.update(1)
                if observer is not None:
                    observer({"kind": "step", "total_steps": total, **row})
                if should_stop is not None and should_stop():
                    raise Stopped(f"stopped at step {step}; the last checkpoint is epoch {epoch}")
            epoch_losses.append(sum(losses) / len(losses))
            deltas = meter.deltas()
            decision = _with_retry(engine, f"epoch {epoch + 1} report",
                                   lambda e=epoch, d=deltas: engine.report_epoch(e + 1, d), params)
            kr_log.write(json.dumps(decision.to_json()) + "\n")
            kr_log.flush()
            log.info("epoch %d/%d mean loss %.4f; next active %d/%d (killed %s, revived %s)", epoch + 1, cfg.epochs,
                     epoch_losses[-1], len(decision.next_active), layers, list(decision.killed), list(decision.revived))
            active = set(decision.next_active)
            if observer is not None:
                observer({"kind": "epoch", "loss": epoch_losses[-1], **decision.to_json()})
            if checkpoints is not None:
                checkpoint.save(checkpoints, named, opt, checkpoint.TrainerState(
                    epochs_done=epoch + 1, step=step, active=sorted(active), epoch_losses=epoch_losses,
                    scheduler=sched.state_dict(), kr_state=engine.scheduler_state(), session_id=engine.session_id))
    engine.save(cfg.output)
    return TrainResult(cfg.output, step, epoch_losses, time.perf_counter() - started)
