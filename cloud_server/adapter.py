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

from common.errors import ProtocolError, SessionError, SilenceError
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
    edge_layers: int = 0  # k: layers 0..k-1 run on the edge, their LoRA with them (never sent here)

    @property
    def scaling(self) -> float:
        return self.alpha / self.layout.rank

    def record(self) -> dict:
        """What must match when the session resumes."""
        return {"rank": self.layout.rank, "alpha": self.alpha, "dropout": self.dropout, "seed": self.seed,
                "codec_weights": self.codec}


class WeightCache:
    """The modules' weights this stream's edge has sent, on the stack's device (float32)."""

    def __init__(self, spec: LoraSpec, device: torch.device, wait_s: float = 600.0) -> None:
        """wait_s: how long a layer waits for weights still to come (--step-timeout)."""
        self.spec, self.device, self.wait_s = spec, device, wait_s
        self.weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, frame: Frame, max_micro_batches: int, open_step: AdapterStep | None = None) -> AdapterStep:
        """Check a StepWeights and add its weights: to `open_step` when it continues that step (its `more` said
        more would follow), else to a new step. Returns the step. On any error nothing changes.

        Raises:
            ProtocolError: bad module numbers, micro-batch count, codec, shape or values; a continuation that
                differs from its step's first message; trained modules whose weights the last one leaves out.
        """
        msg: pb.StepWeights = frame.body
        layout = self.spec.layout
        where = f"StepWeights of step {msg.step}"
        if not 1 <= msg.micro_batches <= max_micro_batches:
            raise ProtocolError(f"{where}: micro_batches {msg.micro_batches}, this cloud takes 1..{max_micro_batches} "
                                "(--max-micro-batches)")
        modules = layout.check_modules(msg.modules, f"{where}.modules")
        trained = layout.check_modules(msg.trained, f"{where}.trained")
        k = self.spec.edge_layers
        edge_owned = next((m for m in (*modules, *trained) if layout.layer_of(m) < k), None)
        if edge_owned is not None:
            raise ProtocolError(f"{where}: module {edge_owned} lies in layer {layout.layer_of(edge_owned)}, one of "
                                f"the {k} layers the edge runs itself (Hello.edge_layers); its LoRA stays there")
        if trained and not msg.train:
            raise ProtocolError(f"{where}: names trained modules in a step that does not train")
        step = open_step if open_step is not None and open_step.more and open_step.step == msg.step else None
        if step is not None and (msg.micro_batches, msg.train, trained) != (step.micro_batches, step.train, step.trained):
            raise ProtocolError(f"{where}: continues the step with other micro_batches, train or trained than it began")
        layers = {layout.layer_of(m) for m in modules}
        if (msg.more or step is not None) and (len(layers) > 1 or (step is not None and layers
                                                                   and min(layers) <= step.through)):
            raise ProtocolError(f"{where}: a step's weights sent layer by layer go one layer per message, "
                                "layers ascending")
        # the byte length is checked against the module count before anything is allocated
        flat = codecs.decode(msg.weights, f"{where}.weights", (layout.total_numel(modules),), self.spec.codec,
                             torch.float32, frame.payloads.get("weights"), self.device)
        new = dict(self.weights)
        # copies: a view would keep the whole received message alive while any one of its modules is held
        new.update((m, (a.clone(), b.clone())) for m, (a, b) in zip(modules, layout.unpack(flat, modules)))
        missing = [m for m in trained if m not in new]
        if missing and not msg.more:
            raise ProtocolError(f"{where}: asks for the gradient of module {missing[0]}, whose weights it never sent")
        self.weights = new
        through = max(layers) if layers else (step.through if step is not None else -1)
        if step is None:
            return AdapterStep(self.spec, msg.step, msg.micro_batches, msg.train, trained, new, msg.more, self.device,
                               self.wait_s, through)
        step.add(new, msg.more, through)
        return step


