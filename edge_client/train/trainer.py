"""The training loop both `dlora train` and `dlora local-train` run: data, AdamW + cosine, metrics, export."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TypeVar

import torch
from tqdm import tqdm
from transformers import get_cosine_schedule_with_warmup

from common.config import TrainConfig
from common.errors import RETRYABLE, RemoteError
from edge_client.train import checkpoint
from edge_client.train.data import Batch, Example, epoch_batches, load_examples, steps_per_epoch
from edge_client.train.engines import Engine, Traffic
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


def optimizer_step(engine: Engine, opt: torch.optim.Optimizer, batch: Batch, step: int, roles: list[int],
                   run: Callable[[Callable[[], tuple[float, Traffic]]], tuple[float, Traffic]] | None = None,
                   ) -> tuple[float, Traffic]:
    """One optimizer step on one batch: zero the gradients, the engine's loss and LoRA gradients, the
    optimizer's update. `run` calls the engine's step (the trainer passes its retry); None: once.
    Returns the loss and the step's traffic."""
    opt.zero_grad(set_to_none=True)
    compute = lambda: engine.train_step(batch, step, roles)  # noqa: E731
    loss, traffic = run(compute) if run is not None else compute()
    opt.step()
    return loss, traffic


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
    loop = TrainLoop(cfg, engine, examples, observer, should_stop)
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / "run_config.json").write_text(cfg.model_dump_json(indent=2))
    log.info("%d examples, %d steps per epoch, %d epochs", len(examples), loop.per_epoch, cfg.epochs)
    torch.manual_seed(cfg.seed)  # LoRA dropout draws: the same sequence on every path
    first_epoch = loop.resume(checkpoints) if checkpoints else 0
    _keep_lines(cfg.output / "metrics.jsonl", lambda row: row["step"] <= loop.step)
    _keep_lines(cfg.output / "kr_log.jsonl", lambda row: row["epoch"] <= first_epoch)
    with (cfg.output / "metrics.jsonl").open("a") as metrics, (cfg.output / "kr_log.jsonl").open("a") as kr_log, tqdm(
        total=loop.total, initial=loop.step, disable=not cfg.progress, unit="step", dynamic_ncols=True
    ) as bar:
        for epoch in range(first_epoch, cfg.epochs):
            losses = loop.run_epoch(epoch, metrics, bar)
            loop.end_epoch(epoch, losses, kr_log)
            if checkpoints is not None:
                loop.save_checkpoint(checkpoints, epoch)
    engine.save(cfg.output)
    return TrainResult(cfg.output, loop.step, loop.epoch_losses, time.perf_counter() - started)


