"""The two analytic attacks: next tokens (the labels) from HiddenGrad, and the adapter from what the
cloud saw of it, scored by the held-out loss gain the recovered adapter gives.

Labels. The device's loss at a position is cross-entropy of logits W h (the head W is public: the
base model's), so the gradient it sends up is g = (W^T p - W[y]) / N, with p = softmax(W h) known to
the cloud (it computed h) and N the step's loss-token count. W[y] therefore lies on the line
u - c g (u = W^T p, c = N > 0): the label is the vocabulary row closest to that line, which needs
neither N nor the device's help. Rows of exactly zero gradient carry no loss and are not scored.

Adapter. `layerwise`: every LoRA call shows the cloud (x, delta = s B A dropout(x)) for a layer group;
a least-squares fit of delta on x over one step's rows gives M = s A^T B^T (dropout averages out), and
its best rank-r factorisation is an adapter with the same product. `adapter`: the weights cross as
they are. Layers the device runs itself (--edge-layers) are never seen: they recover as zero.
"""

from __future__ import annotations

import math

import torch

LABEL_CHUNK = 256  # positions at a time: a few (256, V) float32 temporaries
LabelRows = tuple[torch.Tensor, torch.Tensor]  # (N, H) hidden rows, (N, H) gradient rows at the same positions


def line_residuals(hidden: torch.Tensor, grad: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """(N, V) squared distance of every vocabulary row W[v] from the ray u - c g (c >= 0) of each position.

    hidden, grad: (N, H) rows the cloud saw; head: (V, H) the public output head.
    """
    w = head.double()  # float64: the true label's residual is a difference of large terms that cancel to 0
    sq = (w * w).sum(dim=1)  # (V,)
    out = []
    for h, g in zip(hidden.double().split(LABEL_CHUNK), grad.double().split(LABEL_CHUNK)):
        p = torch.softmax(h @ w.T, dim=-1)  # (n, V)
        u = p @ w  # (n, H)
        gn = (g * g).sum(dim=1, keepdim=True).clamp_min(1e-30)  # (n, 1)
        wu = w @ u.T  # (V, n): W[v].u
        wg = (g @ w.T)  # (n, V): W[v].g
        diff_sq = sq[None, :] - 2 * wu.T + (u * u).sum(dim=1, keepdim=True)  # ||W[v] - u||^2
        proj = wg - (u * g).sum(dim=1, keepdim=True)  # (W[v] - u).g
        c = (-proj / gn).clamp_min(0.0)  # the best c >= 0 for each v
        out.append(diff_sq + 2 * c * proj + c * c * gn)  # ||W[v] - u + c g||^2
    return torch.cat(out) if out else torch.zeros(0, head.shape[0])


def recover_labels(views: list[LabelRows], head: torch.Tensor) -> torch.Tensor:
    """Guessed next tokens (N,) from one or more views of the same N positions. Several views (the same
    text in several epochs, each with fresh noise) are averaged first: the noise shrinks as 1/sqrt(views)
    while each view's gradient keeps pointing from W[y] to u (up to its step's 1/N)."""
    if not views:
        return torch.zeros(0, dtype=torch.long)
    hidden = torch.stack([h.double() for h, _ in views]).mean(dim=0)
    grad = torch.stack([g.double() for _, g in views]).mean(dim=0)
    return line_residuals(hidden, grad, head).argmin(dim=1)


def fit_product(x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Least-squares M (in, out) with delta ≈ x M over the rows (N, in), (N, out); a tiny ridge keeps
    it defined when the rows span less than `in` dimensions."""
    x, delta = x.double(), delta.double()
    gram = x.T @ x
    reg = 1e-6 * float(torch.diagonal(gram).mean().clamp_min(1e-30)) * torch.eye(gram.shape[0], dtype=x.dtype)
    return torch.linalg.solve(gram + reg, x.T @ delta)


def factorise(m: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA (A (r, in), B (out, r)) with scaling * B A = the best rank-r approximation of M^T (M: (in, out))."""
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # M = U S Vh
    r = min(rank, s.numel())
    root = s[:r].sqrt() / math.sqrt(scaling)
    a = torch.zeros(rank, m.shape[0], dtype=torch.float32)
    b = torch.zeros(m.shape[1], rank, dtype=torch.float32)
    a[:r] = (u[:, :r] * root).T.float()  # A^T = U_r sqrt(S_r) / sqrt(s)
    b[:, :r] = (vh[:r].T * root).float()  # B = V_r sqrt(S_r) / sqrt(s)
    return a, b


def relative_gain(base: float, target: float, recovered: float) -> float:
    """The fraction of the fine-tuning's held-out loss gain (base - target) the recovered adapter gives;
    nan when there was no gain to recover."""
    gain = base - target
    return (base - recovered) / gain if gain > 1e-6 else math.nan
