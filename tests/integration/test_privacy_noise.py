"""The noise defences in a real split step (edge_client/train/privacy.py, wired in SplitEngine.train_step),
and their flags on the command line.

Exactness: with the flags off the device sends the very tensors it sent before (the same objects),
so a step's loss and every LoRA gradient are bit for bit a run without them. Two runs of one
configuration against one in-process cloud are themselves bit for bit equal here (M = 1, the same
buffers each time), which the first test also asserts, so the comparison is fair.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from recording_hop import recording_hop

from common.config import TrainConfig
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.app.cli import main as dlora_main
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.data import Batch, collate, load_examples, loss_rows
from edge_client.train.privacy import clip_and_noise, noise_key


def _step(cfg: TrainConfig, batch_of: int = 6, step: int = 0) -> tuple[float, list[torch.Tensor], SplitEngine, Batch]:
    """One training step from non-zero LoRA weights (seeded, so every run starts alike): loss, LoRA grads."""
    engine = SplitEngine(cfg)
    try:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for _, p in engine.adapter.named_lora_parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        batch = collate(load_examples(cfg.data, engine.tokenizer, 64)[:batch_of], engine.tokenizer.pad_token_id)
        loss, _ = engine.train_step(batch, step, [pb.FORWARD_BACKWARD] * engine.num_layers)
        grads = [p.grad.detach().clone() for p in engine.parameters()]  # type: ignore[union-attr]
    finally:
        engine.close()
    assert all(bool(g.any()) for g in grads), "a zero gradient proves nothing"
    return loss, grads, engine, batch


def _config(model_dir: Path, data_file: Path, tmp_path: Path, cloud: str, **kw: Any) -> TrainConfig:
    return TrainConfig(model=model_dir, data=data_file, output=tmp_path, cloud=cloud, progress=False, rank=4, **kw)


@pytest.mark.parametrize("protocol", ["layerwise", "adapter"])
def test_sigma_0_is_exactly_no_noise(protocol, tiny_dir, cloud, data_file, tmp_path):
    """sigma 0 without a clip (the defaults, and given explicitly), and sigma 0 with a clip no row reaches
    (every row times exactly 1.0): the loss and every LoRA gradient bit for bit a run without the flags."""
    model_dir = tiny_dir("llama")
    address = cloud(model_dir)
    ref_loss, ref_grads, _, _ = _step(_config(model_dir, data_file, tmp_path, address, protocol=protocol))
    for kw in [
        {},
        {"privacy_noise": 0.0, "grad_noise": 0.0, "noise_seed": 3},
        {"privacy_clip": 1e30, "grad_clip": 1e30},
    ]:
        loss, grads, _, _ = _step(_config(model_dir, data_file, tmp_path, address, protocol=protocol, **kw))
        assert loss == ref_loss, kw
        for g, r in zip(grads, ref_grads):
            assert torch.equal(g, r), kw


def test_the_cloud_receives_the_noised_tensors_and_not_the_clean_ones(tiny_dir, cloud, data_file, tmp_path):
    """Recorded on a real gRPC hop (float32 wire): the StepBegin carries exactly the clipped and noised
    embeddings, keyed by (noise seed, step, micro-batch, inputs); the clean embeddings' bytes do not
    cross; nearest-row inversion, which reads every token off the clean embeddings, mostly fails."""
    model_dir = tiny_dir("llama")
    sigma, clip, step = 1.0, 1.0, 5
    with recording_hop(cloud(model_dir)) as (proxy, address):
        cfg = _config(
            model_dir,
            data_file,
            tmp_path,
            address,
            privacy_noise=sigma,
            privacy_clip=clip,
            grad_noise=sigma,
            grad_clip=0.01,
            noise_seed=99,
        )
        _, _, engine, batch = _step(cfg, step=step)
    begin = proxy.first("step_begin")
    sent = torch.frombuffer(bytearray(begin.embeddings.data), dtype=torch.float32).reshape(*batch.input_ids.shape, -1)
    with torch.no_grad():
        clean = engine.edge.embed(batch.input_ids)  # (B, T, E)
        expected = clip_and_noise(clean, batch.attention_mask, sigma, clip, noise_key(99, step, 0, 0))
    assert torch.equal(sent, expected)
    stream = b"".join(proxy.seen)
    real = batch.attention_mask.bool()
    for row in clean[real][:8]:
        assert row.numpy().tobytes() not in stream
    table = engine.edge.embedding.weight.detach()  # (V, E), public
    recovered = lambda x: (torch.cdist(x[real], table).argmin(-1) == batch.input_ids[real]).float().mean()  # noqa: E731
    assert float(recovered(clean)) == 1.0
    assert float(recovered(sent)) < 0.2


@pytest.mark.parametrize("rows", ["all", "loss"])
def test_grad_noise_rows_on_the_wire(rows, tiny_dir, cloud, data_file, tmp_path):
    """Recorded on a real gRPC hop: under --grad-noise-rows loss the HiddenGrad's non-loss rows (prompt and
    padding) cross as exact zeros and every loss row is noised; under all, every real row is noised, so a
    zero row gives no prompt away."""
    model_dir = tiny_dir("llama")
    with recording_hop(cloud(model_dir)) as (proxy, address):
        cfg = _config(model_dir, data_file, tmp_path, address, grad_noise=1.0, grad_clip=0.01,
                      grad_noise_rows=rows, noise_seed=5)
        _, _, _, batch = _step(cfg)
    msg = proxy.first("hidden_grad")
    sent = torch.frombuffer(bytearray(msg.grad.data), dtype=torch.float32).reshape(*batch.input_ids.shape, -1)
    zero = (sent == 0).all(-1)  # (B, T)
    scored = loss_rows(batch.labels)
    real = batch.attention_mask.bool()
    assert bool(scored.any()) and bool((real & ~scored).any())
    assert not bool(zero[scored].any())
    assert bool(zero[~real].all())
    assert bool(zero[real & ~scored].all()) == (rows == "loss")
    assert not bool(zero[real & ~scored].any()) or rows == "loss"


def test_gradient_noise_changes_training_not_the_forward_and_is_reproducible(tiny_dir, cloud, data_file, tmp_path):
    """--grad-noise alone: the loss (forward) bit for bit the clean run's, the gradients not; the same
    --noise-seed gives the same gradients again, another seed, another step or the input noise others."""
    model_dir = tiny_dir("llama")
    address = cloud(model_dir)

    def run(step: int = 0, **kw: Any) -> tuple[float, list[torch.Tensor]]:
        loss, grads, _, _ = _step(_config(model_dir, data_file, tmp_path, address, **kw), step=step)
        return loss, grads

    clean_loss, clean = run()
    knobs = {"grad_noise": 1.0, "grad_clip": 1e-3, "noise_seed": 1}
    loss, noised = run(**knobs)
    assert loss == clean_loss
    assert all(not torch.equal(g, c) for g, c in zip(noised, clean))
    again_loss, again = run(**knobs)
    assert again_loss == loss and all(torch.equal(g, a) for g, a in zip(noised, again))
    _, other_seed = run(**{**knobs, "noise_seed": 2})
    _, other_step = run(step=1, **knobs)
    for other in (other_seed, other_step):
        assert all(not torch.equal(g, o) for g, o in zip(noised, other))
    input_loss, _ = run(privacy_noise=0.5, privacy_clip=1.0, noise_seed=1)
    assert input_loss != clean_loss


# ---------------------------------------------------------------- the command line


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """The exit code and the one line of stderr that starts with "dlora" (argparse's own errors exit via
    SystemExit after its usage lines)."""
    try:
        code = dlora_main(argv)
    except SystemExit as e:
        code = int(e.code or 0)
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("dlora")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def _argv(command: str, tmp_path: Path, data_file: Path, *extra: str) -> list[str]:
    """A command whose model folder does not exist and whose cloud does not listen: nothing may touch either."""
    cloud = ["--cloud", "127.0.0.1:1"] if command == "train" else []
    return [command, *cloud, "--model", str(tmp_path / "nope"), "--data", str(data_file),
            "--output", str(tmp_path / "o"), "--no-progress", *extra]


@pytest.mark.parametrize(
    "extra,words",
    [
        (["--privacy-noise", "0.5"], "dlora: error: --privacy-noise=0.5 needs --privacy-clip C"),
        (["--grad-noise", "2"], "dlora: error: --grad-noise=2 needs --grad-clip C"),
        (["--privacy-noise", "-1"], "dlora: error: --privacy-noise=-1.0: Input should be greater than or equal to 0"),
        (["--grad-noise", "1", "--grad-clip", "0"], "dlora: error: --grad-clip=0.0: Input should be greater than 0"),
        (["--grad-noise-rows", "some"], "dlora train: error: argument --grad-noise-rows: invalid choice: 'some'"),
    ],
)
def test_bad_noise_flags_are_one_line_before_anything_loads(extra, words, tmp_path, data_file, capsys):
    """The model folder does not exist and no cloud listens: the flag is refused before either is touched."""
    code, line = _run(_argv("train", tmp_path, data_file, *extra), capsys)
    assert code == 2 and line.startswith(words), line


@pytest.mark.parametrize(
    "extra,named",
    [(["--privacy-noise", "1", "--privacy-clip", "1"], "--privacy-noise, --privacy-clip"),
     (["--grad-noise-rows", "loss"], "--grad-noise-rows")],
)
def test_local_train_refuses_the_noise_flags(extra, named, tmp_path, data_file, capsys):
    code, line = _run(_argv("local-train", tmp_path, data_file, *extra), capsys)
    assert code == 2 and f"{named}: local-train sends nothing up" in line, line