class TrainLoop:
    """One run's optimizer, schedule and Kill-and-Revive state, stepped epoch by epoch by `train`."""

    def __init__(self, cfg: TrainConfig, engine: Engine, examples: list[Example],
                 observer: Callable[[dict], None] | None, should_stop: Callable[[], bool] | None) -> None:
        self.cfg, self.engine, self.examples = cfg, engine, examples
        self.observer, self.should_stop = observer, should_stop
        self.params = engine.parameters()
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.per_epoch = steps_per_epoch(len(examples), cfg.batch_size)
        self.total = self.per_epoch * cfg.epochs
        self.sched = get_cosine_schedule_with_warmup(self.opt, cfg.warmup_steps, self.total)
        self.layers = engine.num_layers
        self.meter = DeltaMeter(engine.params_by_layer())
        self.named = engine.named_parameters()
        self.step = 0  # optimizer steps taken
        self.epoch_losses: list[float] = []  # mean loss of every finished epoch
        self.active = set(range(self.layers))  # the modules the next epoch trains

    def resume(self, checkpoints: Path) -> int:
        """Continue from the newest good checkpoint under `checkpoints`, if any; the epochs it has done.

        Raises:
            ConfigError: the checkpoint was written for other LoRA tensors.
        """
        ck = checkpoint.load_latest(checkpoints)
        if ck is None:
            return 0
        ck.restore(self.named, self.opt)
        self.sched.load_state_dict(ck.state.scheduler)
        self.step, self.epoch_losses, self.active = ck.state.step, list(ck.state.epoch_losses), set(ck.state.active)
        self.engine.resume(ck.state.session_id, ck.state.kr_state)
        log.info("resuming from %s: epoch %d done, step %d", ck.folder.name, ck.state.epochs_done, self.step)
        return ck.state.epochs_done

    def _retrying(self, what: str) -> Callable[[Callable[[], T]], T]:
        """Runs a call to the engine, retried after UNAVAILABLE or DEADLINE_EXCEEDED (see _with_retry)."""
        return lambda fn: _with_retry(self.engine, what, fn, self.params)

    def run_epoch(self, epoch: int, metrics: IO[str], bar: tqdm) -> list[float]:
        """Every batch of epoch `epoch` (0-based), one optimizer step each; their losses.

        Raises:
            RemoteError: the cloud failed in a way a retry does not fix.
            Stopped: should_stop() returned True.
        """
        cfg, engine = self.cfg, self.engine
        engine.set_active(self.active, cfg.kill_mode)
        roles = layer_roles(self.active, self.layers, cfg.kill_mode)
        self.meter.start(self.active)
        losses = []
        pad = engine.tokenizer.pad_token_id
        for batch in epoch_batches(self.examples, cfg.batch_size, pad, cfg.seed, epoch, cfg.shuffle):
            t0 = time.perf_counter()
            loss, traffic = optimizer_step(engine, self.opt, batch, self.step, roles, self._retrying(f"step {self.step + 1}"))
            lr = self.sched.get_last_lr()[0]  # the rate this step used
            self.sched.step()
            losses.append(loss)
            self.step += 1
            self._record_step(epoch, batch, loss, lr, traffic, time.perf_counter() - t0, metrics, bar)
            if self.should_stop is not None and self.should_stop():
                raise Stopped(f"stopped at step {self.step}; the last checkpoint is epoch {epoch}")
        return losses

    def _record_step(self, epoch: int, batch: Batch, loss: float, lr: float, traffic: Traffic, seconds: float,
                     metrics: IO[str], bar: tqdm) -> None:
        """metrics.jsonl's row, the INFO line, the progress bar and the observer for the step just taken."""
        row = {
            "epoch": epoch + 1, "step": self.step, "loss": loss, "lr": lr, "step_s": round(seconds, 4),
            "tokens": int(batch.attention_mask.sum()), "batch_shape": list(batch.input_ids.shape),
            "bytes_to_cloud": traffic.bytes_up, "bytes_from_cloud": traffic.bytes_down,
            "payload_to_cloud": traffic.payload_up, "payload_from_cloud": traffic.payload_down,
            "active_modules": len(self.active),
        }
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()
        active = f"{len(self.active)}/{self.layers}"
        log.info("step=%d loss=%.4f active=%s up=%.1fMB down=%.1fMB %.2fs", self.step, loss, active,
                 traffic.bytes_up / 1e6, traffic.bytes_down / 1e6, seconds)
        bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", active=active)
        bar.update(1)
        if self.observer is not None:
            self.observer({"kind": "step", "total_steps": self.total, **row})

    def end_epoch(self, epoch: int, losses: list[float], kr_log: IO[str]) -> None:
        """Report each module's change to the scheduler and take its decision as the next active set.

        Raises:
            RemoteError: the cloud failed in a way a retry does not fix.
        """
        self.epoch_losses.append(sum(losses) / len(losses))
        deltas = self.meter.deltas()
        decision = self._retrying(f"epoch {epoch + 1} report")(lambda: self.engine.report_epoch(epoch + 1, deltas))
        kr_log.write(json.dumps(decision.to_json()) + "\n")
        kr_log.flush()
        log.info("epoch %d/%d mean loss %.4f; next active %d/%d (killed %s, revived %s)", epoch + 1, self.cfg.epochs,
                 self.epoch_losses[-1], len(decision.next_active), self.layers, list(decision.killed),
                 list(decision.revived))
        self.active = set(decision.next_active)
        if self.observer is not None:
            self.observer({"kind": "epoch", "loss": self.epoch_losses[-1], **decision.to_json()})

    def save_checkpoint(self, checkpoints: Path, epoch: int) -> None:
        """Everything needed to continue after epoch `epoch` (0-based), atomically."""
        checkpoint.save(checkpoints, self.named, self.opt, checkpoint.TrainerState(
            epochs_done=epoch + 1, step=self.step, active=sorted(self.active), epoch_losses=self.epoch_losses,
            scheduler=self.sched.state_dict(), kr_state=self.engine.scheduler_state(), session_id=self.engine.session_id))
