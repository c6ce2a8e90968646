"""The noise defences' maths (edge_client/train/privacy.py): clipping, keyed noise, its scale, the config."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from common.config import TrainConfig, flag_error
from common.errors import ConfigError
from common.lora_math import dropout_key
from edge_client.train.data import IGNORE, loss_rows
from edge_client.train.privacy import PrivacyNoise, clip_and_noise, clip_rows, noise_key

TRAIN: dict[str, Any] = {"model": Path("m"), "data": Path("d.jsonl"), "output": Path("out")}


def _x(b: int = 2, t: int = 5, d: int = 8, scale: float = 3.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, t, d, generator=torch.Generator().manual_seed(7), dtype=dtype) * scale  # (b, t, d)


def _ones(x: torch.Tensor) -> torch.Tensor:
    return torch.ones(x.shape[:2], dtype=torch.long)  # (b, t): every row is a token


def _labels(x: torch.Tensor) -> torch.Tensor:
    return torch.zeros(x.shape[:2], dtype=torch.long)  # (b, t): every position has a label


def test_sigma_0_without_a_clip_is_the_same_tensor() -> None:
    x = _x()
    assert clip_and_noise(x, _ones(x), 0.0, None, key=1) is x
    noise = PrivacyNoise(secret=5)
    assert noise.inputs(x, _ones(x), 3, 0) is x and noise.hidden_grad(x, _ones(x), _labels(x), 3, 0) is x


def test_sigma_0_with_a_clip_only_clips() -> None:
    x = _x()
    assert torch.equal(clip_and_noise(x, _ones(x), 0.0, 1.5, key=1), clip_rows(x, 1.5))


def test_noise_without_a_clip_is_refused() -> None:
    with pytest.raises(ConfigError, match="needs a clip norm"):
        clip_and_noise(_x(), _ones(_x()), 0.5, None, key=1)


@pytest.mark.parametrize("clip", [0.5, 2.0, 100.0])
def test_clipped_rows_are_within_the_clip_and_short_rows_unchanged(clip: float) -> None:
    x = _x(scale=3.0)
    x[0, 0] = 0.0  # a zero row: no division by zero
    y = clip_rows(x, clip)
    norms, before = y.norm(dim=-1), x.norm(dim=-1)
    assert bool((norms <= clip * (1 + 1e-6)).all())
    short = before <= clip
    assert torch.equal(y[short], x[short])  # times exactly 1.0
    long = ~short
    torch.testing.assert_close(norms[long], torch.full_like(norms[long], clip))  # projected onto the sphere
    torch.testing.assert_close(y[long] / norms[long, None], x[long] / before[long, None])  # direction kept


def test_clip_and_noise_is_differentiable() -> None:
    """gradcheck in float64: rows both inside and outside the clip (norms 5.0 to 9.4 vs C = 7), noise on."""
    x = _x(b=2, t=3, d=4, dtype=torch.float64).requires_grad_(True)
    norms = x.detach().norm(dim=-1)
    assert bool((norms < 7.0).any()) and bool((norms > 7.0).any())
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.autograd.gradcheck(lambda v: clip_and_noise(v, mask, 0.7, 7.0, key=11), (x,))


def test_padding_rows_are_left_as_they_are() -> None:
    x = _x()
    mask = _ones(x)
    mask[0, 3:] = 0
    y = clip_and_noise(x, mask, 1.0, 1.0, key=3)
    assert torch.equal(y[0, 3:], x[0, 3:])
    assert not torch.equal(y[0, :3], x[0, :3]) and not torch.equal(y[1], x[1])


def test_the_noise_is_keyed_by_secret_step_micro_batch_and_tensor() -> None:
    x, m = _x(), _ones(_x())
    a = PrivacyNoise(secret=9, inputs=(1.0, 1.0), hidden_grad=(1.0, 1.0))
    same = PrivacyNoise(secret=9, inputs=(1.0, 1.0), hidden_grad=(1.0, 1.0))
    assert torch.equal(a.inputs(x, m, 4, 1), same.inputs(x, m, 4, 1))  # reproducible
    assert torch.equal(a.inputs(x, m, 4, 1), a.inputs(x, m, 4, 1))  # a redone step: the same draws again
    base = a.inputs(x, m, 4, 1)
    others = [
        a.inputs(x, m, 5, 1),
        a.inputs(x, m, 4, 0),
        a.hidden_grad(x, m, _labels(x), 4, 1),
        PrivacyNoise(secret=10, inputs=(1.0, 1.0)).inputs(x, m, 4, 1),
    ]
    for other in others:
        assert not bool(torch.isclose(other, base).any())  # fresh draws everywhere, not a shifted copy


def test_noise_keys_differ_from_dropout_keys() -> None:
    """The same integers key a dropout mask and a noise draw: personalised hashes keep them apart."""
    keys = {noise_key(s, st, mb, w) for s in range(3) for st in range(3) for mb in range(2) for w in range(2)}
    assert len(keys) == 36
    assert not keys & {
        dropout_key(s, st, mb, w, 0) for s in range(3) for st in range(3) for mb in range(2) for w in range(2)
    }


def test_the_noise_has_the_stated_scale() -> None:
    """x = 0, so the output is the noise: n = 10^5 draws of N(0, s^2), s = sigma x C = 0.75.

    The sample mean has standard error s/sqrt(n); the sample standard deviation s/sqrt(2(n-1)) (normal
    data). Both are asserted within 5 standard errors: a false failure has probability ~6e-7 each.
    """
    sigma, clip, n = 1.5, 0.5, 100_000
    x = torch.zeros(1, n // 100, 100, dtype=torch.float64)
    draws = clip_and_noise(x, torch.ones(1, n // 100), sigma, clip, key=2024).flatten()
    s = sigma * clip
    assert abs(float(draws.mean())) <= 5 * s / math.sqrt(n)
    assert abs(float(draws.std()) - s) <= 5 * s / math.sqrt(2 * (n - 1))


def test_the_noise_keeps_the_dtype() -> None:
    x = _x(dtype=torch.bfloat16)
    assert clip_and_noise(x, _ones(x), 1.0, 1.0, key=1).dtype == torch.bfloat16


# ---------------------------------------------------------------- config


@pytest.mark.parametrize("noise,clip", [("privacy_noise", "privacy_clip"), ("grad_noise", "grad_clip")])
def test_noise_without_its_clip_is_one_line_naming_both_flags(noise: str, clip: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainConfig(**TRAIN, **{noise: 0.5})
    msg = str(flag_error(e.value))
    flag_n, flag_c = "--" + noise.replace("_", "-"), "--" + clip.replace("_", "-")
    assert "\n" not in msg and msg.startswith(f"{flag_n}=0.5 needs {flag_c}"), msg
    assert TrainConfig(**TRAIN, **{noise: 0.5, clip: 1.0}).model_dump()[noise] == 0.5
    assert TrainConfig(**TRAIN, **{clip: 1.0}).model_dump()[noise] == 0.0  # clipping only


@pytest.mark.parametrize(
    "bad,prefix,allowed",
    [
        ({"privacy_noise": -1.0}, "--privacy-noise=-1.0:", "greater than or equal to 0"),
        ({"grad_noise": -0.1}, "--grad-noise=-0.1:", "greater than or equal to 0"),
        ({"privacy_clip": 0.0}, "--privacy-clip=0.0:", "greater than 0"),
        ({"grad_clip": -2.0}, "--grad-clip=-2.0:", "greater than 0"),
        ({"noise_seed": -1}, "--noise-seed=-1:", "greater than or equal to 0"),
    ],
)
def test_bad_noise_values_name_the_flag(bad: dict[str, Any], prefix: str, allowed: str) -> None:
    with pytest.raises(ValidationError) as e:
        TrainConfig(**TRAIN, **bad)
    msg = str(flag_error(e.value))
    assert msg.startswith(prefix) and allowed in msg, msg


def test_the_secret_comes_from_noise_seed_never_from_seed() -> None:
    assert PrivacyNoise.from_config(TrainConfig(**TRAIN, noise_seed=42)).secret == 42
    fresh = {PrivacyNoise.from_config(TrainConfig(**TRAIN, seed=0)).secret for _ in range(4)}
    assert len(fresh) == 4 and 0 not in fresh  # a fresh secret per engine, not the (public) --seed
    assert "noise_seed" not in repr(TrainConfig(**TRAIN, noise_seed=42))


def test_loss_rows_are_the_positions_whose_next_label_is_scored() -> None:
    labels = torch.tensor([[IGNORE, IGNORE, 5, 6, IGNORE], [IGNORE, 7, IGNORE, IGNORE, 8]])
    assert loss_rows(labels).tolist() == [[False, True, True, False, False], [True, False, False, True, False]]


def test_grad_noise_rows_loss_noises_the_loss_rows_only() -> None:
    """rows="loss": the loss rows clipped and noised exactly as rows="all" does them (the same key, the same
    draws), every other row (prompt, padding) exactly what it was; rows="all" noises the prompt rows too."""
    g = _x()
    g[0, :2] = 0.0  # a prompt's gradient is zero
    labels = torch.full(g.shape[:2], IGNORE)
    labels[0, 3:] = 1
    labels[1, 1:] = 2
    mask = _ones(g)
    mask[1, 3] = 0  # a masked row stays as it is even where its next label is set
    every = PrivacyNoise(secret=4, hidden_grad=(1.0, 0.5))
    only = PrivacyNoise(secret=4, hidden_grad=(1.0, 0.5), grad_rows="loss")
    a, b = every.hidden_grad(g, mask, labels, 2, 0), only.hidden_grad(g, mask, labels, 2, 0)
    rows = loss_rows(labels) & mask.bool()
    assert rows.sum() == 5
    assert torch.equal(b[rows], a[rows])
    assert torch.equal(b[~rows], g[~rows])
    assert not bool((a[0, :2] == 0).any())  # rows="all": the prompt rows no longer look like a prompt's


def test_grad_noise_rows_is_all_or_loss() -> None:
    with pytest.raises(ConfigError, match="--grad-noise-rows='some': use all or loss"):
        PrivacyNoise(secret=1, grad_rows="some")
    with pytest.raises(ValidationError):
        TrainConfig(**TRAIN, grad_noise_rows="some")
