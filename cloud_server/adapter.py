"""The adapter protocol on the cloud: LoRA applied here, from weights the edge sends once per step.

Per stream, `WeightCache` holds every module's (A, B) the edge has sent; a StepWeights adds to it
(all or nothing) and opens an `AdapterStep`. Each micro-batch of that step computes its deltas with
a `CloudLora`: PEFT's maths (common/lora_math.py) with the keyed dropout masks, trained modules as
leaves of their own per micro-batch (so concurrent micro-batches never add into one .grad). When the
step's last micro-batch has run its backward, `AdapterStep.deposit` sums the micro-batches' gradients
in micro-batch order and returns the LoraGrads to send: the result does not depend on which thread
finished first.

Kill modes keep their meaning (DESIGN.md): `dropped` layers are ABSENT (no delta, no weights sent);
`detached` ones are FORWARD (delta applied, no gradient through it); `frozen` ones above the lowest
active layer are FORWARD_BACKWARD without being trained (the gradient flows through their low-rank
path, none is returned).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch

from common.errors import ProtocolError
from common.lora_math import dropout_key, lora_delta
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs
from common.wire.adapter import AdapterLayout
from common.wire.frames import Frame


@dataclass(frozen=True)
class LoraSpec:
    """The Hello's LoRA settings of an adapter-protocol session."""

    layout: AdapterLayout
    alpha: float
    dropout: float
    seed: int
    codec: str  # of weights and gradients: "float32" | "bfloat16"
    paths: tuple[str, ...]  # the targets of a layer in family order (index t of a module)

    @property
    def scaling(self) -> float:
        return self.alpha / self.layout.rank

    def record(self) -> dict:
        """What must match when the session resumes."""
        return {"rank": self.layout.rank, "alpha": self.alpha, "dropout": self.dropout, "seed": self.seed,
                "codec_weights": self.codec}


class WeightCache:
    """The modules' weights this stream's edge has sent, on the stack's device (float32)."""

    def __init__(self, spec: LoraSpec, device: torch.device) -> None:
        self.spec, self.device = spec, device
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, frame: Frame, max_micro_batches: int) -> AdapterStep:
        """Check a StepWeights, add its weights, and return the step it opens. On any error nothing changes.

        Raises:
            ProtocolError: bad module numbers, micro-batch count, codec, shape or values.
        """
        msg: pb.StepWeights = frame.body
        layout = self.spec.layout
        where = f"StepWeights of step {msg.step}"
        if not 1 <= msg.micro_batches <= max_micro_batches:
            raise ProtocolError(f"{where}: micro_batches {msg.micro_batches}, this cloud takes 1..{max_micro_batches} "
                                "(--max-micro-batches)")
        modules = layout.check_modules(msg.modules, f"{where}.modules")
        trained = layout.check_modules(msg.trained, f"{where}.trained")
        if trained and not msg.train:
            raise ProtocolError(f"{where}: names trained modules in a step that does not train")
        # the byte length is checked against the module count before anything is allocated
        flat = codecs.decode(msg.weights, f"{where}.weights", (layout.total_numel(modules),), self.spec.codec,
                             torch.float32, frame.payloads.get("weights"), self.device)
        new = dict(self.weights)
        new.update(zip(modules, layout.unpack(flat, modules)))
        missing = [m for m in trained if m not in new]
        if missing:
            raise ProtocolError(f"{where}: asks for the gradient of module {missing[0]}, whose weights it never sent")
        self.weights = new
        return AdapterStep(self.spec, msg.step, msg.micro_batches, msg.train, trained, new)


