"""The curious operator's recording: what crossed the wire in a session's first steps, as the cloud held it.

`dlora-cloud serve --record DIR` keeps, for the first `--record-steps` steps of every session, a copy of
every tensor that crossed (cloud_server/recorder.py writes it); an attack harness on the device side reads
it back (`list_sessions`, `load_session`) and attacks exactly what a curious cloud operator sees. Both sides
import only this module, which owns the format:

    DIR/                                   0700, refused if group/world accessible or not a folder
      <session_id>/                        0700
        mb-<step:06d>-<micro_batch:02d>.safetensors      0600, one per micro-batch, written when it ends

Tensors, float32 (uint8 for the mask), contiguous, on the CPU:
    step_begin (B, T, E), attention_mask (B, T), hidden (B, T, H), hidden_grad (B, T, H) (train steps),
    lora_x.{layer}.{group} (B, T, in): the input of a LoRA group (layerwise: what LoraForward carried;
        adapter: what the cloud's own LoRA read),
    layerwise: lora_delta.{layer}.{group} (B, T, out), lora_grad_output.{layer}.{group} (B, T, out),
        lora_grad_input.{layer}.{group} (B, T, in),
    adapter: lora_A.{layer}.{path} (r, in), lora_B.{layer}.{path} (out, r) for every module the step's
        StepWeights carried (path like "self_attn.q_proj"),
    input_grad (B, T, E): the gradient w.r.t. the StepBegin tensor, where the cloud sends one back.
The safetensors metadata holds one key, "dlora": JSON with META_FIELDS ("format": FORMAT).

A recording is local, but it is still input: the reader opens safetensors only (never a pickle) and refuses
a file name, a format or a metadata record it does not know, with one line.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from common.errors import ConfigError
from common.wire.protocol import is_session_id

FORMAT = 1  # the "format" of the metadata; a reader refuses any other
META_KEY = "dlora"  # the one safetensors metadata key
META_FIELDS = (
    "session_id",
    "step",
    "micro_batch",
    "train",
    "protocol",
    "epoch",
    "model_type",
    "num_layers",
    "first_layer",
    "fingerprint",
    "groups",
    "rank",
    "alpha",
    "lora_dropout",
    "codec_up",
    "codec_down",
    "format",
)
_FILE = re.compile(r"mb-(\d{6,})-(\d{2,})\.safetensors")
_TEMP = re.compile(r"\.mb-\d{6,}-\d{2,}\.safetensors\.[0-9a-f]+\.tmp")  # a write a crash cut short: skipped


def file_name(step: int, micro_batch: int) -> str:
    """The file of one micro-batch: mb-000012-01.safetensors."""
    return f"mb-{step:06d}-{micro_batch:02d}.safetensors"


@dataclass(frozen=True)
class RecordedMicroBatch:
    """One micro-batch as the cloud held it: the metadata record and the tensors by name."""

    meta: dict
    tensors: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return int(self.meta["step"])

    @property
    def micro_batch(self) -> int:
        return int(self.meta["micro_batch"])


# -- the writer's side (the cloud)
def prepare_root(root: Path) -> Path:
    """The recording folder, made 0700 if missing.

    Raises:
        ConfigError: it is not a folder, or group or other users may access it.
    """
    root = Path(root)
    try:
        if not root.exists():
            root.mkdir(mode=0o700, parents=True)
            root.chmod(0o700)  # whatever the umask
        st = root.stat()
    except OSError as e:
        raise ConfigError(f"--record {root}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"--record {root}: not a folder; name a folder (made 0700 if missing)")
    if st.st_mode & 0o077:
        raise ConfigError(
            f"--record {root}: mode {stat.S_IMODE(st.st_mode):04o} lets other users read what sessions "
            f"sent; chmod 700 {root}"
        )
    return root


def session_dir(root: Path, session_id: str) -> Path:
    """DIR/<session_id>/, made 0700 if missing.

    Raises:
        ConfigError: session_id is not one the cloud issues (it names a folder).
    """
    if not is_session_id(session_id):
        raise ConfigError(f"recording: session id {session_id[:40]!r} is not one the cloud issues")
    path = Path(root) / session_id
    if not path.is_dir():
        path.mkdir(mode=0o700)
        path.chmod(0o700)
    return path


def recorded_steps(root: Path, session_id: str) -> set[int]:
    """The steps a session already has files of (a resumed session continues its count)."""
    path = Path(root) / session_id
    if not is_session_id(session_id) or not path.is_dir():
        return set()
    return {int(m.group(1)) for p in path.iterdir() if (m := _FILE.fullmatch(p.name))}


def write_micro_batch(root: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write one micro-batch's file (0600) atomically: a temporary name in the same folder, then os.replace.

    Raises:
        ConfigError: meta lacks a field of META_FIELDS, or its session id is not one the cloud issues.
        OSError: the write failed.
    """
    meta = {**meta, "format": FORMAT}
    missing = [f for f in META_FIELDS if f not in meta]
    if missing:
        raise ConfigError(f"recording: metadata lacks {', '.join(missing)}")
    folder = session_dir(root, meta["session_id"])
    name = file_name(int(meta["step"]), int(meta["micro_batch"]))
    data = save({k: v.contiguous() for k, v in tensors.items()}, metadata={META_KEY: json.dumps(meta)})
    temp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(temp, folder / name)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return folder / name


