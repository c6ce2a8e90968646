"""One micro-batch on the cloud, from its StepBegin to its StepDone: the step of DESIGN.md.

A remote LoRA call is a `torch.autograd.Function` (as in Petals): its forward asks the edge for
the delta, its backward asks the edge for dL/dx through the low-rank path. So a step is an
ordinary forward of the frozen stack followed by `torch.autograd.backward`, and backward stops
by itself below the lowest layer that takes part in it: only those layers' calls carry an
`anchor` that requires grad, and the frozen weights never do.

The order of one micro-batch, as `StepRun.run` performs it:
1. decode and check the StepBegin (`check_begin`): a bad one is answered with a StepError;
2. forward through the stack; each present layer's group sends LoraForward and awaits LoraDelta;
3. send Hidden; when training, await HiddenGrad and backpropagate, which sends LoraBackward and
   awaits LoraGrad for each layer that takes part;
4. when the edge runs layers 0..k-1 itself (Hello.edge_layers k > 0), the StepBegin carries their output
   and the stack starts at layer k; if any of them takes part in backward, send InputGrad (the gradient
   at the StepBegin's tensor) so the edge can backpropagate through them;
5. answer StepDone (or StepError) and tell the session the micro-batch has ended.

In an adapter-protocol session (cloud_server/adapter.py) step 2 asks no one: the slots get their
deltas from the micro-batch's `CloudLora`, and step 3 sends no LoraBackward; as the backward passes
each layer, the micro-batch hands its trained modules' gradients to the step, which sends a layer's
LoraGrads once every micro-batch has given them.
"""

from __future__ import annotations

import logging
import queue
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from cloud_server.adapter import AdapterStep, CloudLora
from cloud_server.recorder import StepRecorder
from cloud_server.stack import DecoderStack, active_step
from cloud_server.stream import EdgeStream
from common.errors import ProtocolError, SessionError, status_of
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire import codecs
from common.wire.frames import Frame

if TYPE_CHECKING:
    from cloud_server.session import SessionSpec

log = logging.getLogger(__name__)


class _StreamClosed(Exception):
    """The edge closed the stream in the middle of a step."""


