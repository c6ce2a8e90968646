"""Training data on the device: JSONL to token batches, and the loss computed on them.

A line is {"text": ...} (loss on every token) or {"prompt": ..., "completion": ...} (loss on the
completion only). Batches are right-padded; labels are -100 on padding and on prompts. Labels
never leave this process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from common.errors import ConfigError

log = logging.getLogger(__name__)
IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor  # (B, T) long
    attention_mask: torch.Tensor  # (B, T) long, 1 = token
    labels: torch.Tensor  # (B, T) long, IGNORE on padding and prompts

    @property
    def label_tokens(self) -> int:
        """Tokens that contribute to the loss (after the causal shift)."""
        return int((self.labels[:, 1:] != IGNORE).sum())

    def split(self, m: int) -> list[Batch]:
        """The batch as up to m micro-batches of consecutive rows (tensor_split), each without the
        padding columns none of its rows needs. Every engine splits a step this way, so that with the
        same M they see the same shapes (and draw the same dropout masks)."""
        out = []
        for ids, mask, lab in zip(*(t.tensor_split(m) for t in (self.input_ids, self.attention_mask, self.labels))):
            if ids.shape[0] == 0:
                continue
            width = int(mask.sum(dim=1).max())
            out.append(Batch(ids[:, :width], mask[:, :width], lab[:, :width]))
        return out


def read_jsonl(path: Path, required: tuple[tuple[str, ...], ...]) -> list[dict]:
    """Lines of a JSONL file, each holding one of the `required` field sets.

    Raises:
        ConfigError: the file is missing or empty, or line N is not JSON or lacks the fields.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--data {path}: no such file")
    rows: list[dict] = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"--data {path}: line {n} is not JSON ({e.msg}); fix or remove it") from None
            if not isinstance(row, dict) or not any(all(k in row for k in keys) for keys in required):
                want = " or ".join("{" + ", ".join(f'"{k}"' for k in keys) + "}" for keys in required)
                raise ConfigError(f"--data {path}: line {n} needs {want}")
            rows.append(row)
    if not rows:
        raise ConfigError(f"--data {path}: the file has no examples")
    return rows


def load_examples(path: Path, tokenizer: PreTrainedTokenizerBase, max_length: int) -> list[Example]:
    """Tokenize a training JSONL file.

    Raises:
        ConfigError: see read_jsonl; also a field that is not a string, or no example left with loss tokens.
    """
    rows = read_jsonl(path, (("text",), ("prompt", "completion")))
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    examples: list[Example] = []
    dropped = 0
    for n, row in enumerate(rows, 1):
        fields = ("text",) if "text" in row else ("prompt", "completion")
        if not all(isinstance(row[k], str) for k in fields):
            raise ConfigError(f"--data {path}: example {n}: {', '.join(fields)} must be strings")
        if "text" in row:
            ids = tokenizer(row["text"])["input_ids"] + eos
            labels = list(ids)
        else:
            p = tokenizer(row["prompt"])["input_ids"]
            c = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + eos
            ids, labels = p + c, [IGNORE] * len(p) + c
        ids, labels = ids[:max_length], labels[:max_length]
        if sum(label != IGNORE for label in labels[1:]) == 0:
            dropped += 1
            continue
        examples.append(Example(ids, labels))
    if dropped:
        log.warning("%d of %d examples have no loss tokens within --max-length %d and are skipped", dropped, len(rows), max_length)
    if not examples:
        raise ConfigError(f"--data {path}: no example keeps a loss token within --max-length {max_length}; raise it")
    return examples


def collate(examples: list[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples into one batch."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
    return Batch(ids, mask, labels)


def epoch_batches(examples: list[Example], batch_size: int, pad_id: int, seed: int, epoch: int, shuffle: bool) -> Iterator[Batch]:
    """The batches of one epoch, in a seeded order that depends only on (seed, epoch)."""
    if shuffle:
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    else:
        order = list(range(len(examples)))
    for start in range(0, len(order), batch_size):
        yield collate([examples[i] for i in order[start : start + batch_size]], pad_id)


def steps_per_epoch(n_examples: int, batch_size: int) -> int:
    return -(-n_examples // batch_size)


def next_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels (..., T) shifted to the token each position predicts: position t gets labels[..., t + 1], the last
    position IGNORE (it predicts nothing)."""
    out = torch.full_like(labels, IGNORE)
    out[..., :-1] = labels[..., 1:]
    return out


def loss_rows(labels: torch.Tensor) -> torch.Tensor:
    """(..., T) bool: the positions whose logits lm_loss scores, i.e. whose next label is not IGNORE."""
    return next_labels(labels) != IGNORE


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Summed next-token cross-entropy over label tokens, divided by n_tokens.

    Dividing by the whole step's label count (not the micro-batch's) makes micro-batches add up
    to exactly the full batch's mean loss.
    """
    shift_logits = logits[:, :-1].reshape(-1, logits.shape[-1]).float()  # (B*(T-1), V)
    shift_labels = labels[:, 1:].reshape(-1)
    return F.cross_entropy(shift_logits, shift_labels, ignore_index=IGNORE, reduction="sum") / max(n_tokens, 1)
