"""A Hugging Face model folder on disk: its config, its safetensors index, and its fingerprint.

Both sides read the same kind of folder but materialise different parts of it: the edge only
the embedding and the head, the cloud only the decoder stack. Tensors are located through the
safetensors headers, so nothing is loaded that is not asked for.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig

from common.errors import ConfigError

# config.json keys that do not change the computation (or differ between saves of one model).
_VOLATILE_CONFIG_KEYS = frozenset(
    {"transformers_version", "_name_or_path", "torch_dtype", "dtype", "use_cache", "architectures"}
)
_SAMPLE_BYTES = 64  # bytes of each tensor that enter the fingerprint
_FIX = "pass a Hugging Face model folder (config.json + *.safetensors), e.g. from `dlora prepare smollm2-135m`"


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies: its file, dtype name, shape, and byte range inside the file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    end: int


def load_config(model_dir: Path) -> PretrainedConfig:
    """The model's config.

    Raises:
        ConfigError: the folder or its config.json is missing or unreadable.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ConfigError(f"model folder {model_dir} does not exist; {_FIX}")
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model folder {model_dir} has no config.json; {_FIX}")
    try:
        return AutoConfig.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many unrelated types for a bad config.json
        if isinstance(e, ConfigError):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"model folder {model_dir}: config.json is not usable ({first}); {_FIX}") from e


def _read_header(path: Path) -> tuple[dict, int]:
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path} is not a safetensors file (too short); {_FIX}")
        (n,) = struct.unpack("<Q", raw)
        if n > 100_000_000:
            raise ConfigError(f"{path} is not a safetensors file (bad header length); {_FIX}")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not a safetensors file (bad header); {_FIX}") from e
    return header, 8 + n


def tensor_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of the folder's safetensors files, by name, without reading any data.

    Raises:
        ConfigError: there are no safetensors weights or a file is not safetensors.
    """
    model_dir = Path(model_dir)
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"model folder {model_dir} has no *.safetensors weights; {_FIX}")
    index: dict[str, TensorEntry] = {}
    for path in files:
        header, base = _read_header(path)
        size = path.stat().st_size
        if not isinstance(header, dict):
            raise ConfigError(f"{path} is not a safetensors file (header is not an object); {_FIX}")
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                start, end = (int(x) for x in info["data_offsets"])
                entry = TensorEntry(path, str(info["dtype"]), tuple(int(d) for d in info["shape"]), base + start, base + end)
            except (TypeError, KeyError, ValueError, AttributeError):
                raise ConfigError(f"{path}: tensor {name!r} has a malformed header entry; {_FIX}") from None
            if not base <= entry.start <= entry.end <= size:
                raise ConfigError(f"{path} is truncated or corrupt ({name!r} lies past its end); download it again")
            index[name] = entry
    return index


def find_tensor(index: dict[str, TensorEntry], names: list[str], prefix: str) -> str | None:
    """The stored key for a model parameter, trying each candidate name with and without the base-model prefix.

    Hub checkpoints of some families (GPT-2) store "h.0..." where the model names "transformer.h.0...".
    """
    for name in names:
        if name in index:
            return name
        if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1 :] in index:
            return name[len(prefix) + 1 :]
    return None


def read_tensors(index: dict[str, TensorEntry], keys: list[str]) -> dict[str, torch.Tensor]:
    """Load just these tensors."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for key in keys:
        by_file.setdefault(index[key].file, []).append(key)
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as f:
            for key in names:
                out[key] = f.get_tensor(key)
    return out


def fingerprint(model_dir: Path) -> str:
    """A short hash that two holders of the same base model agree on.

    It covers the config (less keys that do not change the math), every tensor's name, dtype and
    shape, and the first bytes of every tensor, so different architectures, sizes or fine-tunes
    of one architecture disagree, while neither side has to read whole weights.

    Raises:
        ConfigError: the folder is not a usable model folder.
    """
    model_dir = Path(model_dir)
    load_config(model_dir)
    raw = json.loads((model_dir / "config.json").read_text())
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in raw.items() if k not in _VOLATILE_CONFIG_KEYS}, sort_keys=True).encode())
    index = tensor_index(model_dir)
    handles: dict[Path, object] = {}
    try:
        for name in sorted(index):
            e = index[name]
            h.update(f"{name}|{e.dtype}|{e.shape}|".encode())
            f = handles.get(e.file) or handles.setdefault(e.file, e.file.open("rb"))
            f.seek(e.start)  # type: ignore[attr-defined]
            h.update(f.read(min(_SAMPLE_BYTES, e.end - e.start)))  # type: ignore[attr-defined]
    finally:
        for f in handles.values():
            f.close()  # type: ignore[attr-defined]
    return h.hexdigest()[:16]