# -- the reader's side (the attack harness)
def list_sessions(root: Path) -> list[str]:
    """The session ids a recording holds, sorted.

    Raises:
        ConfigError: root is not a folder, or holds an entry that is not a session's folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"recording {root}: not a folder")
    out = []
    for p in root.iterdir():
        if not (is_session_id(p.name) and p.is_dir() and not p.is_symlink()):
            raise ConfigError(f"recording {root}: {p.name[:60]!r} is not a session's folder")
        out.append(p.name)
    return sorted(out)


def load_session(root: Path, session_id: str) -> list[RecordedMicroBatch]:
    """Every recorded micro-batch of a session, sorted by (step, micro_batch).

    Raises:
        ConfigError: an unknown session, a file name, file or metadata this format does not know.
    """
    if not is_session_id(session_id):
        raise ConfigError(f"recording: {session_id[:40]!r} is not a session id")
    folder = Path(root) / session_id
    if not folder.is_dir() or folder.is_symlink():
        raise ConfigError(f"recording {root}: no session {session_id}")
    found = []
    for p in folder.iterdir():
        if _TEMP.fullmatch(p.name):
            continue
        m = _FILE.fullmatch(p.name)
        if m is None or not p.is_file() or p.is_symlink():
            raise ConfigError(f"recording {folder}: {p.name[:60]!r} is not a micro-batch file (mb-STEP-MB.safetensors)")
        found.append(_read(p, session_id, int(m.group(1)), int(m.group(2))))
    return sorted(found, key=lambda r: (r.step, r.micro_batch))


def _read(path: Path, session_id: str, step: int, micro_batch: int) -> RecordedMicroBatch:
    """One file, checked against its name and FORMAT.

    Raises:
        ConfigError: not safetensors, no or bad metadata, another format, or a name that disagrees with it.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(META_KEY)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own types and OSError; one line for all
        raise ConfigError(f"recording {path}: not a safetensors file ({type(e).__name__})") from None
    try:
        meta = json.loads(raw) if raw is not None else None
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise ConfigError(f"recording {path}: no {META_KEY!r} metadata record")
    if meta.get("format") != FORMAT:
        raise ConfigError(f"recording {path}: format {meta.get('format')!r}, this reader knows format {FORMAT}")
    missing = [k for k in META_FIELDS if k not in meta]
    if missing:
        raise ConfigError(f"recording {path}: metadata lacks {', '.join(missing)}")
    if (meta["session_id"], meta["step"], meta["micro_batch"]) != (session_id, step, micro_batch):
        raise ConfigError(
            f"recording {path}: its metadata names session {str(meta['session_id'])[:40]} step "
            f"{meta['step']} micro-batch {meta['micro_batch']}, unlike its place"
        )
    return RecordedMicroBatch(meta, tensors)
