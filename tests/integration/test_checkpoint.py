"""End-of-epoch checkpoints: a stopped run continues to exactly the uninterrupted result.

Why bit equality holds on any CPU: the resumed run repeats the uninterrupted run's float operations
on the same numbers, in the same process and the same order: the checkpoint restores the weights
and the AdamW state bit for bit (safetensors), the schedule, the data order and the RNG (so the
LoRA dropout draws too). torch's CPU kernels are deterministic for a given shape and thread count,
so no CPU can make the two runs differ; a tolerance would only hide a state the checkpoint lost.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from common.config import TrainConfig
from edge_client.remote.split_engine import SplitEngine
from edge_client.train import checkpoint
from edge_client.train.engines import LocalEngine
from edge_client.train.trainer import Stopped, train


def _cfg(model_dir, data_file, out, address=None) -> TrainConfig:
    return TrainConfig(model=model_dir, data=data_file, output=out, cloud=address, epochs=4, budget=2, revive=1,
                       batch_size=4, lr=3e-2, lora_dropout=0.1, progress=False)


@pytest.mark.parametrize("kind", ["split", "local"])
def test_stop_and_resume_equals_uninterrupted(kind, tiny_dir, cloud, data_file, tmp_path):
    model_dir = tiny_dir("llama", layers=4)
    address = cloud(model_dir) if kind == "split" else None
    make = (lambda c: SplitEngine(c)) if kind == "split" else (lambda c: LocalEngine(c))
    ref = _cfg(model_dir, data_file, tmp_path / "ref", address)
    train(ref, make(ref))
    cfg = _cfg(model_dir, data_file, tmp_path / "run", address)
    ckpts = tmp_path / "ckpt"
    calls = iter(range(100))
    with pytest.raises(Stopped):  # 4 steps per epoch: stop in the middle of epoch 3
        train(cfg, make(cfg), ckpts, should_stop=lambda: next(calls) == 9)
    assert sorted(p.name for p in ckpts.glob("epoch-*")) == ["epoch-0001", "epoch-0002"]
    events = []
    train(cfg, make(cfg), ckpts, observer=events.append)
    assert events[0]["kind"] == "step" and events[0]["step"] == 9  # resumed after epoch 2 (8 steps)
    a = load_file(str(ref.output / "adapter_model.safetensors"))
    b = load_file(str(cfg.output / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("metrics.jsonl", "kr_log.jsonl"):
        ref_rows = [json.loads(x) for x in (ref.output / name).read_text().splitlines()]
        rows = [json.loads(x) for x in (cfg.output / name).read_text().splitlines()]
        assert len(rows) == len(ref_rows)
        for r0, r1 in zip(ref_rows, rows):
            for key in ("loss", "deltas", "next_active"):
                assert r1.get(key) == r0.get(key), (name, key)


def test_corrupt_checkpoint_falls_back_to_the_previous(tiny_dir, data_file, tmp_path, caplog):
    model_dir = tiny_dir("llama", layers=4)
    cfg = _cfg(model_dir, data_file, tmp_path / "run")
    calls = iter(range(100))
    with pytest.raises(Stopped):
        train(cfg, LocalEngine(cfg), tmp_path / "ckpt", should_stop=lambda: next(calls) == 13)
    newest = tmp_path / "ckpt" / "epoch-0003"
    data = (newest / "lora.safetensors").read_bytes()
    (newest / "lora.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    ck = checkpoint.load_latest(tmp_path / "ckpt")
    assert ck is not None and ck.folder.name == "epoch-0002"
    assert "epoch-0003" in caplog.text and "truncated or corrupt" in caplog.text
    (tmp_path / "ckpt" / "epoch-0002" / "manifest.json").write_text("{not json")
    ck = checkpoint.load_latest(tmp_path / "ckpt")
    assert ck is None  # only two checkpoints are kept, and both are damaged now
