"""One step on the device, the mirror of the cloud's StepRun (cloud_server/step.py).

The cloud drives the order inside a micro-batch: its forward and backward decide which layer calls
come when. `RemoteStep` sends every micro-batch's StepBegin, then answers each call as it arrives:
- LoraForward{x}: the group's LoRA delta s·B(A·drop(x)), keeping x and the delta's graph when the
  layer takes part in backward (the step's pending LoRA state, owned here and nowhere else);
- Hidden{h}: the head's callback computes the loss locally and returns dL/dh (HiddenGrad);
- LoraBackward{dL/d(delta)}: backward through the kept graph, which accumulates dA and dB in the
  LoRA parameters' .grad, and answers dL/dx (LoraGrad);
- InputGrad{dL/d(StepBegin tensor)} (only with edge layers, `--edge-layers k`, when one of layers
  0..k-1 takes part in backward): backward through the device's own blocks from the tensor the
  StepBegin carried, which accumulates their LoRA's dA and dB;
- StepDone: that micro-batch is finished.
The link (link.py) only moves and counts the messages.

In the adapter protocol (the link's `protocol`) the cloud runs LoRA itself: before the StepBegins
this side sends StepWeights (the modules of the present layers the cloud does not hold yet on this
stream, compared by value, so a killed module's unchanged weights go once), there are no LoraForward
or LoraBackward calls, and during the backward the cloud sends LoraGrads, layer by layer as each
trained module's gradient is complete (summed over the micro-batches), which land in the
parameters' .grad; the step ends when every trained module's gradient and every StepDone are in.

`RemoteStack.forward(embeddings, mask, roles) -> hidden` is the same exchange without training: the
frozen stack on the cloud as a plain function, for evaluation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

import torch

from common.errors import ProtocolError, one_line
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs
from common.wire.adapter import AdapterLayout
from common.wire.frames import Frame
from edge_client.remote.link import CloudLink, cloud_error
from edge_client.train.engines import Traffic
from edge_client.train.lora import LoraAdapter

log = logging.getLogger(__name__)

# (micro-batch index in the step, final hidden states (b, t, E_out)) -> dL/dh when training, else None
HeadFn = Callable[[int, torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step, as it goes up in its StepBegin."""

    embeddings: torch.Tensor  # (b, t, E), or (b, t, H) after the edge's blocks: what the StepBegin carries
    attention_mask: torch.Tensor  # (b, t)
    # the same tensor attached to the graph of the edge's blocks when they take part in backward: InputGrad is
    # backpropagated from it (None: nothing on this device below the cloud trains)
    source: torch.Tensor | None = None