class _RemoteLora(torch.autograd.Function):
    """delta = edge(x); its backward is the edge's low-rank-path gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, anchor: torch.Tensor, run: StepRun, layer: int,  # type: ignore[override]
                group: int) -> torch.Tensor:
        ctx.run, ctx.layer, ctx.group = run, layer, group
        return run.remote_forward(layer, group, x)  # (B, T, O)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:  # type: ignore[override]
        return ctx.run.remote_backward(ctx.layer, ctx.group, grad), None, None, None, None  # (B, T, H)


def check_begin(frame: Frame, spec: SessionSpec, stack: DecoderStack) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """Decode and validate a StepBegin's tensors: (embeddings, attention mask, (B, T)); the embeddings are the
    hidden states after layer k-1 (B, T, H) when the edge runs layers 0..k-1. --max-tokens was checked on the
    header before the micro-batch started (the session's `_over_limit`).

    Raises:
        ProtocolError: any mismatch with what the model and session expect.
    """
    begin: pb.StepBegin = frame.body
    if len(begin.layer_roles) != stack.num_layers:
        raise ProtocolError(f"layer_roles has {len(begin.layer_roles)} entries, the model has {stack.num_layers} layers")
    if len(begin.embeddings.shape) != 3:
        raise ProtocolError(f"embeddings must be (B, T, E), got shape {tuple(begin.embeddings.shape)}")
    b, t = int(begin.embeddings.shape[0]), int(begin.embeddings.shape[1])
    if b < 1 or t < 1:
        raise ProtocolError(f"embeddings of {b}x{t} tokens: need at least one token")
    if stack.max_positions and t > stack.max_positions:
        raise ProtocolError(f"sequence length {t} exceeds the model's {stack.max_positions} positions; lower --max-length")
    # (B, T, E)
    k = spec.edge_layers
    emb = codecs.decode(begin.embeddings, "StepBegin.embeddings", (b, t, stack.entry_width(k)), spec.codec_up,
                        stack.dtype, frame.payloads.get("embeddings"), stack.entry_device(k))
    # (B, T)
    mask = codecs.decode(begin.attention_mask, "StepBegin.attention_mask", (b, t), "uint8",
                         payload=frame.payloads.get("attention_mask"))
    if bool((mask > 1).any()):
        raise ProtocolError("attention_mask must hold only 0 and 1")
    return emb, mask.to(torch.long), (b, t)


class StepRun:
    """One micro-batch, run as a task on the server's compute pool.

    The session loop hands it the edge's replies for this (step, micro-batch) through `inbox`
    (None: the stream ended); the stack's slots call `delta_for` while its forward runs. When it
    ends, for any reason, it calls `on_exit(self)`; `failure` then holds an error that must end the
    session (None when the micro-batch finished or was answered with a StepError).
    """

    def __init__(self, frame: Frame, spec: SessionSpec, stream: EdgeStream, stack: DecoderStack,
                 on_exit: Callable[[StepRun], None], adapter_step: AdapterStep | None = None) -> None:
        """adapter_step: in an adapter session, the step the last StepWeights opened (None: none was sent)."""
        self.frame, self.spec, self.stream, self.stack = frame, spec, stream, stack
        self.adapter_step = adapter_step
        self.lora: CloudLora | None = None  # adapter protocol: this micro-batch's LoRA
        self.rec: StepRecorder | None = None  # --record: this micro-batch's copies (the session sets it); None: off
        begin: pb.StepBegin = frame.body
        self.step, self.mb = begin.step, begin.micro_batch
        self.key = (self.step, self.mb)  # how the session finds this micro-batch
        self.roles = list(begin.layer_roles)  # pb.LayerRole per layer
        self.train = begin.train
        self.inbox: queue.Queue[Frame | None] = queue.Queue()
        self.on_exit = on_exit
        self.failure: BaseException | None = None
        self.shape: tuple[int, int] = (0, 0)  # (B, T), once check_begin has passed
        self._pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (layer, group) -> target -> delta
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}  # (layer, group) -> the x its targets read
        # requires_grad only matters for the layers that take part in backward
        self._anchor = torch.ones((), requires_grad=True)

    # -- the whole micro-batch
    def run(self) -> None:
        """Serve the micro-batch and answer StepDone, or StepError for bad input; never raises.

        The session learns the micro-batch has ended (`on_exit`) before the edge does: an edge that sends its
        next message the moment StepDone arrives must find this micro-batch gone from the session's running
        ones, or that message would be refused as overlapping it (--max-micro-batches, a StepWeights or an
        EpochReport while micro-batches run).
        """
        started = time.perf_counter()
        reply: pb.CloudMessage | None = None
        try:
            emb, mask, self.shape = check_begin(self.frame, self.spec, self.stack)
            if self.rec:
                self.rec.add("step_begin", emb)
                self.rec.add("attention_mask", mask.to(torch.uint8))
            if self.spec.lora is not None:
                if self.adapter_step is None:
                    raise ProtocolError(f"step {self.step}: an adapter session sends StepWeights before its StepBegins")
                self.lora = self.adapter_step.begin(self.frame.body, self.stream.send)
            self._execute(emb, mask)
            if self.rec:
                self.rec.save()
            reply = pb.CloudMessage(step_done=pb.StepDone(
                step=self.step, micro_batch=self.mb, cloud_seconds=time.perf_counter() - started))
        except ProtocolError as e:
            log.warning("session %s step %d/%d: %s", self.spec.session_id, self.step, self.mb, e)
            reply = pb.CloudMessage(step_error=pb.StepError(
                step=self.step, micro_batch=self.mb, code=status_of(e).name, message=str(e)))
        except _StreamClosed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the session loop, which ends the session
            self.failure = e
        finally:
            self.on_exit(self)
        if reply is not None:
            self.stream.send(reply)

    def _execute(self, embeddings: torch.Tensor, mask: torch.Tensor) -> None:
        """Forward (B, T, E) through the stack, send Hidden, and when training backpropagate HiddenGrad (and send
        InputGrad when the edge's own layers take part in backward).

        Raises:
            ProtocolError: an edge reply does not fit this step.
            SessionError: the edge went silent.
            _StreamClosed: the edge closed the stream.
        """
        k = self.spec.edge_layers
        input_grad = self.train and any(r == pb.FORWARD_BACKWARD for r in self.roles[:k])
        if input_grad:
            embeddings = embeddings.detach().requires_grad_(True)  # (B, T, H): its .grad goes back to the edge
        with active_step(self), torch.set_grad_enabled(self.train):
            hidden = self.stack.run(embeddings, mask, k)  # (B, T, H)
        if self.rec:
            self.rec.add("hidden", hidden)
        msg = pb.CloudMessage(hidden=pb.Hidden(step=self.step, micro_batch=self.mb))
        data = codecs.encode_into(msg.hidden.hidden, hidden, self.spec.codec_down, self.spec.block_size_down)
        self.stream.send(Frame(msg, {"hidden": data}))
        if not self.train:
            return
        reply = self._expect("hidden_grad")
        grad = codecs.decode(  # (B, T, H)
            reply.body.grad, "HiddenGrad", tuple(hidden.shape), self.spec.codec_up, hidden.dtype, reply.payloads.get("grad"),
            hidden.device,
        )
        if self.rec:
            self.rec.add("hidden_grad", grad)
        if hidden.requires_grad:  # False when no layer takes part in backward
            torch.autograd.backward(hidden, grad)
        if self.lora is not None:  # the backward's hooks sent what it reached; the rest is zero
            self.lora.finish()
        if input_grad:
            dx = embeddings.grad if embeddings.grad is not None else torch.zeros_like(embeddings)  # (B, T, H)
            msg = pb.CloudMessage(input_grad=pb.InputGrad(step=self.step, micro_batch=self.mb))
            data = codecs.encode_into(msg.input_grad.grad, dx, self.spec.codec_down, self.spec.block_size_down)
            self.stream.send(Frame(msg, {"grad": data}))
            if self.rec:
                self.rec.add("input_grad", dx)

    # -- called by the slots, inside the stack's forward
    def delta_for(self, layer: int, group: int, path: str, x: torch.Tensor) -> torch.Tensor | None:
        """The LoRA delta of target `path` for its input x (B, T, H) or (B*T, H), None if it has none.

        The first target of a group to ask fetches the whole group's delta from the edge in one call;
        its siblings then take their slices.

        Raises:
            RuntimeError: the family table groups targets that do not read the same input.
        """
        if self.lora is not None:
            delta = self.lora.delta(layer, path, x)
            if self.rec and delta is not None:  # the input the cloud's own LoRA reads, once per group
                self.rec.add_once(f"lora_x.{layer}.{group}", x if x.dim() == 3 else x.reshape(*self.shape, x.shape[-1]))
            return delta
        targets = self.spec.groups[group]
        if path not in targets or self.roles[layer] == pb.ABSENT:
            return None
        key = (layer, group)
        if key not in self._pending:
            # Some families flatten tokens before the MLP (OPT: (B*T, H)); the wire is always (B, T, H).
            xs = x if x.dim() == 3 else x.reshape(*self.shape, x.shape[-1])
            if self.train and self.roles[layer] == pb.FORWARD_BACKWARD:
                delta = _RemoteLora.apply(xs, self._anchor, self, layer, group)  # (B, T, O)
            else:
                with torch.no_grad():
                    delta = self.remote_forward(layer, group, xs.detach())  # (B, T, O)
            delta = delta.reshape(*x.shape[:-1], delta.shape[-1])
            widths = [self.stack.out_width(p) for p in targets]
            self._pending[key] = dict(zip(targets, torch.split(delta, widths, dim=-1)))
            self._inputs[key] = x
        elif self._inputs[key] is not x:
            raise RuntimeError(f"family table: {path} does not read the same input as its group {targets}")
        part = self._pending[key].pop(path)
        if not self._pending[key]:
            del self._pending[key], self._inputs[key]
        return part

    # -- the two remote calls of _RemoteLora
    def remote_forward(self, layer: int, group: int, x: torch.Tensor) -> torch.Tensor:
        """The group's LoRA deltas for x (B, T, H) -> (B, T, O), from the edge."""
        return self._layer_call("lora_forward", "x", "lora_delta", "delta", layer, group, x,
                                self.spec.group_widths[group], self.stack.dtype, x.device)

    def remote_backward(self, layer: int, group: int, grad: torch.Tensor) -> torch.Tensor:
        """dL/dx through the group's low-rank path for dL/d(delta) (B, T, O) -> (B, T, H), from the edge."""
        width = self.stack.in_width(self.spec.groups[group][0])
        return self._layer_call("lora_backward", "grad_output", "lora_grad", "grad_input", layer, group, grad,
                                width, grad.dtype, grad.device)

    def _layer_call(self, kind: str, field: str, reply_kind: str, reply_field: str, layer: int, group: int,
                    tensor: torch.Tensor, reply_width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Send `tensor` (B, T, ·) as `kind`.`field` and return the edge's `reply_kind`.`reply_field` (B, T, reply_width).

        Raises:
            ProtocolError: the reply does not fit (kind, step, layer, group, codec, shape, values).
            SessionError: the edge went silent.
            _StreamClosed: the edge closed the stream.
        """
        msg = pb.CloudMessage(**{kind: {"step": self.step, "micro_batch": self.mb, "layer": layer, "group": group}})
        data = codecs.encode_into(getattr(getattr(msg, kind), field), tensor, self.spec.codec_down,
                                  self.spec.block_size_down)
        self.stream.send(Frame(msg, {field: data}))
        reply = self._expect(reply_kind, layer, group)
        b, t = self.shape
        out = codecs.decode(getattr(reply.body, reply_field), f"{reply_kind} layer {layer} group {group}",
                            (b, t, reply_width), self.spec.codec_up, dtype, reply.payloads.get(reply_field), device)
        if self.rec:  # lora_x / lora_delta, lora_grad_output / lora_grad_input
            self.rec.add(f"lora_{field}.{layer}.{group}", tensor)
            self.rec.add(f"lora_{reply_field}.{layer}.{group}", out)
        return out

    def _expect(self, kind: str, layer: int | None = None, group: int | None = None) -> Frame:
        """The edge's next reply to this micro-batch, which must be `kind` (for `layer`/`group`).

        Raises:
            ProtocolError: another kind, step, micro-batch, layer or group.
            SessionError: the edge sent nothing for reply_timeout_s.
            _StreamClosed: the edge closed the stream.
        """
        try:
            msg = self.inbox.get(timeout=self.stream.reply_timeout_s)
        except queue.Empty:
            raise SessionError(f"the edge sent nothing for {self.stream.reply_timeout_s:.0f}s during step {self.step}") from None
        if msg is None:
            raise _StreamClosed()
        if msg.kind != kind:
            raise ProtocolError(f"step {self.step}: expected {kind}, got {msg.kind}")
        body = msg.body
        if (body.step, body.micro_batch) != (self.step, self.mb):
            raise ProtocolError(
                f"{kind} for step {body.step}/{body.micro_batch} while step {self.step}/{self.mb} runs"
            )
        if layer is not None and (body.layer, body.group) != (layer, group):
            raise ProtocolError(f"{kind} for layer {body.layer} group {body.group}, expected {layer}/{group}")
        return msg
