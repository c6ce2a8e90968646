"""Multiple-choice accuracy by log-likelihood, through the split path (forward only).

Each choice is scored by the mean log-probability of its tokens given the prompt (length-
normalised); the prediction is the best-scoring choice. The choices of several items go through
the cloud in one batched forward; only the hidden rows that predict choice tokens reach the head.
"""

from __future__ import annotations

import argparse
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from common.errors import ConfigError
from common.pb.dlora.v1 import dlora_pb2 as pb
from edge_client.remote.link import CloudLink, LinkConfig
from edge_client.remote.remote_step import RemoteStack
from edge_client.train.data import read_jsonl
from edge_client.train.model_parts import EdgeModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    prompt: str
    choices: list[str]
    answer: int


@dataclass(frozen=True)
class EvalResult:
    accuracy: float
    correct: int
    total: int
    predictions: list[int]


def load_items(path: Path, limit: int | None = None) -> list[Item]:
    """Read {"prompt", "choices", "answer"} lines.

    Raises:
        ConfigError: bad line (names the line), or answer out of range.
    """
    rows = read_jsonl(path, (("prompt", "choices", "answer"),))
    items = []
    for n, row in enumerate(rows, 1):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise ConfigError(f"--data {path}: item {n}: choices must be a list of at least two strings")
        if not isinstance(answer, int) or not 0 <= answer < len(choices):
            raise ConfigError(f"--data {path}: item {n}: answer must be an index into choices (0..{len(choices) - 1})")
        items.append(Item(str(row["prompt"]), choices, answer))
    return items[:limit] if limit else items


def evaluate(edge: EdgeModel, stack: RemoteStack, items: list[Item], *, max_length: int = 256,
             items_per_batch: int = 8, progress: bool = True) -> EvalResult:
    """Accuracy on items of the base model behind `stack`, with its LoRA adapter if it has one.

    Raises:
        RemoteError, ProtocolError: the cloud failed or sent something unexpected.
    """
    roles = [pb.FORWARD if stack.lora is not None else pb.ABSENT] * edge.num_layers
    tok = edge.tokenizer
    pad = tok.pad_token_id
    max_length = edge.cap_length(max_length)
    preds: list[int] = []
    for start in tqdm(range(0, len(items), items_per_batch), disable=not progress, desc="eval", unit="batch"):
        chunk = items[start : start + items_per_batch]
        seqs: list[tuple[list[int], int]] = []  # (ids, number of choice tokens)
        for item in chunk:
            p = tok(item.prompt)["input_ids"]
            for choice in item.choices:
                c = tok(choice, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
                ids = (p + c)[-max_length:]
                seqs.append((ids, min(len(c), len(ids) - 1)))
        width = max(len(s) for s, _ in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, (s, _) in enumerate(seqs):
            ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1
        with torch.no_grad():
            hidden = stack.forward(edge.embed(ids), mask, roles)  # (B, T, E_out)
        scores = []
        with torch.no_grad():
            for i, (s, n_choice) in enumerate(seqs):
                pos = torch.arange(len(s) - n_choice - 1, len(s) - 1)  # rows that predict the choice tokens
                logp = torch.log_softmax(edge.logits(hidden[i, pos]).float(), dim=-1)  # (n_choice, V)
                scores.append(float(logp.gather(1, ids[i, pos + 1][:, None]).mean()))
        k = 0
        for item in chunk:
            n = len(item.choices)
            preds.append(int(torch.tensor(scores[k : k + n]).argmax()))
            k += n
    correct = sum(int(p == it.answer) for p, it in zip(preds, items))
    return EvalResult(correct / max(len(items), 1), correct, len(items), preds)


def run_eval(args: argparse.Namespace, cache: Path, link_config: LinkConfig, max_length: int) -> int:
    """`dlora eval`: the items of --data or --tasks (prepared in `cache`), scored through the cloud of
    `link_config` with --adapter if given; prints a task x accuracy table, writes --json.

    Raises:
        ConfigError: neither or both of --data and --tasks, a bad item, adapter or model folder.
        RemoteError, ProtocolError: the cloud failed or sent something unexpected.
    """
    from edge_client.tools.tasks import TASK_NAMES, prepare_task
    from edge_client.train.lora import LoraAdapter, read_adapter_config

    if (args.data is None) == (args.tasks is None):
        raise ConfigError("dlora eval needs exactly one of --data FILE or --tasks a,b")
    if args.tasks:
        names = list(TASK_NAMES) if args.tasks == "all" else [t.strip() for t in args.tasks.split(",") if t.strip()]
        sets = {name: load_items(prepare_task(name, cache) / "test.jsonl", args.limit) for name in names}
    else:
        sets = {args.data.stem: load_items(args.data, args.limit)}
    adapter = None
    edge_layers = getattr(args, "edge_layers", None) or 0  # --edge-layers: blocks run on this device
    if args.adapter is not None:
        acfg = read_adapter_config(args.adapter)
        edge = EdgeModel(args.model, tuple(acfg.get("target_modules") or ()) or None, edge_layers=edge_layers)
        adapter = LoraAdapter(edge, int(acfg["r"]), float(acfg["lora_alpha"]), 0.0)
        adapter.load(args.adapter)
        adapter.eval()
    else:
        edge = EdgeModel(args.model, edge_layers=edge_layers)
    link = CloudLink(link_config, edge, lora=adapter)
    link.open()
    results = {}
    try:
        for name, items in sets.items():
            res = evaluate(edge, RemoteStack(link, adapter), items, max_length=max_length, progress=not args.no_progress)
            results[name] = {"accuracy": res.accuracy, "correct": res.correct, "total": res.total,
                             "predictions": res.predictions}
    finally:
        link.close()
    width = max(len(n) for n in results)
    print(f"{'task':<{width}}  accuracy  items")
    for name, r in results.items():
        print(f"{name:<{width}}  {r['accuracy']:8.4f}  {r['total']:5d}")
    if len(results) > 1:
        mean = sum(r["accuracy"] for r in results.values()) / len(results)
        print(f"{'mean':<{width}}  {mean:8.4f}")
    if args.json:
        args.json.write_text(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=1))
    return 0
