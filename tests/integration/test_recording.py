"""`dlora-cloud serve --record DIR`: the curious operator's copy of what crosses in a session's first steps.

Off by default (nothing written, nothing copied); on, a real split session over real gRPC in both step
protocols leaves one 0600 safetensors file per micro-batch of its first N steps, in 0700 folders, holding
exactly what the device sent (the StepBegin tensor equals the device's embeddings bit for bit on a float32
wire); the reader (common/recording.py) refuses whatever is not that format, in one line.
"""

from __future__ import annotations

import json
import stat

import pytest
import torch
from safetensors.torch import save_file

import cloud_server.recorder as recorder
from cloud_server.cli import _parser, serve_config
from common.config import TrainConfig
from common.errors import ConfigError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.recording import (
    META_FIELDS,
    META_KEY,
    list_sessions,
    load_session,
    prepare_root,
    write_micro_batch,
)
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import collate, load_examples

STEPS = 2


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _session(address, model_dir, data_file, tmp_path, protocol="layerwise", micro_batches=1):
    """Train STEPS steps (an epoch report between them); returns (engine, {(step, mb): the micro-batch's rows})."""
    cfg = TrainConfig(
        model=model_dir,
        data=data_file,
        output=tmp_path / "out",
        cloud=address,
        progress=False,
        protocol=protocol,
        micro_batches=micro_batches,
    )
    split = SplitEngine(cfg)
    with torch.no_grad():  # non-zero B: a test must not pass on zeros
        for _, p in split.adapter.named_lora_parameters():
            p.normal_(0, 0.1)
    examples = load_examples(data_file, split.tokenizer, 64)
    sent = {}
    try:
        for step in range(STEPS):
            batch = collate(examples[4 * step : 4 * step + 4], split.tokenizer.pad_token_id)
            sent.update({(step, mb): part for mb, part in enumerate(batch.split(micro_batches))})
            split.train_step(batch, step, [pb.FORWARD_BACKWARD] * split.num_layers)
            if step == 0:
                split.report_epoch(1, {layer: 0.1 * (layer + 1) for layer in range(split.num_layers)})
    finally:
        split.close()
    return split, sent


def test_nothing_is_recorded_or_copied_by_default(tiny_dir, cloud, data_file, tmp_path, monkeypatch):
    copies = []
    monkeypatch.setattr(recorder, "_copy", lambda t: copies.append(t) or t)
    monkeypatch.chdir(tmp_path)
    model_dir = tiny_dir("llama")
    _session(cloud(model_dir, state_dir=tmp_path / "state"), model_dir, data_file, tmp_path)
    assert copies == []
    assert list(tmp_path.rglob("*.safetensors")) == []
    assert list(tmp_path.rglob("mb-*")) == []


@pytest.mark.parametrize("protocol,record_steps,micro_batches", [("layerwise", 4, 1), ("adapter", 1, 2)])
def test_a_recorded_session_holds_what_crossed(
    protocol, record_steps, micro_batches, tiny_dir, cloud, data_file, tmp_path
):
    model_dir = tiny_dir("llama")
    root = tmp_path / "rec"
    address = cloud(model_dir, record=root, record_steps=record_steps)
    split, sent = _session(address, model_dir, data_file, tmp_path, protocol, micro_batches)

    assert list_sessions(root) == [split.session_id]
    folder = root / split.session_id
    assert _mode(root) == 0o700 and _mode(folder) == 0o700
    assert all(_mode(p) == 0o600 for p in folder.iterdir())
    records = load_session(root, split.session_id)
    kept = min(record_steps, STEPS)
    assert [(r.step, r.micro_batch) for r in records] == [(s, mb) for s in range(kept) for mb in range(micro_batches)]

    edge, groups = split.edge, split.edge.groups
    for r in records:
        assert set(META_FIELDS) <= set(r.meta)
        assert {
            k: r.meta[k]
            for k in (
                "session_id",
                "protocol",
                "train",
                "epoch",
                "model_type",
                "num_layers",
                "first_layer",
                "fingerprint",
                "codec_up",
                "codec_down",
                "format",
            )
        } == {
            "session_id": split.session_id,
            "protocol": protocol,
            "train": True,
            "epoch": r.step,
            "model_type": "llama",
            "num_layers": 3,
            "first_layer": 0,
            "fingerprint": edge.fingerprint,
            "codec_up": "float32",
            "codec_down": "float32",
            "format": 1,
        }
        assert r.meta["groups"] == [list(g) for g in groups]
        lora_settings = (r.meta["rank"], r.meta["alpha"], r.meta["lora_dropout"])
        assert lora_settings == ((8, 16.0, 0.05) if protocol == "adapter" else (None, None, None))

        part = sent[(r.step, r.micro_batch)]
        with torch.no_grad():
            embeddings = edge.embed(part.input_ids)  # (b, t, E): what the device sent
        t = r.tensors
        assert t["step_begin"].dtype == torch.float32 and torch.equal(t["step_begin"], embeddings)
        assert t["attention_mask"].dtype == torch.uint8 and torch.equal(
            t["attention_mask"], part.attention_mask.to(torch.uint8)
        )
        b, n, h = embeddings.shape
        assert t["hidden"].shape == t["hidden_grad"].shape == (b, n, h)
        names = set(t)
        for layer in range(3):
            for g, group in enumerate(groups):
                if not group:
                    continue
                assert t[f"lora_x.{layer}.{g}"].shape[:2] == (b, n)
                if protocol == "layerwise":
                    for kind in ("lora_delta", "lora_grad_output", "lora_grad_input"):
                        assert f"{kind}.{layer}.{g}" in names
        if protocol == "adapter":
            for target, pair in zip(split.adapter.targets, split.adapter.pairs):
                name = f"{target.layer}.{target.path}"
                assert torch.equal(t[f"lora_A.{name}"], pair.A.detach()), name
                assert torch.equal(t[f"lora_B.{name}"], pair.B.detach()), name
            assert not any(k.startswith(("lora_delta", "lora_grad")) for k in names)
        else:
            assert not any(k.startswith(("lora_A", "lora_B")) for k in names)