class AdapterStep:
    """One optimizer step of an adapter session: its weights, its trained modules, its micro-batches' gradients."""

    def __init__(self, spec: LoraSpec, step: int, micro_batches: int, train: bool, trained: list[int],
                 weights: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.spec, self.step, self.micro_batches, self.train = spec, step, micro_batches, train
        self.trained, self.weights = trained, weights
        self.started: set[int] = set()  # micro-batches begun
        self._grads: dict[int, list[torch.Tensor]] = {}  # micro-batch -> its dA, dB of every trained module
        self._lock = threading.Lock()

    def begin(self, begin: pb.StepBegin) -> CloudLora:
        """The LoRA of one micro-batch of this step, after checking its StepBegin against the step.

        Raises:
            ProtocolError: another step, a micro-batch out of range or repeated, another train flag,
                a present layer without weights, or a trained module outside a FORWARD_BACKWARD layer.
        """
        where = f"step {begin.step} micro-batch {begin.micro_batch}"
        if begin.step != self.step:
            raise ProtocolError(f"{where}: the last StepWeights was for step {self.step}; send the step's weights first")
        if begin.micro_batch >= self.micro_batches:
            raise ProtocolError(f"{where}: StepWeights announced {self.micro_batches} micro-batches")
        if begin.train != self.train:
            raise ProtocolError(f"{where}: train={begin.train}, its StepWeights said train={self.train}")
        layout, roles = self.spec.layout, list(begin.layer_roles)
        for layer, role in enumerate(roles):
            if role == pb.ABSENT:
                continue
            for t in range(layout.per_layer):
                if layout.module(layer, t) not in self.weights:
                    raise ProtocolError(f"{where}: layer {layer} is present but the weights of its "
                                        f"{self.spec.paths[t]} were never sent")
        for m in self.trained:
            if roles[layout.layer_of(m)] != pb.FORWARD_BACKWARD:
                raise ProtocolError(f"{where}: asks for the gradient of module {m}, whose layer "
                                    f"{layout.layer_of(m)} does not take part in backward")
        with self._lock:
            if begin.micro_batch in self.started:
                raise ProtocolError(f"{where} was already run")
            self.started.add(begin.micro_batch)
        return CloudLora(self, begin.micro_batch, roles)

    def deposit(self, micro_batch: int, grads: list[torch.Tensor]) -> Frame | None:
        """Keep one micro-batch's gradients; after the step's last, the LoraGrads to send (else None)."""
        with self._lock:
            self._grads[micro_batch] = grads
            if len(self._grads) < self.micro_batches:
                return None
            parts = [self._grads[mb] for mb in range(self.micro_batches)]
        # in micro-batch order, g0 + g1 + g2 ..., whichever thread finished first
        summed = [_ordered_sum([gs[i] for gs in parts]) for i in range(len(parts[0]))]
        flat = self.spec.layout.pack(summed)
        msg = pb.CloudMessage(lora_grads=pb.LoraGrads(step=self.step, modules=self.trained))
        data = codecs.encode_into(msg.lora_grads.grads, flat, self.spec.codec)
        return Frame(msg, {"grads": data})


def _ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


class CloudLora:
    """The LoRA of one micro-batch: what the stack's slots add, and, after backward, its gradients."""

    def __init__(self, step: AdapterStep, micro_batch: int, roles: list[int]) -> None:
        self.step, self.micro_batch, self.roles = step, micro_batch, roles
        spec = step.spec
        self._index = {p: t for t, p in enumerate(spec.paths)}
        trained = set(step.trained)
        # trained modules get leaves of this micro-batch only (views, no copy); the rest are constants
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            m: tuple(w.detach().requires_grad_(m in trained) for w in ab)  # type: ignore[misc]
            for m, ab in step.weights.items()
        }

    def delta(self, layer: int, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """s * B(A(dropout(x))) of target `path` in `layer` (None where the layer is ABSENT), as PEFT computes
        it: x cast to the weights' float32, the delta left in float32 (the slot adds it in the stack's dtype)."""
        role = self.roles[layer]
        t = self._index.get(path)
        if role == pb.ABSENT or t is None:
            return None
        spec = self.step.spec
        a, b = self._params[spec.layout.module(layer, t)]
        key = dropout_key(spec.seed, self.step.step, self.micro_batch, layer, t) if self.step.train else None
        xs = x if role == pb.FORWARD_BACKWARD and self.step.train else x.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and role == pb.FORWARD_BACKWARD):
            return lora_delta(xs.to(a.dtype), a, b, spec.scaling, spec.dropout, key)

    def grads(self) -> list[torch.Tensor]:
        """dA, dB of every trained module in order (zeros where backward did not reach one)."""
        out = []
        for m in self.step.trained:
            for w in self._params[m]:
                out.append(w.grad if w.grad is not None else torch.zeros_like(w))
        return out
