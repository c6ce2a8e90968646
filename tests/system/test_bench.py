"""`dlora bench`: its workers (local-train and the split stepped in turn, bytes against the formula), its
flag errors, the whole command over an emulated link. (The OpenMP and malloc settings every dlora process
starts with: tests/unit/test_tuning.py.)

Byte counts are integers, compared exactly. Why `final_loss` agrees at abs 1e-4 (~2e-5 of the ~5.5 loss)
on any CPU (Intel or AMD, with or without AVX-512, arm64): it is the loss of the third step, after two
AdamW steps at lr 1e-3 from the same weights. The two paths' gradients agree to float32 precision
(test_golden_peft.py), so AdamW moves every element the same way to ~1e-6 relative, except elements
whose gradient is itself round-off: those may move up to 2 x (c_1 + c_2) x lr = 4e-3 apart on their
sign alone (tests/system/test_end_to_end.py, adamw_bound). The loss is flat along those to first order
(their gradient is zero but for round-off), so they change it only at second order, (4e-3)^2 x the
curvature, far below 1e-4 for this O(1)-curvature tiny model; the first-order part is float32
round-off, ~1e-6.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from common.errors import ConfigError
from common.model_files import load_config
from edge_client.tools.bench import check_targets
from edge_client.tools.bench_worker import Worker, attention_targets, run_paired, run_worker


def _spec(model_dir, **kw):  # type: ignore[no-untyped-def]
    return {"model": str(model_dir), "steps": 2, "batch_size": 2, "seq_len": 16, "kill_mode": "detached",
            "device": "cpu", "local_dtype": "float32", **kw}


def test_paired_split_matches_local_and_formula(tiny_dir, cloud):
    model = tiny_dir("llama")
    address = cloud(model)
    local, split = run_paired(_spec(model, name="local-train", budget=10**9),
                              _spec(model, name="split", cloud=address, wire="float32", budget=10**9, micro_batches=2))
    for r in (local, split):
        assert len(r["step_s"]) == 2 and r["median_step_s"] > 0 and r["cpu_s_per_step"] > 0
    assert split["final_loss"] == pytest.approx(local["final_loss"], abs=1e-4)  # the split trains as PEFT does
    assert split["payload_per_step"] == split["formula_per_step"] > 0
    assert local["payload_per_step"] == 0

    killed = run_worker(_spec(model, name="split int8", cloud=address, wire="int8", budget=2, micro_batches=1))
    assert (killed["active"], killed["layers"]) == (2, 3)
    assert killed["payload_per_step"] == killed["formula_per_step"] < split["formula_per_step"] / 3

    mixed = run_worker(_spec(model, name="split int8/bfloat16", cloud=address, wire="int8/bfloat16", budget=10**9,
                             int8_block_size=100))  # one codec per direction, scales every 100 elements
    assert mixed["payload_per_step"] == mixed["formula_per_step"]
    assert split["formula_per_step"] / 4 < mixed["formula_per_step"] < split["formula_per_step"] / 2


@pytest.mark.parametrize("family,targets", [("gpt2", ("c_attn",)), ("bloom", ("query_key_value",))])
def test_bench_trains_any_family_on_its_attention_input_by_default(tiny_dir, cloud, family, targets):
    model = tiny_dir(family)
    assert attention_targets(load_config(model).model_type) == targets
    local, split = run_paired(_spec(model, name="local-train", budget=10**9),
                              _spec(model, name="split", cloud=cloud(model), wire="float32", budget=10**9))
    assert split["final_loss"] == pytest.approx(local["final_loss"], abs=1e-4)  # the split trains as PEFT does
    assert split["payload_per_step"] == split["formula_per_step"] > 0


def test_bench_targets_and_seq_len_checked_against_the_model(tiny_dir, tmp_path):
    llama = tiny_dir("llama")
    assert attention_targets("llama") == ("q_proj", "k_proj", "v_proj")
    assert check_targets("llama", "q_proj, o_proj") == ("q_proj", "o_proj")
    with pytest.raises(ConfigError, match="'c_attn' names no LoRA-able module of a llama decoder layer; use some of: q_proj"):
        check_targets("llama", "q_proj,c_attn")
    with pytest.raises(ConfigError, match="unsupported architecture 't5'"):
        attention_targets("t5")
    r = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "bench", "--model", str(tiny_dir("gpt2")),
                        "--targets", "q_proj"], capture_output=True, text=True,
                       env={**os.environ, "DLORA_CACHE": str(tmp_path)}, timeout=120)
    assert r.returncode == 2 and "names no LoRA-able module of a gpt2 decoder layer" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not any(tmp_path.iterdir())  # one line, no cloud started
    r = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "bench", "--model", str(llama), "--seq-len", "100000"],
                       capture_output=True, text=True, env={**os.environ, "DLORA_CACHE": str(tmp_path)}, timeout=120)
    assert r.returncode == 2 and "--seq-len=100000: the model has" in r.stderr and not any(tmp_path.iterdir()), r.stderr


@pytest.mark.parametrize("flags,message", [
    (["--wires", "int8/fp8"], "--wires: 'int8/fp8' is not one of"),
    (["--micro-batches", "1,0"], "--micro-batches: '1,0' is not a comma-separated list of positive integers"),
    (["--int8-block-size", "0"], "--int8-block-size=0: must be >= 1"),
    (["--steps", "0"], "--steps=0: must be >= 1"),
    (["--seq-len", "-1"], "--seq-len=-1: must be >= 1"),
    (["--budgets", "all,L/0"], "--budgets: 'L/0' is not all, L/N or a number of layers"),
    pytest.param(["--cloud-device", "cuda"], "--cloud-device cuda: no CUDA device is visible",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is visible")),
])
def test_bench_refuses_bad_flags_before_any_work(flags, message, tmp_path):
    r = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "bench", *flags], capture_output=True, text=True,
                       env={**os.environ, "DLORA_CACHE": str(tmp_path)}, timeout=120)
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not any(tmp_path.iterdir())  # no model written, no cloud started


def test_worker_failure_names_the_configuration(tmp_path):
    worker = Worker(_spec(tmp_path / "missing", name="split float32", budget=1))
    with pytest.raises(ConfigError, match="bench configuration split float32 failed: .*does not exist"):
        worker.ready()
    worker.kill()


def test_worker_asked_past_its_batches_says_so(tiny_dir):
    worker = Worker(_spec(tiny_dir("llama"), name="local-train", budget=10**9, steps=1))
    try:
        worker.ready()
        worker.step()
        with pytest.raises(ConfigError, match="cannot do 'step' \\(0 batches left\\)"):
            worker.step()
    finally:
        worker.kill()


def test_bench_over_an_emulated_asymmetric_link_says_which_link_it_used(tiny_dir, tmp_path):
    """The whole command on a tiny model: a cloud child, the link (kernel netem where the machine has it,
    else the user-space relay), a local-train and a split worker, the JSON and the Markdown. With --tls: the
    cloud serves TLS only (a `tls init` set naming the address the device dials), so the split row proves the
    worker trained over TLS."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "bench", "--model", str(tiny_dir("llama")),
                        "--wires", "int8/bfloat16", "--budgets", "all", "--steps", "1", "--batch-size", "2",
                        "--seq-len", "16", "--wan", "1ms,200mbit/400mbit", "--json", str(out),
                        "--markdown", str(tmp_path / "bench.md"), "--no-progress", "--tls"],
                       capture_output=True, text=True, env={**os.environ, "DLORA_CACHE": str(tmp_path / "cache")},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads(out.read_text())
    link = result["meta"]["link"]
    assert link.startswith("1ms,200mbit/400mbit ") and ("kernel netem" in link)  # either way it says what netem did
    assert link.endswith(", over TLS")
    split = [row for row in result["rows"] if row["name"] == "split"]
    assert [row["wire"] for row in split] == ["int8/bfloat16"]
    assert split[0]["payload_per_step"] == split[0]["formula_per_step"] > 0
    assert "| split | layerwise | int8/bfloat16 |" in (tmp_path / "bench.md").read_text()


