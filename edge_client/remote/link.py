"""The device's end of a session stream: handshake, then one micro-batch at a time.

The cloud drives the order inside a micro-batch (its forward and backward decide which layer
calls come when); this side answers each call with the LoRA adapter, and hands the final hidden
states to a callback that computes the loss (or the scores) locally and returns dL/dh.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
import torch

from common.errors import ProtocolError, RemoteError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import Decision, KRConfig
from common.wire import codecs, frames
from common.wire.frames import Frame
from edge_client.train.engines import Traffic
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel

log = logging.getLogger(__name__)
PROTOCOL = "dlora.v1"
_END = object()

HiddenCallback = Callable[[torch.Tensor], torch.Tensor | None]


@dataclass(frozen=True)
class _HeadFailed:
    """A micro-batch's head raised in the head thread; _recv raises it in the step's thread."""

    error: Exception


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch of a step, as the link sends it."""

    embeddings: torch.Tensor  # (B, T, E)
    attention_mask: torch.Tensor  # (B, T)
    on_hidden: HiddenCallback


def _payload(msg: pb.EdgeMessage | pb.CloudMessage) -> int:
    body = getattr(msg, msg.WhichOneof("kind"))
    return sum(codecs.nbytes(v) for f, v in body.ListFields() if isinstance(v, pb.Tensor))


