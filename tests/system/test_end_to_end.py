"""`dlora-cloud serve` and `dlora train` as separate OS processes, against `dlora local-train`.

Why the comparisons hold on any CPU (Intel or AMD, with or without AVX-512, arm64): split and
local-train compute the same float32 maths in other summation orders (test_golden_peft.py proves a
step equal to float32 precision). Without an optimizer in between that is all: logits agree to
~1e-6 relative. After AdamW steps it is not: AdamW divides by sqrt(v), so an element whose gradient
is itself round-off moves by up to c_t x lr_t in step t on its sign alone, and two correct runs may
end 2 x sum(c_t x lr_t) apart there (`adamw_bound`); that is the tolerance such a comparison gets,
from the lr column the runs log. Where a run can be
compared with the same computation instead (one session alone against two at once), it is compared
bit for bit: the same code on the same numbers in the same order gives the same bits on any one
machine (torch's CPU kernels are deterministic for a given shape and thread count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.remote_step import RemoteStack
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def start_cloud(model_dir: Path, redis_url: str) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "serve", "--model", str(model_dir), "--port", "0",
                             "--redis-url", redis_url],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("listening on "):
            return proc, line.split()[-1]
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("dlora-cloud did not start")


def adamw_bound(lrs: list[float], betas: tuple[float, float] = (0.9, 0.999)) -> float:
    """The most one element can differ between two AdamW runs (no weight decay) after steps at these lrs,
    whatever their gradients: 2 x sum(c_t x lr_t), where c_t bounds |m_hat / sqrt(v_hat)| at step t
    (Cauchy-Schwarz on m's and v's sums: c_1 = 1, c_8 = 1.03, c_32 = 1.34; eps only shrinks the step)."""
    b1, b2 = betas
    rho = b1 * b1 / b2
    total = 0.0
    for t, lr in enumerate(lrs, 1):
        c = (1 - b1) / (1 - b1**t) * ((1 - b2**t) / (1 - b2)) ** 0.5 * ((1 - rho**t) / (1 - rho)) ** 0.5
        total += c * lr
    return 2 * total


def dlora(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_client.app.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_train_against_cloud_process_equals_local_train(family, tiny_dir, data_file, tmp_path, redis_url):
    """The CLI through a cloud process trains what local-train trains: the first step's loss to float32
    precision (rel 1e-5: the same weights, the same batch), the adapters within what AdamW allows
    (`adamw_bound`), with every tensor trained."""
    model_dir = tiny_dir(family)
    proc, address = start_cloud(model_dir, redis_url)
    try:
        flags = ["--model", str(model_dir), "--data", str(data_file), "--epochs", "2", "--batch-size", "5",
                 "--lr", "1e-2", "--rank", "4", "--no-progress"]
        split = dlora("train", "--cloud", address, "--output", str(tmp_path / "split"), *flags)
        assert split.returncode == 0, split.stderr
        local = dlora("local-train", "--output", str(tmp_path / "local"), *flags)
        assert local.returncode == 0, local.stderr
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    a = load_file(str(tmp_path / "split" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "local" / "adapter_model.safetensors"))
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    local_rows = [json.loads(line) for line in (tmp_path / "local" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(local_rows) == 2 * 4  # 16 examples / batch 5 -> 4 steps per epoch
    assert rows[0]["loss"] == pytest.approx(local_rows[0]["loss"], rel=1e-5)
    assert [r["lr"] for r in rows] == [r["lr"] for r in local_rows]
    adamw_slack = adamw_bound([r["lr"] for r in rows])
    assert set(a) == set(b) and len(a) == 2 * 3 * (1 if family == "gpt2" else 2)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=adamw_slack, rtol=1e-5, msg=k)
        assert float(a[k].abs().sum()) > 0
    for key in ("epoch", "step", "loss", "lr", "step_s", "bytes_to_cloud", "bytes_from_cloud"):
        assert key in rows[0]
    assert rows[0]["bytes_to_cloud"] > 0 and rows[0]["bytes_from_cloud"] > 0
    assert "trained 8 steps" in split.stdout


def test_exported_adapter_gives_split_logits(tiny_dir, cloud, data_file, tmp_path):
    """PeftModel.from_pretrained(base, adapter) on the full model = the split model's logits: a forward
    pass, no optimizer, so float32 round-off only (~1e-6 of the O(1) logits); atol 1e-5, rtol 1e-4."""
    model_dir = tiny_dir("qwen2")
    address = cloud(model_dir)
    edge = EdgeModel(model_dir, ("q_proj", "v_proj", "o_proj"))
    adapter = LoraAdapter(edge, rank=4, alpha=8, dropout=0.0, seed=3)
    with torch.no_grad():
        for _, p in adapter.named_lora_parameters():
            p.normal_(0, 0.2)
    adapter.save(tmp_path / "adapter")
    ids = torch.randint(0, 256, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    link = CloudLink(LinkConfig(address=address, codec_up="float32", codec_down="float32"), edge)
    link.open()
    with torch.no_grad():
        hidden = RemoteStack(link, adapter).forward(edge.embed(ids), mask, [pb.FORWARD] * edge.num_layers)
    link.close()
    split_logits = edge.logits(hidden)
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(model_dir)), str(tmp_path / "adapter"))
    full.eval()
    with torch.no_grad():
        ref = full(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(split_logits[mask.bool()], ref[mask.bool()], atol=1e-5, rtol=1e-4)


def test_two_sessions_at_once_on_one_cloud(tiny_dir, cloud, data_file, tmp_path):
    """One cloud, two concurrent sessions with different targets and seeds: each ends with the very bits
    of the same session run alone (see the module docstring)."""
    import threading

    from common.config import TrainConfig
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.trainer import train

    model_dir = tiny_dir("llama")
    address = cloud(model_dir)
    cfgs = [TrainConfig(model=model_dir, data=data_file, output=tmp_path / f"s{i}", cloud=address, epochs=2,
                        batch_size=4, lr=1e-2, seed=i, targets=t, lora_dropout=0.0, progress=False)
            for i, t in enumerate([("q_proj", "v_proj"), ("down_proj",)])]
    engines = [SplitEngine(c) for c in cfgs]
    errors: list[BaseException] = []

    def run(cfg, engine):
        try:
            train(cfg, engine)
        except BaseException as e:  # noqa: BLE001 - surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(c, e)) for c, e in zip(cfgs, engines)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for cfg, engine in zip(cfgs, engines):
        engine.close()
        alone = cfg.model_copy(update={"output": cfg.output.with_name(cfg.output.name + "-alone")})
        engine = SplitEngine(alone)
        train(alone, engine)
        engine.close()
        a = load_file(str(cfg.output / "adapter_model.safetensors"))
        b = load_file(str(alone.output / "adapter_model.safetensors"))
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k
