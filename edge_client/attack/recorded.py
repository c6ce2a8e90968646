"""A recorded session as the attacks read it: the cloud's recording of each micro-batch next to what the device
knew (its tokens, for scoring only), the rows of one tensor at the positions an attack is scored on, and the
prior: what a guess from the position alone already gets."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from common.recording import RecordedMicroBatch
from edge_client.attack.probes import trr
from edge_client.train.data import Batch, loss_rows

NOT_ATTACKED = ("attention_mask", "lora_A", "lora_B")  # the mask is public shape; weights: the adapter attack


@dataclass
class Session:
    """One recorded session and what the device knew of it."""

    mbs: list[RecordedMicroBatch]
    parts: dict[tuple[int, int], Batch]
    weights: dict[int, dict[str, torch.Tensor]]  # the adapter the last step ran with, by step
    metrics: list[dict]
    device_bytes: int
    per_epoch: int
    peak_rss: int  # the process's peak resident bytes when the session ended (the device's RAM, all of it)

    def recorded(self) -> Iterator[tuple[RecordedMicroBatch, Batch]]:
        for m in self.mbs:
            part = self.parts.get((m.step, m.micro_batch))
            if part is not None and m.meta["train"]:
                yield m, part


# -- rows: one token position of one recorded tensor
def positions(name: str, part: Batch) -> torch.Tensor:
    """(B, T) bool: where a tensor's rows are scored. Forward tensors: every token. HiddenGrad: the rows
    that carry a loss (the next token has a label); its other rows are exactly zero. Other gradients:
    every token (the loss reaches them through attention)."""
    mask = part.attention_mask.bool()
    return loss_rows(part.labels) if name == "hidden_grad" else mask


def rows(session: Session, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, d) rows of tensor `name` over the session's recorded training micro-batches, the true token at each
    position (N,) and the position's index in its sequence (N,)."""
    xs, ids, where = [], [], []
    for m, part in session.recorded():
        if name not in m.tensors:
            continue
        keep = positions(name, part)
        xs.append(m.tensors[name][keep])
        ids.append(part.input_ids[keep])
        where.append(torch.arange(keep.shape[1]).expand_as(keep)[keep])
    if not xs:
        return torch.zeros(0, 0), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(xs), torch.cat(ids), torch.cat(where)


def position_modes(public: list[list[int]]) -> dict[int, int]:
    """The public text's most common token at each position index."""
    counts: dict[int, Counter[int]] = {}
    for ids in public:
        for t, tok in enumerate(ids):
            counts.setdefault(t, Counter())[tok] += 1
    return {t: c.most_common(1)[0][0] for t, c in counts.items()}


def prior_guess(modes: dict[int, int], where: torch.Tensor) -> torch.Tensor:
    """The guess from the position alone at each index in `where` (-1 past the public text's longest)."""
    return torch.tensor([modes.get(t, -1) for t in where.tolist()], dtype=torch.long)


def prior_trr(victim: list[list[int]], public: list[list[int]]) -> float:
    """The TRR of a guess that looks at no tensor at all: at each position of a sequence, the public text's most
    common token there. Texts that share a template ("Question: ... Answer:") give it a floor above zero; an
    attack is only as good as its margin over this (`token_attacks` also scores the tokens it misses)."""
    where = torch.tensor([t for ids in victim for t in range(len(ids))], dtype=torch.long)
    truth = torch.tensor([tok for ids in victim for tok in ids], dtype=torch.long)
    return trr(prior_guess(position_modes(public), where), truth)


def sequences(session: Session, first_epoch_only: bool = True) -> list[list[int]]:
    """The token ids of every sequence the session sent (its first epoch: each text once)."""
    out = []
    for (step, _), part in sorted(session.parts.items()):
        if first_epoch_only and step >= session.per_epoch:
            continue
        for ids, mask in zip(part.input_ids, part.attention_mask):
            out.append(ids[mask.bool()].tolist())
    return out


def tensor_names(session: Session) -> list[str]:
    names: set[str] = set()
    for m, _ in session.recorded():
        names.update(n for n in m.tensors if n.split(".")[0] not in NOT_ATTACKED)
    return sorted(names, key=_order)


def _order(name: str) -> tuple[int, int, int, str]:
    kinds = ["step_begin", "lora_x", "lora_delta", "hidden", "hidden_grad", "lora_grad_output", "lora_grad_input",
             "input_grad"]
    parts = name.split(".")
    kind = kinds.index(parts[0]) if parts[0] in kinds else len(kinds)
    return (int(parts[1]) if len(parts) > 1 else -1, int(parts[2]) if len(parts) > 2 else -1, kind, name)
