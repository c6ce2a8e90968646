"""The attacks' maths on synthetic tensors: nearest row, the ridge probe, label recovery from a gradient,
and the adapter from (x, delta) pairs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from edge_client.attack.probes import RidgeProbe, clip_rows, nearest_row, trr
from edge_client.attack.recovery import factorise, fit_product, recover_labels, relative_gain


def test_nearest_row_inverts_the_table_and_a_shuffled_table_does_not() -> None:
    """Exact rows decode exactly (argmin of an exact zero distance); against a shuffled table (the negative
    control) only the permutation's fixed points decode, none here by construction."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(500, 24, generator=gen)
    ids = torch.randint(500, (300,), generator=gen)
    assert trr(nearest_row(table[ids], table), ids) == 1.0
    perm = torch.roll(torch.arange(500), 1)  # no fixed point
    assert trr(nearest_row(table[ids], table[perm]), ids) == 0.0


def test_clip_rows_bounds_every_norm_and_keeps_short_rows() -> None:
    x = torch.tensor([[3.0, 4.0], [0.3, 0.4]])
    out = clip_rows(x, 1.0)
    assert torch.allclose(out.norm(dim=1), torch.tensor([1.0, 0.5]))
    assert clip_rows(x, None) is x


def test_ridge_probe_learns_a_linear_view_and_fails_on_shuffled_targets() -> None:
    """Rows that are a fixed random linear image of the embedding (plus small noise) decode back; a probe
    trained on shuffled token labels (the negative control) recovers about nothing."""
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(200, 16, generator=gen)
    mix = torch.randn(16, 40, generator=gen)
    train_ids, test_ids = torch.randint(200, (4000,), generator=gen), torch.randint(200, (500,), generator=gen)
    view = lambda ids: table[ids] @ mix + 0.01 * torch.randn(len(ids), 40, generator=gen)  # noqa: E731
    probe = RidgeProbe(table).fit(view(train_ids), train_ids)
    assert trr(probe.predict(view(test_ids)), test_ids) >= 0.95
    shuffled = train_ids[torch.randperm(len(train_ids), generator=gen)]
    assert trr(RidgeProbe(table).fit(view(train_ids), shuffled).predict(view(test_ids)), test_ids) <= 0.05


def _gradient(head: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    h = hidden.clone().requires_grad_(True)
    F.cross_entropy(h @ head.T, labels, reduction="sum").div(len(labels)).backward()
    return h.grad  # type: ignore[return-value]


def test_labels_come_back_from_the_gradient_exactly() -> None:
    """g = (W^T p - W[y]) / N: every label lies on its line, whatever N is (the attack never needs it)."""
    gen = torch.Generator().manual_seed(2)
    head = torch.randn(300, 32, generator=gen)
    hidden = torch.randn(64, 32, generator=gen)
    labels = torch.randint(300, (64,), generator=gen)
    grad = _gradient(head, hidden, labels)
    assert trr(recover_labels([(hidden, grad)], head), labels) == 1.0


def test_gradient_noise_hides_the_labels_and_averaging_views_brings_them_back() -> None:
    """Per-row noise twice the gradient's own norm: one view recovers few labels; 400 views with fresh noise
    cut the noise 20x (sqrt(400)), to a tenth of the gradient, and recover most."""
    gen = torch.Generator().manual_seed(3)
    head = torch.randn(300, 32, generator=gen)
    hidden = torch.randn(64, 32, generator=gen)
    labels = torch.randint(300, (64,), generator=gen)
    grad = _gradient(head, hidden, labels)
    scale = 2 * float(grad.norm(dim=1).mean()) / math.sqrt(32)
    views = [(hidden, grad + scale * torch.randn(grad.shape, generator=gen)) for _ in range(400)]
    one = trr(recover_labels(views[:1], head), labels)
    many = trr(recover_labels(views, head), labels)
    assert one <= 0.25 < 0.75 <= many


@pytest.mark.parametrize("out_features", [12, 40])
def test_the_adapter_comes_back_from_x_delta_pairs(out_features: int) -> None:
    """delta = s x A^T B^T exactly (no dropout): least squares in float64 over 256 well-conditioned rows returns
    M = s A^T B^T to rounding, and its rank-r factorisation has the same product (1e-5 relative: float32 A, B)."""
    gen = torch.Generator().manual_seed(4)
    rank, scaling = 4, 2.0
    a, b = torch.randn(rank, 24, generator=gen), torch.randn(out_features, rank, generator=gen)
    x = torch.randn(256, 24, generator=gen)
    delta = scaling * x @ a.T @ b.T
    a2, b2 = factorise(fit_product(x, delta), rank, scaling)
    assert torch.allclose(scaling * b2 @ a2, scaling * b @ a, rtol=1e-5, atol=1e-5 * float((b @ a).abs().max()))


def test_relative_gain() -> None:
    assert relative_gain(2.0, 1.0, 1.5) == 0.5
    assert math.isnan(relative_gain(2.0, 2.0, 1.5))


def test_the_prior_is_the_share_a_position_alone_gives() -> None:
    """Two of four victim tokens sit where every public text has that same token (a shared template), the
    others differ: a guess from the position alone scores exactly 1/2."""
    from edge_client.attack.recorded import prior_trr

    public = [[7, 8, 1], [7, 8, 2], [7, 9, 3]]
    assert prior_trr([[7, 8, 5, 6]], public) == 0.5
    assert prior_trr([[1, 2]], public) == 0.0