class AdapterStep:
    """One optimizer step of an adapter session: its weights (which may still be arriving, layer by layer),
    its trained modules, its micro-batches' gradients."""

    def __init__(self, spec: LoraSpec, step: int, micro_batches: int, train: bool, trained: list[int],
                 weights: dict[int, tuple[torch.Tensor, torch.Tensor]], more: bool = False,
                 device: torch.device | str = "cpu", wait_s: float = 600.0, through: int = -1) -> None:
        self.spec, self.step, self.micro_batches, self.train = spec, step, micro_batches, train
        self.device = torch.device(device)
        self.trained, self.weights, self.more = trained, weights, more
        # while more come: the highest layer whose weights are in (layers ascending, so every layer up to it is
        # as the step needs it; the stream's cache may still hold the last step's values of the layers above)
        self.through = through
        self.wait_s = wait_s  # longest wait for a layer's weights still to come (the cloud's --step-timeout)
        self.started: set[int] = set()  # micro-batches begun
        layout = spec.layout
        self._parts: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}  # module -> micro-batch -> dA, dB
        self._summed: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> dA, dB over all micro-batches
        self._due: dict[int, set[int]] = {}  # layer -> its trained modules not yet summed
        for m in trained:
            self._due.setdefault(layout.layer_of(m), set()).add(m)
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)  # more weights came, or none will
        self._ended = False  # the stream ended: nothing will answer a StepError

    def add(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor]], more: bool, through: int) -> None:
        """A continuation's weights (all the stream holds now), up to layer `through`; `more`: others to come."""
        with self._arrived:
            self.weights, self.more, self.through = weights, more, through
            self._arrived.notify_all()

    def abandon(self, stream_ended: bool = False) -> None:
        """No more weights will come (a continuation was refused, or the stream ended): waiting layers give up."""
        with self._arrived:
            self.more = False
            self._ended = self._ended or stream_ended
            self._arrived.notify_all()

    def weight(self, module: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A module's (A, B), waiting while the step's weights are still arriving.

        Raises:
            ProtocolError: the step's last StepWeights came without it.
            SilenceError: it did not come within wait_s.
            SessionError: the stream ended while it waited.
        """
        with self._arrived:
            if not self._arrived.wait_for(lambda: layer <= self.through or not self.more, self.wait_s):
                raise SilenceError(f"step {self.step}: the weights of layer {layer} did not come for {self.wait_s:g}s "
                                   "(--step-timeout)")
            if self._ended:
                raise SessionError(f"step {self.step}: the stream ended while layer {layer} waited for its weights")
            if module not in self.weights:
                raise self._never_sent(f"step {self.step}", module)
            return self.weights[module]

    def _never_sent(self, where: str, module: int) -> ProtocolError:
        layout = self.spec.layout
        return ProtocolError(f"{where}: layer {layout.layer_of(module)} is present but the weights of its "
                             f"{self.spec.paths[module % layout.per_layer]} were never sent")

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
        for layer, role in enumerate(roles if not self.more else ()):  # while weights still come, each layer waits
            if role == pb.ABSENT or layer < self.spec.edge_layers:  # the edge's layers: their LoRA runs there
                continue
            for t in range(layout.per_layer):
                if layout.module(layer, t) not in self.weights:
                    raise self._never_sent(where, layout.module(layer, t))
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
        self._trained = set(step.trained)
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # module -> (A, B), as first used
        self._got: dict[int, list[torch.Tensor | None]] = {m: [None, None] for m in step.trained}
        self._given: set[int] = set()  # trained modules whose gradients this micro-batch has handed over

    def _module(self, module: int, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A module's (A, B) for this micro-batch, made on first use (its weights may still be on their way):
        a trained module's are leaves of this micro-batch only (views, no copy), with the hook that hands their
        gradients over; the others are constants."""
        if module not in self._params:
            trained = module in self._trained
            pair = tuple(w.detach().requires_grad_(trained) for w in self.step.weight(module, layer))
            if trained:
                for i, leaf in enumerate(pair):
                    leaf.register_post_accumulate_grad_hook(functools.partial(self._grad_ready, module, i))
            self._params[module] = pair  # type: ignore[assignment]
        return self._params[module]

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
        layout = self.step.spec.layout
        for m in self.step.trained:
            if m not in self._given:
                fin, fout = layout.shapes[m % layout.per_layer]
                got = self._got[m]
                zeros = functools.partial(torch.zeros, device=self.step.device)
                self._deposit(m, got[0] if got[0] is not None else zeros(layout.rank, fin),
                              got[1] if got[1] is not None else zeros(fout, layout.rank))
        self._params.clear()  # the leaves' hooks point back here: break the cycle now, not at the next gc

    def delta(self, layer: int, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """s * B(A(dropout(x))) of target `path` in `layer` (None where the layer is ABSENT), as PEFT computes
        it: x cast to the weights' float32, the delta left in float32 (the slot adds it in the stack's dtype)."""
        role = self.roles[layer]
        t = self._index.get(path)
        if role == pb.ABSENT or t is None:
            return None
        spec = self.step.spec
        a, b = self._module(spec.layout.module(layer, t), layer)
        if a.device != x.device:  # a layer placed on another device (--device-map): differentiable copies
            a, b = a.to(x.device), b.to(x.device)
        key = dropout_key(spec.seed, self.step.step, self.micro_batch, layer, t) if self.step.train else None
        xs = x if role == pb.FORWARD_BACKWARD and self.step.train else x.detach()
        with torch.set_grad_enabled(torch.is_grad_enabled() and role == pb.FORWARD_BACKWARD):
            return lora_delta(xs.to(a.dtype), a, b, spec.scaling, spec.dropout, key)