class CloudLink:
    """One session with dlora-cloud.

    Raises (from open/run_step):
        RemoteError: the cloud is unreachable, refused the session, or failed a step.
        ProtocolError: the cloud sent something this step does not expect.
    """

    def __init__(self, address: str, edge: EdgeModel, wire_up: str = "float32", connect_timeout_s: float = 15.0,
                 reply_timeout_s: float = 600.0, max_message_mb: int = 512, kr: KRConfig | None = None,
                 wire_down: str | None = None, block_size: int = codecs.DEFAULT_BLOCK_SIZE) -> None:
        """wire_up: the codec of what this side sends, and of what the cloud sends unless wire_down says
        otherwise; block_size: int8's elements per scale, in both directions."""
        self.address, self.edge = address, edge
        self.wire_up, self.wire_down, self.block_size = wire_up, wire_down or wire_up, block_size
        self.kr = kr or KRConfig(num_layers=edge.num_layers)
        self.connect_timeout_s, self.reply_timeout_s = connect_timeout_s, reply_timeout_s
        limit = max_message_mb * 1024 * 1024
        self._options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
        self.session_id = ""
        self.num_layers = edge.num_layers
        self._channel: grpc.Channel | None = None
        self._reader: threading.Thread | None = None
        self._outbox: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[object] = queue.Queue()
        self._wire_up = self._wire_down = 0  # serialized bytes of whole messages, this link's lifetime
        self._count = threading.Lock()  # Traffic is counted from this thread and the head thread
        self._heads: ThreadPoolExecutor | None = None  # computes micro-batches' heads (M > 1), long-lived

    # -- connection
    def open(self) -> str:
        """Connect and handshake; returns the session id."""
        self.close()
        self._channel = grpc.insecure_channel(self.address, options=self._options)
        try:
            grpc.channel_ready_future(self._channel).result(timeout=self.connect_timeout_s)
        except grpc.FutureTimeoutError:
            self.close()
            raise RemoteError(
                "UNAVAILABLE",
                f"cannot reach dlora-cloud at {self.address} within {self.connect_timeout_s:.0f}s; "
                "is `dlora-cloud serve` running there?",
            ) from None
        self._outbox: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[object] = queue.Queue()
        # the generated stub's (de)serializers, wrapped to count whole messages as they cross
        session = self._channel.stream_stream(
            "/dlora.v1.SplitTraining/Session", request_serializer=self._serialize, response_deserializer=self._parse)
        self._call = session(iter(self._outbox.get, _END))
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self._send(pb.EdgeMessage(hello=pb.Hello(
            protocol=PROTOCOL, model_fingerprint=self.edge.fingerprint, session_id=self.session_id,
            targets=list(self.edge.target_paths), codec_up=codecs.codec_spec(self.wire_up).codec,
            codec_down=codecs.codec_spec(self.wire_down).codec, block_size_down=self.block_size,
            client_name=socket.gethostname(),
            warmup_epochs=self.kr.warmup_epochs, budget=self.kr.budget or 0, revive=self.kr.revive,
            kill_threshold=self.kr.kill_threshold or 0.0,
        )), Traffic())
        welcome = self._recv(Traffic()).msg.welcome
        if welcome.num_layers != self.edge.num_layers:
            raise ProtocolError(f"cloud hosts {welcome.num_layers} layers, the edge model has {self.edge.num_layers}")
        self.session_id = welcome.session_id
        log.info("session %s on %s (%s, %d layers)", self.session_id, self.address, welcome.model_type, welcome.num_layers)
        return self.session_id

    def close(self, drain_s: float = 2.0) -> None:
        """End the session: half-close the stream, give the cloud drain_s to end it with its status,
        then close the channel (which cancels the call only if the cloud has not ended it)."""
        if self._channel is not None:
            self._outbox.put(_END)
            if self._reader is not None:
                self._reader.join(timeout=drain_s)
            self._channel.close()
            self._channel = None
            if self._reader is not None:
                self._reader.join(timeout=10)
                self._reader = None
        if self._heads is not None:
            self._heads.shutdown(wait=True)
            self._heads = None

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._inbox.put(msg)
            self._inbox.put(_END)
        except grpc.RpcError as e:
            self._inbox.put(e)

    def _serialize(self, frame: Frame) -> bytes:
        raw = frames.serialize(frame)
        self._wire_up += len(raw)  # (ByteSize() would cost a second serialization)
        return raw

    def _parse(self, raw: bytes) -> Frame:
        self._wire_down += len(raw)
        return frames.parse(raw, pb.CloudMessage)

    def _wire_totals(self) -> tuple[int, int]:
        return self._wire_up, self._wire_down

    def _send(self, msg: pb.EdgeMessage | Frame, traffic: Traffic) -> None:
        frame = msg if isinstance(msg, Frame) else Frame(msg)
        kind = "up:" + frame.kind
        with self._count:
            traffic.payload_up += _payload(frame.msg)
            traffic.messages[kind] = traffic.messages.get(kind, 0) + 1
        self._outbox.put(frame)

    def _recv(self, traffic: Traffic) -> Frame:
        try:
            item = self._inbox.get(timeout=self.reply_timeout_s)
        except queue.Empty:
            self.close()
            raise RemoteError("DEADLINE_EXCEEDED", f"dlora-cloud at {self.address} sent nothing for "
                                                   f"{self.reply_timeout_s:.0f}s") from None
        if item is _END:
            raise RemoteError("UNAVAILABLE", f"dlora-cloud at {self.address} closed the session")
        if isinstance(item, grpc.RpcError):
            code = item.code().name if item.code() else "UNKNOWN"
            details = item.details() or code
            if code == "RESOURCE_EXHAUSTED":
                details += ("; raise --max-message-mb on this device and on dlora-cloud serve, or send less per "
                            "message (--micro-batches, --batch-size, --max-length)")
            raise RemoteError(code, f"dlora-cloud at {self.address}: {details}")
        if isinstance(item, _HeadFailed):
            raise item.error
        msg: Frame = item  # type: ignore[assignment]
        kind = "down:" + msg.kind
        with self._count:
            traffic.payload_down += _payload(msg.msg)
            traffic.messages[kind] = traffic.messages.get(kind, 0) + 1
        return msg

    # -- Kill-and-Revive
    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision:
        """Send an epoch's module deltas; the cloud's scheduler answers with the next active set.

        Raises:
            RemoteError: the cloud refused the report or could not be reached.
        """
        traffic = Traffic()
        layers = sorted(deltas)
        self._send(pb.EdgeMessage(epoch_report=pb.EpochReport(
            epoch=epoch, layers=layers, deltas=[deltas[i] for i in layers])), traffic)
        frame = self._recv(traffic)
        kind, msg = frame.kind, frame.msg
        if kind == "step_error":
            raise RemoteError(msg.step_error.code, f"dlora-cloud rejected the epoch {epoch} report: {msg.step_error.message}")
        if kind != "kr_command" or msg.kr_command.epoch != epoch:
            raise ProtocolError(f"expected the Kill-and-Revive command for epoch {epoch}, got {kind}")
        c = msg.kr_command
        return Decision(epoch=epoch, active=tuple(c.active), deltas=deltas, killed=tuple(c.killed),
                        revived=tuple(c.revived), next_active=tuple(c.next_active))

    # -- steps
    def run_step(self, step: int, mb: int, embeddings: torch.Tensor, attention_mask: torch.Tensor,
                 roles: list[int], train: bool, adapter: LoraAdapter | None, on_hidden: HiddenCallback) -> Traffic:
        """Run one micro-batch through the cloud; see run_micro_batches."""
        return self.run_micro_batches(step, [MicroBatch(embeddings, attention_mask, on_hidden)], roles, train,
                                      adapter, first_mb=mb)

    def run_micro_batches(self, step: int, parts: list[MicroBatch], roles: list[int], train: bool,
                          adapter: LoraAdapter | None, first_mb: int = 0) -> Traffic:
        """Run micro-batches through the cloud at once; returns their traffic.

        All StepBegins go out first, so the cloud computes one micro-batch while this side answers
        another's LoRA calls. Each part's on_hidden(h) gets its final hidden states (B, T, E_out) and
        returns dL/dh when training; LoRA gradients of all parts accumulate.
        """
        traffic = Traffic()
        up0, down0 = self._wire_totals()
        shapes = {first_mb + i: tuple(p.attention_mask.shape) for i, p in enumerate(parts)}
        for i, part in enumerate(parts):
            msg = pb.EdgeMessage(step_begin=pb.StepBegin(step=step, micro_batch=first_mb + i, train=train,
                                                         layer_roles=roles))
            payloads = {"embeddings": codecs.encode_into(msg.step_begin.embeddings, part.embeddings, self.wire_up,
                                                                self.block_size),
                        "attention_mask": codecs.encode_into(msg.step_begin.attention_mask, part.attention_mask, "uint8")}
            self._send(Frame(msg, payloads), traffic)
        pending = set(shapes)
        try:
            while pending:
                frame = self._recv(traffic)
                kind, body = frame.kind, frame.body
                if kind == "step_error":
                    self.close()  # other micro-batches may still be in flight: this stream is spent
                    raise RemoteError(body.code, f"dlora-cloud rejected step {body.step}: {body.message}")
                mb = getattr(body, "micro_batch", -1)
                if getattr(body, "step", -1) != step or mb not in pending:
                    raise ProtocolError(f"cloud sent {kind} for step {getattr(body, 'step', '?')}/{mb} during step {step}")
                b, t = shapes[mb]
                if kind == "lora_forward":
                    self._answer_forward(frame, b, t, roles, train, adapter, traffic)
                elif kind == "hidden":
                    h = codecs.decode(body.hidden, "Hidden", (b, t, self.edge.head_width), self.wire_down,
                                      payload=frame.payloads.get("hidden"), device=self.edge.device)
                    if len(parts) == 1:
                        self._answer_hidden(step, mb, h, parts[0].on_hidden, train, traffic)
                    else:
                        # Let the other micro-batches' layer calls be answered while this one's head and loss
                        # compute: its backward then starts while they finish their forward (on a slow link,
                        # the backward's grads go down while their deltas go up).
                        self._head_thread().submit(self._answer_hidden_or_report, step, mb, h,
                                                   parts[mb - first_mb].on_hidden, train, traffic)
                elif kind == "lora_backward":
                    self._answer_backward(frame, b, t, adapter, traffic)
                elif kind == "step_done":
                    pending.discard(mb)
                else:
                    raise ProtocolError(f"cloud sent {kind} in the middle of step {step}")
            # every message of the step was serialized before the cloud could answer the last one
            traffic.bytes_up, traffic.bytes_down = (a - b for a, b in zip(self._wire_totals(), (up0, down0)))
            return traffic
        finally:
            if adapter is not None:
                adapter.discard_pending()

    def _head_thread(self) -> ThreadPoolExecutor:
        # one long-lived thread: a fresh thread per step would start a new OpenMP team each time
        if self._heads is None:
            self._heads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dlora-head")
        return self._heads

    def _answer_hidden(self, step: int, mb: int, h: torch.Tensor, on_hidden: HiddenCallback, train: bool,
                       traffic: Traffic) -> None:
        grad = on_hidden(h)
        if train:
            if grad is None:
                raise ValueError("on_hidden must return dL/dh when training")
            msg = pb.EdgeMessage(hidden_grad=pb.HiddenGrad(step=step, micro_batch=mb))
            data = codecs.encode_into(msg.hidden_grad.grad, grad, self.wire_up, self.block_size)
            self._send(Frame(msg, {"grad": data}), traffic)

    def _answer_hidden_or_report(self, step: int, mb: int, h: torch.Tensor, on_hidden: HiddenCallback, train: bool,
                                 traffic: Traffic) -> None:
        try:
            self._answer_hidden(step, mb, h, on_hidden, train, traffic)
        except Exception as e:  # noqa: BLE001 - raised again in run_micro_batches, by _recv
            self._inbox.put(_HeadFailed(e))

    def _answer_forward(self, frame: Frame, b: int, t: int, roles: list[int], train: bool,
                        adapter: LoraAdapter | None, traffic: Traffic) -> None:
        body: pb.LoraForward = frame.body
        layer, group = body.layer, body.group
        if adapter is None or layer >= len(roles) or roles[layer] == pb.ABSENT or (layer, group) not in adapter.by_group:
            raise ProtocolError(f"cloud asked for LoRA of layer {layer} group {group}, which this step does not apply")
        x = codecs.decode(body.x, f"LoraForward layer {layer}", (b, t, adapter.group_in_width(layer, group)),
                          self.wire_down, payload=frame.payloads.get("x"), device=self.edge.device)
        need_grad = train and roles[layer] == pb.FORWARD_BACKWARD
        delta = adapter.forward_group(body.micro_batch, layer, group, x, need_grad)
        msg = pb.EdgeMessage(lora_delta=pb.LoraDelta(step=body.step, micro_batch=body.micro_batch, layer=layer,
                                                     group=group))
        data = codecs.encode_into(msg.lora_delta.delta, delta, self.wire_up, self.block_size)
        self._send(Frame(msg, {"delta": data}), traffic)

    def _answer_backward(self, frame: Frame, b: int, t: int, adapter: LoraAdapter | None,
                         traffic: Traffic) -> None:
        body: pb.LoraBackward = frame.body
        layer, group = body.layer, body.group
        if adapter is None or not adapter.has_pending(body.micro_batch, layer, group):
            raise ProtocolError(f"cloud asked for the backward of layer {layer} group {group}, which has no forward")
        g = codecs.decode(body.grad_output, f"LoraBackward layer {layer}", (b, t, adapter.group_width(layer, group)),
                          self.wire_down, payload=frame.payloads.get("grad_output"), device=self.edge.device)
        dx = adapter.backward_group(body.micro_batch, layer, group, g)
        msg = pb.EdgeMessage(lora_grad=pb.LoraGrad(step=body.step, micro_batch=body.micro_batch, layer=layer,
                                                   group=group))
        data = codecs.encode_into(msg.lora_grad.grad_input, dx, self.wire_up, self.block_size)
        self._send(Frame(msg, {"grad_input": data}), traffic)