class RemoteStep:
    """The device's half of one step: its micro-batches, their pending LoRA state, and the answers.

    With several micro-batches and a `heads` executor, a micro-batch's head and loss run there while
    this thread answers the other micro-batches' layer calls: its backward then starts while they
    finish their forward (on a slow link, its gradients go down while their deltas go up).
    """

    def __init__(self, link: CloudLink, lora: LoraAdapter | None, *, step: int, roles: list[int], train: bool,
                 head: HeadFn, heads: Executor | None = None) -> None:
        self.link, self.lora, self.step, self.roles, self.train = link, lora, step, roles, train
        self.head, self.heads = head, heads
        self.traffic = Traffic()
        self._shapes: dict[int, tuple[int, int]] = {}  # micro-batch -> (b, t)
        # (micro-batch, layer, group) -> (x, delta) kept for the backward: the LoRA graph of the step
        self._saved: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.edge_layers = link.edge.edge_layers  # k: layers 0..k-1 run on this device (their LoRA never leaves)
        self._sources: dict[int, torch.Tensor | None] = {}  # micro-batch -> MicroBatch.source

    def run(self, parts: list[MicroBatch]) -> Traffic:
        """Send every micro-batch, answer the cloud until each is done; the step's traffic.

        All StepBegins go out first, so the cloud computes one micro-batch while this side answers
        another's calls. LoRA gradients of all micro-batches accumulate in the parameters' .grad.

        Raises:
            RemoteError: the cloud rejected the step or the stream broke (the stream is then spent).
            ProtocolError: the cloud sent a message this step does not expect.
        """
        link = self.link
        up0, down0 = link.bytes_totals()
        adapter = link.protocol == "adapter"
        # adapter: the first layer's weights before the first StepBegin, the others right after it
        weights, trained = self._step_weights(len(parts)) if adapter else ([], [])
        if weights:
            link.send(weights.pop(0), self.traffic)
        for mb, part in enumerate(parts):
            self._shapes[mb] = tuple(part.attention_mask.shape)  # type: ignore[assignment]
            self._sources[mb] = part.source
            msg = pb.EdgeMessage(step_begin=pb.StepBegin(step=self.step, micro_batch=mb, train=self.train,
                                                         layer_roles=self.roles))
            begin = msg.step_begin
            link.send(Frame(msg, {
                "embeddings": link.encode_into(begin.embeddings, part.embeddings.detach()),
                "attention_mask": codecs.encode_into(begin.attention_mask, part.attention_mask, "uint8"),  # 0/1
            }), self.traffic)
            while weights:  # after the first StepBegin: they cross while the cloud runs the first layers
                link.send(weights.pop(0), self.traffic)
        pending = set(self._shapes)
        grads_due = set(trained)  # adapter: trained modules whose gradients have not come yet
        # edge layers: the micro-batches whose InputGrad has not come yet (the cloud sends one when any of
        # layers 0..k-1 takes part in backward)
        inputs_due = set(pending) if self.train and pb.FORWARD_BACKWARD in self.roles[: self.edge_layers] else set()
        try:
            while pending or grads_due:
                frame = link.recv(self.traffic)
                kind, body = frame.kind, frame.body
                if kind == "step_error":
                    link.close()  # other micro-batches may still be in flight: this stream is spent
                    raise cloud_error(body.code, f"dlora-cloud rejected step {body.step}: {body.message}")
                if kind == "lora_grads" and adapter and body.step == self.step:
                    self._on_lora_grads(frame, grads_due)
                    continue
                mb = getattr(body, "micro_batch", -1)
                if getattr(body, "step", -1) != self.step or mb not in pending:
                    raise ProtocolError(f"cloud sent {kind} for step {getattr(body, 'step', '?')}/{mb} "
                                        f"during step {self.step}")
                if kind == "lora_forward" and not adapter:
                    self._on_lora_forward(frame)
                elif kind == "hidden":
                    self._on_hidden(frame, in_background=len(parts) > 1)
                elif kind == "lora_backward" and not adapter:
                    self._on_lora_backward(frame)
                elif kind == "input_grad":
                    self._on_input_grad(frame, inputs_due)
                elif kind == "step_done":
                    if mb in inputs_due:
                        raise ProtocolError(f"cloud finished step {self.step}/{mb} without the InputGrad of its "
                                            f"{self.edge_layers} edge layers")
                    pending.discard(mb)
                else:
                    raise ProtocolError(f"cloud sent {kind} in the middle of step {self.step}")
            # every message of the step was serialized before the cloud could answer the last one
            up, down = link.bytes_totals()
            self.traffic.bytes_up, self.traffic.bytes_down = up - up0, down - down0
            return self.traffic
        finally:
            self._saved.clear()
            self._sources.clear()

    # -- the adapter protocol
    def _step_weights(self, micro_batches: int) -> tuple[list[Frame], list[int]]:
        """The step's StepWeights, one per layer with modules the cloud lacks (at least one message), and the
        modules whose gradients the cloud will return (ascending). Marks what they carry as held by the cloud."""
        holds = self.link.cloud_holds
        by_layer: dict[int, list[int]] = {}  # modules of the present layers the cloud does not hold as they are now
        trained: list[int] = []
        if self.lora is not None:
            layout = self.lora.layout
            for layer, role in enumerate(self.roles):
                if layer < self.edge_layers:  # runs on this device, with its LoRA: nothing to send
                    continue
                for t in range(layout.per_layer if role != pb.ABSENT else 0):
                    m = layout.module(layer, t)  # = its index in lora.pairs
                    pair = self.lora.pairs[m]
                    if not _same(holds.get(m), pair):
                        by_layer.setdefault(layer, []).append(m)
                    if self.train and role == pb.FORWARD_BACKWARD and pair.A.requires_grad:
                        trained.append(m)
        chunks = list(by_layer.values()) or [[]]
        frames = []
        for i, modules in enumerate(chunks):
            pairs = [self.lora.pairs[m] for m in modules]  # type: ignore[union-attr]
            flat = AdapterLayout.pack([w for p in pairs for w in (p.A, p.B)])
            msg = pb.EdgeMessage(step_weights=pb.StepWeights(
                step=self.step, micro_batches=micro_batches, train=self.train, modules=modules, trained=trained,
                more=i < len(chunks) - 1))
            frames.append(Frame(msg, {"weights": codecs.encode_into(msg.step_weights.weights, flat,
                                                                     self.link.config.weights_wire)}))
            for m, p in zip(modules, pairs):
                holds[m] = (p.A.detach().clone(), p.B.detach().clone())
        return frames, trained

    def _on_lora_grads(self, frame: Frame, due: set[int]) -> None:
        """One LoraGrads: the summed gradients of some trained modules, each due once; they become .grad."""
        body: pb.LoraGrads = frame.body
        modules = list(body.modules)
        if self.lora is None or not modules or any(m not in due for m in modules) or modules != sorted(set(modules)):
            raise ProtocolError(f"cloud sent LoRA gradients of modules {one_line(str(modules[:8]), 60)} that step "
                                f"{self.step} does not train or already has")
        layout = self.lora.layout
        flat = codecs.decode(body.grads, f"LoraGrads of step {self.step}", (layout.total_numel(modules),),
                             self.link.config.weights_wire, payload=frame.payloads.get("grads"), device=self.lora.edge.device)
        for m, (da, db) in zip(modules, layout.unpack(flat, modules)):
            for param, grad in ((self.lora.pairs[m].A, da), (self.lora.pairs[m].B, db)):  # added, as autograd would
                param.grad = grad.clone() if param.grad is None else param.grad + grad  # own memory, not the message's
        due.difference_update(modules)

    # -- answers
    def _on_lora_forward(self, frame: Frame) -> None:
        body: pb.LoraForward = frame.body
        mb, layer, group = body.micro_batch, body.layer, body.group
        lora = self.lora
        if (lora is None or layer >= len(self.roles) or layer < self.edge_layers or self.roles[layer] == pb.ABSENT
                or (layer, group) not in lora.by_group):
            raise ProtocolError(f"cloud asked for LoRA of layer {layer} group {group}, which this step does not apply")
        b, t = self._shapes[mb]
        x = self.link.decode(frame, "x", f"LoraForward layer {layer}", (b, t, lora.group_in_width(layer, group)))
        drawn = (self.step, mb) if self.train else None  # keys the dropout masks; none in evaluation
        if self.train and self.roles[layer] == pb.FORWARD_BACKWARD:
            x = x.detach().requires_grad_(True)  # (b, t, H): its .grad is dL/dx after the backward
            with torch.enable_grad():
                delta = lora.delta(layer, group, x, drawn)  # (b, t, O)
            self._saved[(mb, layer, group)] = (x, delta)
        else:
            with torch.no_grad():
                delta = lora.delta(layer, group, x, drawn)
        msg = pb.EdgeMessage(lora_delta=pb.LoraDelta(step=self.step, micro_batch=mb, layer=layer, group=group))
        self.link.send(Frame(msg, {"delta": self.link.encode_into(msg.lora_delta.delta, delta.detach())}), self.traffic)

    def _on_lora_backward(self, frame: Frame) -> None:
        body: pb.LoraBackward = frame.body
        mb, layer, group = body.micro_batch, body.layer, body.group
        saved = self._saved.pop((mb, layer, group), None)
        if saved is None or self.lora is None:
            raise ProtocolError(f"cloud asked for the backward of layer {layer} group {group}, which has no forward")
        x, delta = saved
        b, t = self._shapes[mb]
        grad = self.link.decode(frame, "grad_output", f"LoraBackward layer {layer}",
                                (b, t, self.lora.group_width(layer, group)))  # (b, t, O)
        torch.autograd.backward(delta, grad)  # dA, dB of the group's trainable targets accumulate
        dx = x.grad if x.grad is not None else torch.zeros_like(x)  # (b, t, H)
        msg = pb.EdgeMessage(lora_grad=pb.LoraGrad(step=self.step, micro_batch=mb, layer=layer, group=group))
        self.link.send(Frame(msg, {"grad_input": self.link.encode_into(msg.lora_grad.grad_input, dx)}), self.traffic)

    def _on_input_grad(self, frame: Frame, due: set[int]) -> None:
        """dL/d(the StepBegin's tensor): backward through this device's blocks into their LoRA's .grad."""
        mb = frame.body.micro_batch
        if mb not in due:
            raise ProtocolError(f"cloud sent an InputGrad for step {self.step}/{mb}, which expects none "
                                f"({self.edge_layers} edge layers; none, or a second one)")
        due.discard(mb)
        b, t = self._shapes[mb]
        grad = self.link.decode(frame, "grad", "InputGrad", (b, t, self.link.edge.up_width))  # (b, t, H)
        source = self._sources.get(mb)
        if source is not None and source.requires_grad:
            torch.autograd.backward(source, grad)

    def _on_hidden(self, frame: Frame, in_background: bool) -> None:
        mb = frame.body.micro_batch
        b, t = self._shapes[mb]
        h = self.link.decode(frame, "hidden", "Hidden", (b, t, self.link.edge.head_width))  # (b, t, E_out)
        if in_background and self.heads is not None:
            self.heads.submit(self._answer_hidden_or_fail, mb, h)
        else:
            self._answer_hidden(mb, h)

    def _answer_hidden(self, mb: int, h: torch.Tensor) -> None:
        grad = self.head(mb, h)
        if not self.train:
            return
        if grad is None:
            raise ValueError("the head must return dL/dh when training")
        msg = pb.EdgeMessage(hidden_grad=pb.HiddenGrad(step=self.step, micro_batch=mb))
        self.link.send(Frame(msg, {"grad": self.link.encode_into(msg.hidden_grad.grad, grad)}), self.traffic)

    def _answer_hidden_or_fail(self, mb: int, h: torch.Tensor) -> None:
        try:
            self._answer_hidden(mb, h)
        except Exception as e:  # noqa: BLE001 - raised again in run(), by the link's recv
            self.link.fail(e)


