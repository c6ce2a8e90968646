"""`dlora attack` end to end on a tiny model: a real recording cloud process, a real victim session and a
real shadow session over gRPC, the attacks, report.json and report.md. Positive controls (no defence: the
input embeddings decode, the labels come back), negative controls (a shuffled table decodes nothing), the
attacker's text disjoint from the victim's, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from common.config import AttackConfig, TrainConfig
from common.errors import ConfigError
from common.recording import list_sessions, load_session
from edge_client.app.cli import main
from edge_client.attack.harness import split_texts
from edge_client.attack.probes import nearest_row, trr
from edge_client.train.model_parts import EdgeModel

WORDS = "apple river stone cloud green quick silent paper window garden tiger music orange planet yellow winter".split()


@pytest.fixture(scope="module")
def texts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The victim's prompt/completion lines and the attacker's public text lines (other words' orders)."""
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("attack-data")
    victim, public = folder / "victim.jsonl", folder / "public.jsonl"
    victim.write_text("".join(json.dumps({"prompt": "Q: " + " ".join(rng.choices(WORDS, k=6)) + "?\nA:",
                                          "completion": " " + rng.choice(WORDS)}) + "\n" for _ in range(40)))
    public.write_text("".join(json.dumps({"text": " ".join(rng.choices(WORDS, k=12))}) + "\n" for _ in range(80)))
    return victim, public


def _attack(model: Path, texts: tuple[Path, Path], out: Path, *extra: str) -> dict:
    victim, public = texts
    rc = main(["attack", "--model", str(model), "--data", str(victim), "--public", str(public), "--output", str(out),
               "--victim-items", "16", "--heldout-items", "8", "--public-items", "64", "--epochs", "2",
               "--batch-size", "8", "--lr", "1e-2", "--mlp-steps", "30", "--no-progress", *extra])
    assert rc == 0
    assert (out / "report.md").read_text().startswith("# What the cloud recovered")
    return json.loads((out / "report.json").read_text())


def test_no_defence_gives_everything_away_and_a_shuffled_table_nothing(tiny_dir, texts, tmp_path) -> None:
    """Positive controls: the input embeddings decode by nearest row (>= 0.95, exact here), the labels come back
    from HiddenGrad, every module of the adapter is seen. Negative control: the same recorded rows against the
    embedding table with its rows shuffled decode to about nothing."""
    model = tiny_dir("llama")
    report = _attack(model, texts, tmp_path / "out", "--keep-recording")
    assert report["tensors"]["step_begin"]["nearest"] >= 0.95
    assert report["worst"]["trr"] >= 0.95
    assert report["labels"]["labels"] >= 0.95
    assert report["averaged"]["matched"] == 1.0 and report["averaged"]["nearest"] >= 0.95
    assert report["adapter"]["modules_seen"] == report["adapter"]["modules"]
    assert report["defence"]["protocol"] == "layerwise"
    # the tokens a guess from the position alone misses ("Q: " is every prompt's start) come back all the same
    assert report["prior"] < 0.5 and report["worst_content"][0] >= 0.95

    rec = tmp_path / "out" / "recording"
    victim = load_session(rec, list_sessions(rec)[0])  # a session id sorts either way: check both
    rows = [m.tensors["step_begin"][m.tensors["attention_mask"].bool()] for m in victim]
    x = torch.cat(rows)
    table = EdgeModel(model).embedding.weight.detach()
    truth = nearest_row(x, table)  # the true tokens (the positive control holds)
    perm = torch.roll(torch.arange(table.shape[0]), 1)
    assert trr(nearest_row(x, table[perm]), truth) <= 0.05


