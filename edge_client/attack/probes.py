"""Token-recovery attacks on what a curious cloud records: map each recorded row back to a token.

Every attack turns a row the cloud saw (one token position of one tensor, width d) into a guess of
the token at that position:
- `nearest_row`: the row itself against the public embedding table (the rows clipped the way the
  device clips them, when a clip norm is in force): the exact inverse of the input embeddings;
- `RidgeProbe`: a linear map, fitted on another text the attacker ran through the same cloud with
  the same defence (the shadow session), from the cloud's rows to the token's embedding row, then
  the nearest row of the table;
- `MlpProbe`: the same with one hidden layer.
The token recovery rate (TRR) is the fraction of positions whose guess is the true token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

CHUNK = 1024  # rows decoded at a time: (CHUNK, V) distances stay ~200 MB for a 49k vocabulary
RIDGE_LAMBDAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)  # relative to the features' mean eigenvalue


def clip_rows(x: torch.Tensor, clip: float | None) -> torch.Tensor:
    """Rows scaled down to L2 norm <= clip, as the device clips what it sends (None: unchanged)."""
    if clip is None:
        return x
    norms = x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return x * (clip / norms).clamp(max=1.0)


def nearest_row(rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Index of the L2-nearest row of `table` (V, d) for every row of `rows` (N, d): (N,) long."""
    table = table.float()
    sq = (table * table).sum(dim=1)  # (V,)
    out = []
    for chunk in rows.float().split(CHUNK):
        # ||x - t||^2 = ||x||^2 - 2 x.t + ||t||^2; ||x||^2 is the same for every t
        out.append((sq[None, :] - 2.0 * chunk @ table.T).argmin(dim=1))
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def trr(guess: torch.Tensor, truth: torch.Tensor) -> float:
    """Token recovery rate: the fraction of positions guessed right (nan for no positions)."""
    return float((guess == truth).float().mean()) if truth.numel() else math.nan


@dataclass
class _Standardise:
    mean: torch.Tensor
    std: torch.Tensor

    @classmethod
    def fit(cls, x: torch.Tensor) -> _Standardise:
        return cls(x.mean(dim=0), x.std(dim=0).clamp_min(1e-6))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class RidgeProbe:
    """Ridge regression from the cloud's rows (N, d) to embedding rows (N, E), lambda picked on a held-out
    fifth of the shadow rows (by cosine to the true rows)."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table.float()

    def fit(self, x: torch.Tensor, tokens: torch.Tensor, seed: int = 0) -> RidgeProbe:
        x = x.double()
        self.norm = _Standardise.fit(x)
        z = self.norm(x)
        y = self.table[tokens].double()
        order = torch.randperm(len(z), generator=torch.Generator().manual_seed(seed))
        cut = max(1, len(z) // 5)
        val, tr = order[:cut], order[cut:]
        best = (-2.0, RIDGE_LAMBDAS[0])
        for lam in RIDGE_LAMBDAS:  # scored by cosine to the true rows: decoding each guess would cost V x more
            score = float(F.cosine_similarity(_apply(z[val], _ridge(z[tr], y[tr], lam)), y[val], dim=-1).mean())
            if score > best[0]:
                best = (score, lam)
        self.lam = best[1]
        self.w = _ridge(z, y, self.lam)
        return self

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Guessed token ids (N,) for rows x (N, d)."""
        return nearest_row(_apply(self.norm(x.double()), self.w).float(), self.table)


def _apply(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """[z 1] W: the ridge map with its bias row."""
    return z @ w[:-1] + w[-1]


def _ridge(z: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W ||[z 1] W - y||^2 + lam * mean_eig * ||W||^2, with an unpenalised bias: ((d+1), E)."""
    n, d = z.shape
    zb = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], dim=1)
    gram = zb.T @ zb
    reg = lam * float(torch.diagonal(gram)[:d].mean()) * torch.eye(d + 1, dtype=z.dtype)
    reg[d, d] = 0.0
    return torch.linalg.solve(gram + reg, zb.T @ y)


class MlpProbe:
    """One hidden layer (GELU) from the cloud's rows to embedding rows, trained with a cosine loss and
    AdamW on the shadow rows; decoded by the nearest row of the table."""

    def __init__(self, table: torch.Tensor, hidden: int = 512, steps: int = 300, batch: int = 512, lr: float = 2e-3) -> None:
        self.table = table.float()
        self.hidden, self.steps, self.batch, self.lr = hidden, steps, batch, lr

    def fit(self, x: torch.Tensor, tokens: torch.Tensor, seed: int = 0) -> MlpProbe:
        gen = torch.Generator().manual_seed(seed)
        x = x.float()
        self.norm = _Standardise.fit(x)
        z, y = self.norm(x), self.table[tokens]
        torch.manual_seed(seed)  # the layers' init
        self.net = nn.Sequential(nn.Linear(z.shape[1], self.hidden), nn.GELU(), nn.Linear(self.hidden, y.shape[1]))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, self.steps)
        for _ in range(self.steps):
            idx = torch.randint(len(z), (min(self.batch, len(z)),), generator=gen)
            loss = 1.0 - F.cosine_similarity(self.net(z[idx]), y[idx], dim=-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        return self

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Guessed token ids (N,) for rows x (N, d): the table row of highest cosine with the output."""
        out = F.normalize(self.net(self.norm(x.float())), dim=-1)
        table = F.normalize(self.table, dim=-1)
        return torch.cat([(c @ table.T).argmax(dim=1) for c in out.split(CHUNK)]) if len(out) else out.long()