def _one_line_error(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    assert "\n" not in str(e.value)
    return str(e.value)


SID = "0123456789abcdef0123456789abcdef"


def _meta(**kw) -> dict:
    meta = dict.fromkeys(META_FIELDS)
    return {**meta, "session_id": SID, "step": 0, "micro_batch": 0, **kw}


def test_the_reader_refuses_what_is_not_a_recording(tmp_path):
    root = prepare_root(tmp_path / "rec")
    write_micro_batch(root, _meta(), {"step_begin": torch.ones(1, 2, 4)})
    [r] = load_session(root, SID)
    assert r.meta["format"] == 1 and torch.equal(r.tensors["step_begin"], torch.ones(1, 2, 4))
    folder = root / SID

    (folder / "notes.txt").write_text("hello")
    assert "not a micro-batch file" in _one_line_error(load_session, root, SID)
    (folder / "notes.txt").unlink()

    (folder / "mb-000001-00.safetensors").write_bytes(b"\x80\x04not safetensors, maybe a pickle")
    assert "not a safetensors file" in _one_line_error(load_session, root, SID)

    save_file(
        {"x": torch.ones(1)},
        folder / "mb-000001-00.safetensors",
        metadata={META_KEY: json.dumps(_meta(step=1, format=2))},
    )
    assert "format 2" in _one_line_error(load_session, root, SID)

    save_file({"x": torch.ones(1)}, folder / "mb-000001-00.safetensors", metadata={"other": "1"})
    assert "metadata" in _one_line_error(load_session, root, SID)

    save_file(
        {"x": torch.ones(1)},
        folder / "mb-000001-00.safetensors",
        metadata={META_KEY: json.dumps({**_meta(step=7), "format": 1})},
    )
    assert "unlike its place" in _one_line_error(load_session, root, SID)
    (folder / "mb-000001-00.safetensors").unlink()

    (root / "stray.bin").write_bytes(b"x")
    assert "not a session's folder" in _one_line_error(list_sessions, root)
    _one_line_error(load_session, root, "../" + SID)


def test_serve_refuses_a_record_folder_others_may_read(tiny_dir, cloud, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    shared.chmod(0o755)
    assert "chmod 700" in _one_line_error(cloud, tiny_dir("llama"), record=shared)
    (tmp_path / "file").write_text("")
    assert "not a folder" in _one_line_error(prepare_root, tmp_path / "file")


def test_serve_flags(capsys, tmp_path):
    with pytest.raises(SystemExit):
        _parser().parse_args(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--record DIR" in out and "--record-steps" in out and "curious operator" in out
    args = _parser().parse_args(
        ["serve", "--model", str(tmp_path), "--record", str(tmp_path / "r"), "--record-steps", "2"]
    )
    config = serve_config(args)
    assert (config.record, config.record_steps) == (tmp_path / "r", 2)
    assert serve_config(_parser().parse_args(["serve", "--model", str(tmp_path)])).record is None
    args = _parser().parse_args(["serve", "--model", str(tmp_path), "--record-steps", "0"])
    assert "--record-steps=0" in _one_line_error(serve_config, args)
