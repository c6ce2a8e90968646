"""The adapter protocol on the cloud: LoRA applied here, from weights the edge sends once per step.

Per stream, `WeightCache` holds every module's (A, B) the edge has sent; a StepWeights adds to it
(all or nothing) and opens an `AdapterStep`. Each micro-batch of that step computes its deltas with
a `CloudLora`: PEFT's maths (common/lora_math.py) with the keyed dropout masks, trained modules as
leaves of their own per micro-batch (so concurrent micro-batches never add into one .grad). As the
backward passes a layer, each micro-batch hands its trained modules' gradients to the step
(`AdapterStep.deposit`), which sums every module over the micro-batches in micro-batch order (the
result does not depend on which thread finished first) and sends a layer's LoraGrads as soon as
all its trained modules are summed: the top layers' gradients cross the wire while the lower
layers' backward still runs.

Kill modes keep their meaning (DESIGN.md): `dropped` layers are ABSENT (no delta, no weights sent);
`detached` ones are FORWARD (delta applied, no gradient through it); `frozen` ones above the lowest
active layer are FORWARD_BACKWARD without being trained (the gradient flows through their low-rank
path, none is returned).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
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
        # copies: a view would keep the whole received message alive while any one of its modules is held
        new.update((m, (a.clone(), b.clone())) for m, (a, b) in zip(modules, layout.unpack(flat, modules)))
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
        layout = spec.layout
        self._parts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> micro-batch -> dA, dB
        self._summed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> dA, dB over all micro-batches
        self._due: dict[int, set[int]] = {}  # layer -> its trained modules not yet summed
        for m in trained:
            self._due.setdefault(layout.layer_of(m), set()).add(m)
        self._lock = threading.Lock()

    def begin(self, begin: pb.StepBegin, send: Callable[[Frame], None]) -> CloudLora:
        """The LoRA of one micro-batch of this step, after checking its StepBegin against the step; `send`
        sends its LoraGrads.

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
        return CloudLora(self, begin.micro_batch, roles, send)

    def deposit(self, micro_batch: int, module: int, da: torch.Tensor, db: torch.Tensor) -> Frame | None:
        """Keep one micro-batch's gradient of one trained module (each micro-batch gives each module once:
        CloudLora sees to it). Once every micro-batch has given it, it is summed in micro-batch order
        (g0 + g1 + g2 ..., whichever thread finished first); once every trained module of its layer is
        summed, the LoraGrads to send."""
        layout = self.spec.layout
        with self._lock:
            parts = self._parts.setdefault(module, {})
            parts[micro_batch] = (da, db)
            if len(parts) < self.micro_batches:
                return None
            ordered = [parts[mb] for mb in range(self.micro_batches)]
            self._summed[module] = (_ordered_sum([g[0] for g in ordered]), _ordered_sum([g[1] for g in ordered]))
            del self._parts[module]
            due = self._due[layout.layer_of(module)]
            due.discard(module)
            if due:
                return None
            modules = sorted(m for m in self._summed if layout.layer_of(m) == layout.layer_of(module))
            ready = [self._summed.pop(m) for m in modules]
        flat = layout.pack([g for pair in ready for g in pair])
        msg = pb.CloudMessage(lora_grads=pb.LoraGrads(step=self.step, modules=modules))
        data = codecs.encode_into(msg.lora_grads.grads, flat, self.spec.codec)
        return Frame(msg, {"grads": data})


def _ordered_sum(tensors: list[torch.Tensor]) -> torch.Tensor:
    out = tensors[0]
    for t in tensors[1:]:
        out = out + t
    return out


class CloudLora:
    """The LoRA of one micro-batch: what the stack's slots add, and its gradients as the backward makes them.

    Each trained module's leaves carry a hook that fires when the backward has accumulated their gradient,
    which hands the pair to the step at once: the top layers' LoraGrads leave while the layers below are
    still running their backward.
    """

    def __init__(self, step: AdapterStep, micro_batch: int, roles: list[int], send: Callable[[Frame], None]) -> None:
        self.step, self.micro_batch, self.roles, self.send = step, micro_batch, roles, send
        spec = step.spec
        self._index = {p: t for t, p in enumerate(spec.paths)}
        trained = set(step.trained)
        # trained modules get leaves of this micro-batch only (views, no copy); the rest are constants
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {
            m: tuple(w.detach().requires_grad_(m in trained) for w in ab)  # type: ignore[misc]
            for m, ab in step.weights.items()
        }
        self._got: dict[int, list[torch.Tensor | None]] = {m: [None, None] for m in step.trained}
        self._given: set[int] = set()  # trained modules whose gradients this micro-batch has handed over
        for m in step.trained:
            for i, leaf in enumerate(self._params[m]):
                leaf.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, m, i))

    def _grad_ready(self, module: int, i: int, leaf: torch.Tensor) -> None:
        got = self._got[module]
        got[i] = leaf.grad
        if got[0] is not None and got[1] is not None:
            self._deposit(module, got[0], got[1])

    def _deposit(self, module: int, da: torch.Tensor, db: torch.Tensor) -> None:
        if module in self._given:
            return
        self._given.add(module)
        frame = self.step.deposit(self.micro_batch, module, da, db)
        if frame is not None:
            self.send(frame)

    def finish(self) -> None:
        """After this micro-batch's backward: a trained module the backward did not reach gives zeros."""
        for m in self.step.trained:
            if m not in self._given:
                a, b = self._params[m]
                got = self._got[m]
                self._deposit(m, got[0] if got[0] is not None else torch.zeros_like(a),
                              got[1] if got[1] is not None else torch.zeros_like(b))

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
