"""A cloud SIGKILLed in the middle of an adapter-protocol run and started again: the run ends as if nothing happened.

Two OS processes: `dlora-cloud serve` as a child (its embedded Redis on a --state-dir that outlives it, on a
port that stays the same) and the device training in this process (SplitEngine + the trainer, as `dlora
train --protocol adapter` runs them). After the second step of epoch 2 the cloud is SIGKILLed and a new one
started on the same port and state dir; the device's next step fails with UNAVAILABLE, its retry reconnects
to the same session (continued from Redis), on a new stream whose weight cache is empty, so it sends every
module's weights again, the killed modules' too.

Why bit for bit: the restart changes which messages carry the weights, not a single number. The killed
modules' weights reach the new cloud unchanged (float32 on the wire, copied exactly); the retried step redoes
the same float32 operations in the same order on the same numbers in both processes (the dropout masks are
keyed by (seed, step, micro-batch, layer, target), not drawn from a generator whose state the restart could
move; the two micro-batches' gradients are summed in micro-batch order; torch's CPU kernels are
deterministic for a given shape and thread count, and both runs use the same cloud command line on the same
machine). The failed attempt changed nothing: the optimizer had not stepped and the retry clears the
gradients. So the adapter, every loss and every Kill-and-Revive decision equal the uninterrupted run's
exactly; any tolerance would hide a step computed twice or with other weights.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from common.config import TrainConfig
from edge_client.remote.split_engine import SplitEngine
from edge_client.tools.cloud_process import CloudProcess
from edge_client.train.trainer import train

STEPS_PER_EPOCH = 4  # 16 examples, batches of 4
KILL_AFTER = STEPS_PER_EPOCH + 2  # the second step of epoch 2: the killed modules' weights are already held
RANK, LAYERS, KILLED = 8, 3, 2  # --budget 1 of 3 layers after the warm-up epoch
KILLED_BYTES = 4 * KILLED * RANK * ((32 + 32) + (32 + 16))  # float32 A and B of q (32 -> 32) and v (32 -> 16)


def _data(path: Path) -> Path:
    """16 texts of one length, so that every batch has the same shape and a step's bytes differ only by weights."""
    rows = [{"text": f"Sample {i:02d} says: the sky is {'blue' if i % 2 else 'gray'}."} for i in range(16)]
    assert len({len(r["text"]) for r in rows}) == 1
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(out: Path, name: str) -> list[dict]:
    return [json.loads(line) for line in (out / name).read_text().splitlines()]


def test_a_cloud_sigkilled_mid_run_restarts_and_the_adapter_is_the_uninterrupted_ones(tiny_dir, tmp_path, caplog):
    """Adapter protocol, 3 epochs, 2 micro-batches, LoRA dropout 0.1, Kill-and-Revive budget 1 of 3 layers
    (detached): the cloud SIGKILLed after step 6 and started again on its port and state dir. The device
    retries step 7 once, on the same session; step 7 sends the killed modules' weights again (its
    bytes_to_cloud exceed step 6's by their float32 bytes, while the uninterrupted run's two steps are equal),
    and the adapter, the losses and the Kill-and-Revive log equal the uninterrupted run's bit for bit (see the
    module docstring)."""
    model_dir = tiny_dir("llama", layers=LAYERS)
    data = _data(tmp_path / "train.jsonl")
    state = tmp_path / "cloud-state"
    flags = ["--state-dir", str(state), "--log-level", "WARNING"]
    clouds = [CloudProcess(model_dir, extra=flags)]
    port = clouds[0].address.rsplit(":", 1)[1]

    def config(name: str) -> TrainConfig:
        return TrainConfig(model=model_dir, data=data, output=tmp_path / name, cloud=clouds[0].address,
                           protocol="adapter", weights_wire="float32", epochs=3, batch_size=4, micro_batches=2,
                           rank=RANK, alpha=16, lora_dropout=0.1, lr=1e-2, seed=7, warmup_epochs=1, budget=1,
                           kill_mode="detached", progress=False, reply_timeout_s=60)

    def run(cfg: TrainConfig, observer=None) -> None:
        engine = SplitEngine(cfg)
        try:
            session = engine.session_id
            train(cfg, engine, observer=observer)
            assert engine.session_id == session  # the retry resumed the session, it did not open another
        finally:
            engine.close()

    def restart(row: dict) -> None:
        """After step KILL_AFTER: SIGKILL the cloud, start another on its port and state dir."""
        if row["kind"] != "step" or row["step"] != KILL_AFTER:
            return
        clouds[-1].proc.send_signal(signal.SIGKILL)
        clouds[-1].proc.wait(timeout=30)
        clouds.append(CloudProcess(model_dir, extra=[*flags, "--port", port]))
        assert clouds[-1].address == clouds[0].address

    try:
        run(config("whole"))
        with caplog.at_level(logging.WARNING, logger="edge_client.train.trainer"):
            run(config("restarted"), restart)
    finally:
        for cloud in clouds:
            cloud.stop()
    assert len(clouds) == 2
    retries = [r.getMessage() for r in caplog.records if "retrying" in r.getMessage()]
    assert len(retries) == 1 and retries[0].startswith(f"step {KILL_AFTER + 1}: "), retries  # one retry, of step 7

    whole, restarted = tmp_path / "whole", tmp_path / "restarted"
    a = load_file(str(whole / "adapter_model.safetensors"))
    b = load_file(str(restarted / "adapter_model.safetensors"))
    assert set(a) == set(b) and len(a) == 2 * 2 * LAYERS
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert _rows(whole, "kr_log.jsonl") == _rows(restarted, "kr_log.jsonl")
    kr = _rows(whole, "kr_log.jsonl")
    assert [len(d["next_active"]) for d in kr] == [1, 1, 1]  # epochs 2 and 3 ran with 2 layers killed

    rows = {name: {r["step"]: r for r in _rows(out, "metrics.jsonl")} for name, out in [("whole", whole),
                                                                                       ("restarted", restarted)]}
    assert len(rows["whole"]) == len(rows["restarted"]) == 3 * STEPS_PER_EPOCH
    for step, row in rows["whole"].items():
        assert rows["restarted"][step]["loss"] == row["loss"], step
    up = {name: {s: r["bytes_to_cloud"] for s, r in steps.items()} for name, steps in rows.items()}
    after = KILL_AFTER + 1
    assert up["whole"][after] == up["whole"][KILL_AFTER]  # the killed modules are held: only the trained go up
    extra = up["restarted"][after] - up["restarted"][KILL_AFTER]
    # + their module numbers and lengths, and a StepWeights header per killed layer (weights go layer by layer)
    assert KILLED_BYTES <= extra <= KILLED_BYTES + 64 * (KILLED + 1), (extra, KILLED_BYTES)
    print(f"\nstep {after} after the restart: {up['restarted'][after]} bytes up, step {KILL_AFTER}: "
          f"{up['restarted'][KILL_AFTER]} (+{extra}: the {KILLED * 2} killed modules' weights again)")

