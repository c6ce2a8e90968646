"""One training session on the cloud: the step protocol of DESIGN.md, run against the shared stack.

A remote LoRA call is a `torch.autograd.Function` (as in Petals): its forward asks the edge for
the delta, its backward asks the edge for dL/dx through the low-rank path. So a step is an
ordinary forward of the frozen stack followed by `torch.autograd.backward`, and backward stops
by itself below the lowest layer that takes part in it: only those layers' calls carry an
`anchor` that requires grad, and the frozen weights never do.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from cloud_server.kr_queue import KRQueue
from cloud_server.stack import DecoderStack, active_step
from cloud_server.stream import EdgeStream
from common.errors import ProtocolError, SessionError
from common.families import target_groups
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import KRConfig
from common.wire import codecs
from common.wire.frames import Frame
from common.wire.protocol import DEFAULT_BLOCK_SIZE, PROTOCOL, WIRE_CODECS

log = logging.getLogger(__name__)

MAX_MICRO_BATCHES_IN_FLIGHT = 8  # per session, before further micro-batches queue for a compute thread


@dataclass(frozen=True)
class SessionSpec:
    """What the Hello fixed for the whole session."""

    session_id: str
    groups: list[tuple[str, ...]]  # present targets per input group of a layer
    group_widths: list[int]  # O: sum of output widths per group
    codec_up: str
    codec_down: str
    block_size_down: int
    kr: KRConfig

    def record(self, fingerprint: str, targets: list[str]) -> dict:
        """What must match when an edge resumes this session (stored in Redis)."""
        return {"fingerprint": fingerprint, "targets": list(targets), "codec_up": self.codec_up,
                "codec_down": self.codec_down, "kr": self.kr.__dict__}


class _StreamClosed(Exception):
    """The edge closed the stream in the middle of a step."""


class _RemoteLora(torch.autograd.Function):
    """delta = edge(x); its backward is the edge's low-rank-path gradient."""

    @staticmethod
    def forward(ctx, x, anchor, run, layer, group):  # type: ignore[override]
        ctx.run, ctx.layer, ctx.group = run, layer, group
        return run.remote_forward(layer, group, x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return ctx.run.remote_backward(ctx.layer, ctx.group, grad), None, None, None, None


class StepRun:
    """One micro-batch: routes slot calls to the edge and checks every reply."""

    def __init__(
        self, spec: SessionSpec, link: EdgeStream, stack: DecoderStack, begin: pb.StepBegin, shape: tuple[int, int],
        inbox: queue.Queue[Frame | None],
    ) -> None:
        self.spec, self.link, self.stack, self.inbox = spec, link, stack, inbox
        self.step, self.mb = begin.step, begin.micro_batch
        self.roles = list(begin.layer_roles)
        self.train = begin.train
        self.shape = shape  # (B, T)
        self._pending: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
        self._inputs: dict[tuple[int, int], torch.Tensor] = {}
        # requires_grad only matters for the layers that take part in backward
        self._anchor = torch.ones((), requires_grad=True)

    # -- called by the slots, inside the stack's forward
    def delta_for(self, layer: int, group: int, path: str, x: torch.Tensor) -> torch.Tensor | None:
        targets = self.spec.groups[group]
        if path not in targets or self.roles[layer] == pb.ABSENT:
            return None
        key = (layer, group)
        if key not in self._pending:
            # Some families flatten tokens before the MLP (OPT: (B*T, H)); the wire is always (B, T, H).
            xs = x if x.dim() == 3 else x.reshape(*self.shape, x.shape[-1])
            if self.train and self.roles[layer] == pb.FORWARD_BACKWARD:
                delta = _RemoteLora.apply(xs, self._anchor, self, layer, group)
            else:
                with torch.no_grad():
                    delta = self.remote_forward(layer, group, xs.detach())
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

    def remote_forward(self, layer: int, group: int, x: torch.Tensor) -> torch.Tensor:
        """The group's LoRA deltas for x (B, T, H) -> (B, T, O), from the edge."""
        return self._layer_call("lora_forward", "x", "lora_delta", "delta", layer, group, x,
                                self.spec.group_widths[group], self.stack.dtype, self.stack.device)

    def remote_backward(self, layer: int, group: int, grad: torch.Tensor) -> torch.Tensor:
        """dL/dx through the group's low-rank path for dL/d(delta) (B, T, O) -> (B, T, H), from the edge."""
        width = self.stack.in_width(self.spec.groups[group][0])
        return self._layer_call("lora_backward", "grad_output", "lora_grad", "grad_input", layer, group, grad,
                                width, grad.dtype, grad.device)

    def _layer_call(self, kind: str, field: str, reply_kind: str, reply_field: str, layer: int, group: int,
                    tensor: torch.Tensor, reply_width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        msg = pb.CloudMessage(**{kind: {"step": self.step, "micro_batch": self.mb, "layer": layer, "group": group}})
        data = codecs.encode_into(getattr(getattr(msg, kind), field), tensor, self.spec.codec_down,
                                  self.spec.block_size_down)
        self.link.send(Frame(msg, {field: data}))
        reply = self._expect(reply_kind, layer, group)
        b, t = self.shape
        return codecs.decode(getattr(reply.body, reply_field), f"{reply_kind} layer {layer} group {group}",
                             (b, t, reply_width), self.spec.codec_up, dtype, reply.payloads.get(reply_field), device)

    def _expect(self, kind: str, layer: int | None = None, group: int | None = None) -> Frame:
        try:
            msg = self.inbox.get(timeout=self.link.reply_timeout_s)
        except queue.Empty:
            raise SessionError(f"the edge sent nothing for {self.link.reply_timeout_s:.0f}s during step {self.step}") from None
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

    # -- the whole micro-batch
    def execute(self, embeddings: torch.Tensor, mask: torch.Tensor) -> None:
        with active_step(self), torch.set_grad_enabled(self.train):
            hidden = self.stack.run(embeddings, mask)
        msg = pb.CloudMessage(hidden=pb.Hidden(step=self.step, micro_batch=self.mb))
        data = codecs.encode_into(msg.hidden.hidden, hidden, self.spec.codec_down, self.spec.block_size_down)
        self.link.send(Frame(msg, {"hidden": data}))
        if not self.train:
            return
        reply = self._expect("hidden_grad")
        grad = codecs.decode(
            reply.body.grad, "HiddenGrad", tuple(hidden.shape), self.spec.codec_up, hidden.dtype, reply.payloads.get("grad"),
            hidden.device,
        )
        if hidden.requires_grad:  # False when no layer takes part in backward
            torch.autograd.backward(hidden, grad)


def open_spec(hello: pb.Hello, stack: DecoderStack, session_id: str) -> SessionSpec:
    """Check a Hello against the hosted model and fix the session's shape.

    Raises:
        SessionError: protocol or base model differ.
        ProtocolError: unknown targets or codecs.
    """
    if hello.protocol != PROTOCOL:
        raise SessionError(f"edge speaks protocol {hello.protocol!r}, this cloud speaks {PROTOCOL!r}; upgrade one side")
    if hello.model_fingerprint != stack.fingerprint:
        raise SessionError(
            f"base model mismatch: the edge holds model {hello.model_fingerprint}, this cloud serves "
            f"{stack.config.model_type} {stack.fingerprint} from {stack.model_dir}; use the same model folder on both sides"
        )
    known = set(stack.family.all_paths())
    bad = [t for t in hello.targets if t not in known]
    if bad or not hello.targets:
        raise ProtocolError(f"targets {bad or '(none)'} are not LoRA-able modules of a {stack.config.model_type} layer")
    groups = target_groups(stack.family, tuple(hello.targets))
    widths = [sum(stack.out_width(p) for p in g) for g in groups]
    codec_up = codecs.BY_ENUM[hello.codec_up].name if hello.codec_up in codecs.BY_ENUM else ""
    codec_down = codecs.BY_ENUM[hello.codec_down].name if hello.codec_down in codecs.BY_ENUM else ""
    if codec_up not in WIRE_CODECS or codec_down not in WIRE_CODECS:
        raise ProtocolError(f"unsupported codecs up={hello.codec_up} down={hello.codec_down}")
    kr = KRConfig(
        num_layers=stack.num_layers,
        warmup_epochs=hello.warmup_epochs if hello.HasField("warmup_epochs") else 1,
        budget=hello.budget or None,
        revive=hello.revive,
        kill_threshold=hello.kill_threshold or None,
    )
    block = hello.block_size_down or DEFAULT_BLOCK_SIZE
    return SessionSpec(session_id, groups, widths, codec_up, codec_down, block, kr)


def check_begin(frame: Frame, spec: SessionSpec, stack: DecoderStack, max_tokens: int):  # type: ignore[no-untyped-def]
    """Decode and validate a StepBegin's tensors.

    Raises:
        ProtocolError: any mismatch with what the model and session expect.
    """
    begin: pb.StepBegin = frame.body
    if len(begin.layer_roles) != stack.num_layers:
        raise ProtocolError(f"layer_roles has {len(begin.layer_roles)} entries, the model has {stack.num_layers} layers")
    if len(begin.embeddings.shape) != 3:
        raise ProtocolError(f"embeddings must be (B, T, E), got shape {tuple(begin.embeddings.shape)}")
    b, t = int(begin.embeddings.shape[0]), int(begin.embeddings.shape[1])
    if b < 1 or t < 1 or b * t > max_tokens:
        raise ProtocolError(f"embeddings of {b}x{t} tokens: need 1..{max_tokens} tokens per micro-batch")
    if stack.max_positions and t > stack.max_positions:
        raise ProtocolError(f"sequence length {t} exceeds the model's {stack.max_positions} positions; lower --max-length")
    emb = codecs.decode(begin.embeddings, "StepBegin.embeddings", (b, t, stack.embed_width), spec.codec_up, stack.dtype,
                        frame.payloads.get("embeddings"), stack.device)
    mask = codecs.decode(begin.attention_mask, "StepBegin.attention_mask", (b, t), "uint8",
                         payload=frame.payloads.get("attention_mask"))
    if bool((mask > 1).any()):
        raise ProtocolError("attention_mask must hold only 0 and 1")
    return emb, mask.to(torch.long), (b, t)


def answer_report(report: pb.EpochReport, spec: SessionSpec, kr: KRQueue, timeout_s: float) -> pb.CloudMessage:
    """Publish an epoch report to the scheduler's queue and turn its decision into a KRCommand.

    Raises:
        ProtocolError: the report is malformed or the scheduler refused it.
    """
    if len(report.layers) != len(report.deltas) or any(x >= spec.kr.num_layers for x in report.layers):
        raise ProtocolError(f"epoch report {report.epoch}: layers and deltas must pair up, layers < {spec.kr.num_layers}")
    kr.submit(spec.session_id, report.epoch, dict(zip(report.layers, report.deltas)))
    decision = kr.wait_command(spec.session_id, report.epoch, timeout_s)
    if "error" in decision:
        raise ProtocolError(f"epoch report {report.epoch}: {decision['error']}")
    return pb.CloudMessage(kr_command=pb.KRCommand(
        epoch=report.epoch, active=decision["active"], killed=decision["killed"],
        revived=decision["revived"], next_active=decision["next_active"]))


class _MicroBatch:
    """One micro-batch, run as a task on the server's compute pool; the session loop feeds it the
    edge's replies through `inbox`."""

    def __init__(self, link: EdgeStream, stack: DecoderStack, spec: SessionSpec, frame: Frame, max_tokens: int,
                 on_exit: Callable[[_MicroBatch], None]) -> None:
        self.link, self.stack, self.spec, self.frame, self.max_tokens = link, stack, spec, frame, max_tokens
        self.begin: pb.StepBegin = frame.body
        self.inbox: queue.Queue[Frame | None] = queue.Queue()
        self.on_exit = on_exit
        self.failure: BaseException | None = None

    def run(self) -> None:
        begin = self.begin
        started = time.perf_counter()
        try:
            emb, mask, shape = check_begin(self.frame, self.spec, self.stack, self.max_tokens)
            StepRun(self.spec, self.link, self.stack, begin, shape, self.inbox).execute(emb, mask)
            self.link.send(pb.CloudMessage(step_done=pb.StepDone(
                step=begin.step, micro_batch=begin.micro_batch, cloud_seconds=time.perf_counter() - started)))
        except ProtocolError as e:
            log.warning("session %s step %d/%d: %s", self.spec.session_id, begin.step, begin.micro_batch, e)
            self.link.send(pb.CloudMessage(step_error=pb.StepError(
                step=begin.step, micro_batch=begin.micro_batch, code="INVALID_ARGUMENT", message=str(e))))
        except _StreamClosed:
            pass
        except BaseException as e:  # noqa: BLE001 - handed to the session loop, which ends the session
            self.failure = e
        finally:
            self.on_exit(self)


def compute_pool(max_sessions: int) -> ThreadPoolExecutor:
    """The threads that run micro-batches, shared by all sessions and kept for the server's life.

    Reused threads matter on a CPU: measured alone, the bench model's forward and backward ran ~1.4x
    slower in a fresh thread than in a long-lived one (each new thread starts a new OpenMP team and a
    new malloc arena, so its activations are page-faulted in again). Idle threads are reused; new ones
    are made only while all are busy.
    """
    return ThreadPoolExecutor(max_workers=max_sessions * MAX_MICRO_BATCHES_IN_FLIGHT, thread_name_prefix="dlora-step")


def run_session(link: EdgeStream, stack: DecoderStack, spec: SessionSpec, max_tokens: int, kr: KRQueue,
                pool: ThreadPoolExecutor) -> None:
    """Serve micro-batches (concurrently, on `pool`'s threads) and epoch reports until the edge closes the stream.

    Bad input abandons one micro-batch (or report), not the session.

    Raises:
        SessionError: the edge went silent in the middle of a step.
    """
    running: dict[tuple[int, int], _MicroBatch] = {}
    lock = threading.Lock()
    failures: list[BaseException] = []

    def finished(t: _MicroBatch) -> None:
        with lock:
            running.pop((t.begin.step, t.begin.micro_batch), None)
            if t.failure is not None:
                failures.append(t.failure)

    try:
        while (msg := link.recv()) is not None:
            if failures:
                raise failures[0]
            kind, body = msg.kind, msg.body
            if kind == "epoch_report":
                try:
                    with lock:
                        if running:
                            raise ProtocolError("epoch report while micro-batches are still running")
                    link.send(answer_report(body, spec, kr, link.reply_timeout_s))
                except ProtocolError as e:
                    log.warning("session %s: %s", spec.session_id, e)
                    link.send(pb.CloudMessage(step_error=pb.StepError(code="INVALID_ARGUMENT", message=str(e))))
            elif kind == "step_begin":
                key = (body.step, body.micro_batch)
                with lock:
                    if key in running:
                        raise ProtocolError(f"step {body.step} micro-batch {body.micro_batch} is already running")
                    t = _MicroBatch(link, stack, spec, msg, max_tokens, finished)
                    running[key] = t
                pool.submit(t.run)
            elif kind in ("lora_delta", "hidden_grad", "lora_grad"):
                with lock:
                    t = running.get((body.step, body.micro_batch))
                if t is None:
                    log.warning("session %s: %s for step %d/%d, which is not running; ignored",
                                spec.session_id, kind, body.step, body.micro_batch)
                else:
                    t.inbox.put(msg)
            else:
                raise ProtocolError(f"unexpected {kind} in a session")
        if failures:
            raise failures[0]
    finally:
        with lock:
            for t in running.values():
                t.inbox.put(None)