def test_adapter_protocol_shows_the_weights(tiny_dir, texts, tmp_path) -> None:
    """In the adapter protocol the weights cross as they are: every module is seen, the stolen adapter is the one
    the last step ran with exactly, and it carries the fine-tuning's gain (more than half of it: the final adapter
    has one update more)."""
    report = _attack(tiny_dir("llama"), texts, tmp_path / "out", "--protocol", "adapter")
    assert report["adapter"]["modules_seen"] == report["adapter"]["modules"]
    assert report["adapter"]["loss_victim"] < report["adapter"]["loss_base"]
    assert report["adapter"]["recovery"] > 0.5
    # the float32 weights that crossed are the ones the last step ran with, bit for bit: the same held-out loss
    assert report["adapter"]["loss_stolen"] == report["adapter"]["loss_at_step"]
    assert not (tmp_path / "out" / "recording").exists()  # removed unless --keep-recording


def test_noise_is_measured_and_averaging_over_epochs_is_tried(tiny_dir, texts, tmp_path) -> None:
    """With noise far above the clipped rows (sigma 2, clip 1: noise norm ~2 sqrt(E) vs 1), one view's nearest
    row falls well below the no-defence 100%; the report carries the averaged attack next to it."""
    report = _attack(tiny_dir("llama"), texts, tmp_path / "out", "--privacy-noise", "2", "--privacy-clip", "1")
    assert report["tensors"]["step_begin"]["nearest"] < 0.5
    assert report["defence"]["privacy_noise"] == 2.0 and report["defence"]["privacy_clip"] == 1.0
    assert report["averaged"]["groups"] > 0 and "nearest" in report["averaged"]


def test_gradient_noise_on_the_loss_rows_hides_the_labels(tiny_dir, texts, tmp_path) -> None:
    """--grad-noise-rows loss noises exactly the rows the label attack reads (noise norm ~2e-3 sqrt(32) ~ 0.011
    against rows clipped to 1e-3): the labels that come back in full without a defence mostly do not."""
    report = _attack(tiny_dir("llama"), texts, tmp_path / "out", "--grad-noise", "2", "--grad-clip", "1e-3",
                     "--grad-noise-rows", "loss")
    assert report["defence"]["grad_noise_rows"] == "loss" and report["defence"]["grad_noise"] == 2.0
    assert report["labels"]["rows"] > 0 and report["labels"]["labels"] < 0.5


def test_the_attackers_text_is_disjoint_from_the_victims(texts, tmp_path) -> None:
    """Public lines that the victim's file also holds are dropped before the shadow session; none is left."""
    victim, public = texts
    mixed = tmp_path / "mixed.jsonl"
    lines = victim.read_text().splitlines()
    mixed.write_text("\n".join(lines[:5] + public.read_text().splitlines()) + "\n")
    cfg = TrainConfig(model=tmp_path, data=victim, output=tmp_path / "v")
    v, h, p = split_texts(cfg, AttackConfig(public=mixed, victim_items=16, heldout_items=8), tmp_path)
    private = {json.dumps(json.loads(x)) for f in (v, h) for x in f.read_text().splitlines()}
    shadow = {json.dumps(json.loads(x)) for x in p.read_text().splitlines()}
    assert private and shadow and not private & shadow
    only_victim = tmp_path / "only.jsonl"
    only_victim.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="--public"):
        split_texts(cfg, AttackConfig(public=only_victim, victim_items=16, heldout_items=8), tmp_path)


@pytest.mark.parametrize("flags, message", [
    (["--public", "/nonexistent.jsonl"], "--public /nonexistent.jsonl: no such file"),
    (["--victim-items", "1"], "--victim-items=1"),
    (["--privacy-noise", "1"], "--privacy-noise=1 needs --privacy-clip"),
    (["--privacy-noise", "-1", "--privacy-clip", "1"], "--privacy-noise=-1"),
    (["--victim-items", "40", "--heldout-items", "8"], "need 48"),
])
def test_bad_input_is_one_line_before_any_work(flags, message, tiny_dir, texts, tmp_path, capsys) -> None:
    victim, public = texts
    base = {"--public": str(public)}
    argv = ["attack", "--model", str(tiny_dir("llama")), "--data", str(victim), "--output", str(tmp_path / "o")]
    given = dict(zip(flags[::2], flags[1::2]))
    argv += [x for k, v in {**base, **given}.items() for x in (k, v)]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "victim").exists()