def _same(held: tuple[torch.Tensor, torch.Tensor] | None, pair: torch.nn.Module) -> bool:
    """Whether the cloud holds exactly this module's current weights."""
    return held is not None and torch.equal(held[0], pair.A) and torch.equal(held[1], pair.B)


class RemoteStack:
    """The cloud's frozen decoder stack as a plain function of this device's embeddings (no training).

    Each call is one step of the session (its own step number), one micro-batch.
    """

    def __init__(self, link: CloudLink, lora: LoraAdapter | None = None) -> None:
        self.link, self.lora = link, lora
        self._steps = 0

    def forward(self, embeddings: torch.Tensor, attention_mask: torch.Tensor, roles: list[int]) -> torch.Tensor:
        """Final hidden states (after the final norm) for embeddings (B, T, E) -> (B, T, E_out).

        `roles` says per layer whether the LoRA delta is applied (pb.FORWARD) or not (pb.ABSENT).

        Raises:
            RemoteError, ProtocolError: as RemoteStep.run.
        """
        out: dict[int, torch.Tensor] = {}

        def keep(mb: int, h: torch.Tensor) -> None:
            out[mb] = h

        step = RemoteStep(self.link, self.lora, step=self._steps, roles=roles, train=False, head=keep)
        self._steps += 1
        with torch.no_grad():  # with edge layers, the embeddings go through them first
            up = self.link.edge.above(embeddings, attention_mask, self.lora, roles)  # (B, T, E) or (B, T, H)
            step.run([MicroBatch(up, attention_mask)])
        return out[0]