def test_bench_measures_both_protocols_in_one_run(tiny_dir, tmp_path):
    """--protocols layerwise,adapter: one row per protocol and M, each paired with its own local-train, each
    row's measured payload equal to its own protocol's formula, and adapter's the smaller."""
    out = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, "-m", "edge_client.app.cli", "bench", "--model", str(tiny_dir("llama")),
                        "--protocols", "layerwise,adapter", "--wires", "int8", "--budgets", "all,1",
                        "--micro-batches", "1,2", "--steps", "1", "--batch-size", "4", "--seq-len", "16",
                        "--json", str(out), "--no-progress"],
                       capture_output=True, text=True, env={**os.environ, "DLORA_CACHE": str(tmp_path / "cache")},
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    split = [row for row in json.loads(out.read_text())["rows"] if row["name"] == "split"]
    assert [(row["protocol"], row["active"], row["micro_batches"]) for row in split] == [
        (p, a, m) for p in ("layerwise", "adapter") for a in (3, 1) for m in (1, 2)]
    for row in split:
        assert row["payload_per_step"] == row["formula_per_step"] > 0, (row["protocol"], row["active"], row["micro_batches"])
    by = {(row["protocol"], row["active"], row["micro_batches"]): row["payload_per_step"] for row in split}
    assert all(by[("adapter", a, m)] < by[("layerwise", a, m)] for a in (3, 1) for m in (1, 2))
    assert "| split | adapter | int8 |" in r.stdout
