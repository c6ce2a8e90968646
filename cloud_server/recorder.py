"""`serve --record DIR`: the cloud keeps a copy of what crosses in the first `--record-steps` steps of a session.

The one exception to the rule that the cloud keeps nothing of a session: it is off by default, and exists so
that an attack harness attacks exactly what a curious cloud operator sees (docs/security.md). The format is
common/recording.py's. A session that is not recorded costs nothing: its dispatcher holds no
`SessionRecorder`, its micro-batches no `StepRecorder`, and the hooks in step.py, session.py are
`if rec:` and no more.

Hooks (each a line or two where the tensor is decoded or sent):
- session.py: a `SessionRecorder` per stream (`session_recorder`); each StepBegin asks it for the micro-batch's
  `StepRecorder` (`micro_batch`), None past the first N steps; a StepWeights gives it the step's modules
  (`step_weights`), an answered EpochReport its epoch (`reported`).
- step.py: the StepBegin's tensors, Hidden, HiddenGrad, each LoraForward/LoraDelta and LoraBackward/LoraGrad
  (`StepRecorder.add`), the input the adapter protocol's LoRA reads (`add_once`), and the file when the
  micro-batch ends (`save`). "input_grad": where the cloud sends dL/d(StepBegin tensor) back (device-side
  first blocks), one `rec.add("input_grad", grad)` next to that send records it.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from common.recording import recorded_steps, write_micro_batch
from common.scheduler import KRState

if TYPE_CHECKING:
    from cloud_server.adapter import LoraSpec
    from cloud_server.kr_queue import KRQueue
    from cloud_server.session import SessionSpec
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig
    from common.pb.dlora.v1 import dlora_pb2 as pb

log = logging.getLogger(__name__)


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of what the cloud holds, floats as float32, that no later in-place change can reach."""
    t = tensor.detach()
    return (t.float() if t.is_floating_point() else t).cpu().clone().contiguous()


class SessionRecorder:
    """One session stream's recording: which steps it keeps, the epoch, the step's LoRA weights (adapter)."""

    def __init__(self, root: Path, steps: int, meta: dict, epoch: int = 0) -> None:
        """meta: the session's fields of the metadata record; epoch: reports the session had before this stream."""
        self.root, self.steps, self.meta, self.epoch = root, steps, meta, epoch
        self.kept = recorded_steps(root, meta["session_id"])  # a resumed session continues its count
        self._weights: tuple[int, dict[str, torch.Tensor]] = (-1, {})  # (step, lora_A/lora_B of its StepWeights)
        self._lock = threading.Lock()  # micro-batches start on the loop's thread and save on pool threads

    def _wants(self, step: int) -> bool:
        return step in self.kept or len(self.kept) < self.steps

    def micro_batch(self, begin: pb.StepBegin) -> StepRecorder | None:
        """The recorder of a micro-batch that begins, or None past the session's first N steps."""
        with self._lock:
            if not self._wants(begin.step):
                return None
            self.kept.add(begin.step)
            meta = {
                **self.meta,
                "step": begin.step,
                "micro_batch": begin.micro_batch,
                "train": begin.train,
                "epoch": self.epoch,
            }
        return StepRecorder(self, meta)

    def step_weights(
        self, step: int, lora: LoraSpec, modules: dict[int, tuple[torch.Tensor, torch.Tensor]], continues: bool
    ) -> None:
        """A StepWeights' modules (module -> (A, B) as decoded), copied if the step is one to keep."""
        with self._lock:
            if not self._wants(step):
                return
            kept = self._weights[1] if continues and self._weights[0] == step else {}
            for m, (a, b) in modules.items():
                name = f"{lora.layout.layer_of(m)}.{lora.paths[m % lora.layout.per_layer]}"
                kept[f"lora_A.{name}"], kept[f"lora_B.{name}"] = _copy(a), _copy(b)
            self._weights = (step, kept)

    def weights_of(self, step: int) -> dict[str, torch.Tensor]:
        with self._lock:
            return dict(self._weights[1]) if self._weights[0] == step else {}

    def reported(self, epoch: int) -> None:
        """An EpochReport of `epoch` was answered: steps from now on belong to the epoch after it."""
        with self._lock:
            self.epoch = max(self.epoch, epoch)


class StepRecorder:
    """One micro-batch's copies, written as one file when it ends."""

    def __init__(self, session: SessionRecorder, meta: dict) -> None:
        self.session, self.meta = session, meta
        self.tensors: dict[str, torch.Tensor] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.tensors[name] = _copy(tensor)

    def add_once(self, name: str, tensor: torch.Tensor) -> None:
        """For an input several targets read (adapter protocol): the first one's."""
        if name not in self.tensors:
            self.add(name, tensor)

    def save(self) -> None:
        """Write the micro-batch's file; a failed write is logged, and the session goes on."""
        tensors = {**self.session.weights_of(self.meta["step"]), **self.tensors}
        try:
            write_micro_batch(self.session.root, self.meta, tensors)
        except OSError as e:
            log.error(
                "session %s step %d/%d: recording not written: %s",
                self.meta["session_id"],
                self.meta["step"],
                self.meta["micro_batch"],
                e,
            )


def session_recorder(
    config: ServeConfig, spec: SessionSpec, stack: DecoderStack, kr: KRQueue
) -> SessionRecorder | None:
    """The recorder of a session stream when `--record` is on, else None."""
    if config.record is None:
        return None
    stored = kr.store.load(spec.session_id)
    epoch = KRState.from_json(stored["kr_state"]).epochs_done if stored else 0
    lora = spec.lora
    meta = {
        "session_id": spec.session_id,
        "protocol": spec.protocol,
        "model_type": stack.config.model_type,
        "num_layers": stack.num_layers,
        "first_layer": getattr(spec, "edge_layers", 0),  # the first block this cloud runs (--edge-layers k: k)
        "fingerprint": stack.fingerprint,
        "groups": [list(g) for g in spec.groups],
        "rank": lora.layout.rank if lora else None,
        "alpha": lora.alpha if lora else None,
        "lora_dropout": lora.dropout if lora else None,
        "codec_up": spec.codec_up,
        "codec_down": spec.codec_down,
    }
    return SessionRecorder(config.record, config.record_steps, meta, epoch)
