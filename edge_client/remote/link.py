"""The device's end of a session stream: connect and handshake, move frames, count their bytes.

The link knows nothing of LoRA or of a step's order: `RemoteStep` (remote_step.py) drives one step
and answers the cloud's calls; the link only encodes and decodes tensors with the session's codecs,
sends, receives with a deadline, and turns the cloud's gRPC status into a RemoteError.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch

from common.config import StepProtocolName, TrainConfig, WeightCodec
from common.errors import ConfigError, ProtocolError, RemoteError, one_line
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.scheduler import Decision, KRConfig
from common.tls import ClientTLS, client_tls, open_channel, wait_ready
from common.wire import codecs, frames
from common.wire.frames import Frame
from common.wire.protocol import AUTH_METADATA, PROTOCOL, SESSION_ID_HEX, SESSION_METHOD, channel_options, is_session_id
from edge_client.train.engines import Traffic
from edge_client.train.lora import LoraAdapter
from edge_client.train.model_parts import EdgeModel

log = logging.getLogger(__name__)
_END = object()  # end of the stream, on both queues
_TRAIN = TrainConfig.model_fields  # the train config owns the defaults of the link's settings


@dataclass(frozen=True, kw_only=True)
class LinkConfig:
    """How this device talks to dlora-cloud; `from_train` reads it from `dlora train`'s config."""

    address: str  # HOST:PORT of dlora-cloud serve
    codec_up: str  # codec of what this device sends (embeddings, deltas, dL/dx, dL/dh)
    codec_down: str  # codec of what the cloud sends (layer inputs, dL/d(delta), final hidden)
    int8_block_size: int = _TRAIN["int8_block_size"].default  # int8: elements per scale, both directions
    connect_timeout_s: float = _TRAIN["connect_timeout_s"].default  # to reach the cloud at session start
    reply_timeout_s: float = _TRAIN["reply_timeout_s"].default  # longest wait for one cloud message
    max_message_mb: int = _TRAIN["max_message_mb"].default  # gRPC message limit, set on both ends
    protocol: StepProtocolName = _TRAIN["protocol"].default  # layerwise (LoRA here) | adapter (LoRA weights to the cloud)
    weights_wire: WeightCodec = _TRAIN["weights_wire"].default  # adapter: codec of LoRA weights and their gradients
    tls: ClientTLS | None = None  # TLS to the cloud (PEM bytes of --tls-ca [--tls-cert --tls-key]); None: plaintext
    token: str | None = field(default=None, repr=False)  # this device's token for `serve --auth token`; never logged

    @classmethod
    def from_train(cls, cfg: TrainConfig, token: str | None = None) -> LinkConfig:
        """The link of `dlora train`; `token` is what the entry point read (--token-file or $DLORA_TOKEN).

        Raises:
            ValueError: cfg has no cloud (a local-train config).
            ConfigError: a TLS flag is incomplete or its PEM file bad (common.tls.client_tls).
        """
        if cfg.cloud is None:
            raise ValueError("a split run needs cfg.cloud")
        return cls(address=cfg.cloud, codec_up=cfg.codec_up, codec_down=cfg.codec_down,
                   int8_block_size=cfg.int8_block_size, connect_timeout_s=cfg.connect_timeout_s,
                   reply_timeout_s=cfg.reply_timeout_s, max_message_mb=cfg.max_message_mb, token=token,
                   protocol=cfg.protocol, weights_wire=cfg.weights_wire,
                   tls=client_tls(cfg.tls_ca, cfg.tls_cert, cfg.tls_key))


def read_token_file(path: Path) -> str:
    """The device token in `path` (--token-file): its first line, surrounding space dropped.

    Raises:
        ConfigError: the file cannot be read or holds no token.
    """
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--token-file {path}: cannot read it ({e.__class__.__name__}); "
                          "put the token `dlora-cloud token add NAME` printed in that file") from None
    token = text.strip().split("\n")[0].strip()
    if not token:
        raise ConfigError(f"--token-file {path} is empty; put the token `dlora-cloud token add NAME` printed in it")
    if Path(path).stat().st_mode & 0o077:
        log.warning("--token-file %s can be read by other users; chmod 600 it", path)
    return token


def device_token(token_file: Path | None, environ: Mapping[str, str]) -> str | None:
    """The device token: --token-file's (read_token_file), else $DLORA_TOKEN of the entry point's `environ`,
    else None (a cloud with --auth none).

    Raises:
        ConfigError: the token file cannot be read or is empty.
    """
    return read_token_file(token_file) if token_file else (environ.get("DLORA_TOKEN", "").strip() or None)


def cloud_error(code: str, message: str) -> RemoteError:
    """A RemoteError from a cloud's StepError or status: its code if that is a gRPC status name (else
    UNKNOWN, which the device never retries), its message as one line of at most 300 printable characters."""
    return RemoteError(code if code in grpc.StatusCode.__members__ else "UNKNOWN", one_line(message))


def _payload(msg: pb.EdgeMessage | pb.CloudMessage) -> int:
    body = getattr(msg, msg.WhichOneof("kind"))
    return sum(codecs.nbytes(v) for f, v in body.ListFields() if isinstance(v, pb.Tensor))


class CloudLink:
    """One session with dlora-cloud.

    Raises (from open, recv, report_epoch):
        RemoteError: the cloud is unreachable, refused the session, failed a step or went silent.
        ProtocolError: the cloud sent something the session does not expect.
    """

    def __init__(self, config: LinkConfig, edge: EdgeModel, kr: KRConfig | None = None,
                 lora: LoraAdapter | None = None) -> None:
        """lora: the adapter whose settings an adapter-protocol Hello carries; without one the session is
        layerwise whatever config.protocol says (no LoRA: both protocols move the same messages)."""
        self.config, self.edge = config, edge
        self.address = config.address
        self.kr = kr or KRConfig(num_layers=edge.num_layers)
        self.lora = lora
        self.protocol = config.protocol if lora is not None else "layerwise"
        # adapter protocol: module -> copies of the (A, B) the cloud holds on this stream; a new stream holds none
        self.cloud_holds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.session_id = ""  # set by open(); a non-empty id resumes that session
        self._channel: grpc.Channel | None = None
        self._reader: threading.Thread | None = None
        self._outbox: queue.Queue[object] = queue.Queue()
        self._inbox: queue.Queue[object] = queue.Queue()
        self._bytes_up = self._bytes_down = 0  # serialized bytes of whole messages, this link's lifetime
        self._count = threading.Lock()  # Traffic is counted from the step's thread and its head thread

    # -- connection
    def open(self) -> str:
        """Connect and handshake (resuming `session_id` if set); returns the session id."""
        self.close()
        self._channel = open_channel(self.address, self.config.tls, channel_options(self.config.max_message_mb))
        try:  # a TLS mismatch fails at once, with the flag to fix; an absent cloud after connect_timeout_s
            wait_ready(self._channel, self.address, self.config.tls, self.config.connect_timeout_s)
        except RemoteError:
            self.close()
            raise
        self._outbox, self._inbox = queue.Queue(), queue.Queue()
        # the generated stub's (de)serializers, wrapped to count whole messages as they cross
        session = self._channel.stream_stream(SESSION_METHOD, request_serializer=self._serialize,
                                              response_deserializer=self._parse)
        metadata = [(AUTH_METADATA, f"Bearer {self.config.token}")] if self.config.token else None
        self._call = session(iter(self._outbox.get, _END), metadata=metadata)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.cloud_holds = {}
        cfg = self.config
        hello = pb.Hello(
            protocol=PROTOCOL, model_fingerprint=self.edge.fingerprint, session_id=self.session_id,
            targets=list(self.edge.target_paths), codec_up=codecs.codec_spec(cfg.codec_up).codec,
            codec_down=codecs.codec_spec(cfg.codec_down).codec, block_size_down=cfg.int8_block_size,
            client_name=socket.gethostname(),
            warmup_epochs=self.kr.warmup_epochs, budget=self.kr.budget or 0, revive=self.kr.revive,
            kill_threshold=self.kr.kill_threshold or 0.0, edge_layers=self.edge.edge_layers,
        )
        if self.protocol == "adapter" and self.lora is not None:
            hello.step_protocol = pb.ADAPTER
            hello.lora_rank, hello.lora_alpha, hello.lora_dropout = self.lora.rank, self.lora.alpha, self.lora.dropout_p
            hello.dropout_seed, hello.codec_weights = self.lora.seed, codecs.codec_spec(cfg.weights_wire).codec
        self.send(Frame(pb.EdgeMessage(hello=hello)), Traffic())
        first = self.recv(Traffic())
        if first.kind != "welcome":
            raise ProtocolError(f"dlora-cloud at {self.address} answered the Hello with {first.kind or 'no message kind'}")
        welcome = first.msg.welcome
        if not is_session_id(welcome.session_id):
            raise ProtocolError(f"dlora-cloud at {self.address} gave session id {one_line(welcome.session_id, 40)!r}, "
                                f"not {SESSION_ID_HEX} hex digits")
        if welcome.num_layers != self.edge.num_layers:
            raise ProtocolError(f"cloud hosts {welcome.num_layers} layers, the edge model has {self.edge.num_layers}")
        if welcome.step_protocol != hello.step_protocol:
            runs = {v: k for k, v in pb.StepProtocol.items()}.get(welcome.step_protocol, welcome.step_protocol)
            raise ProtocolError(f"dlora-cloud at {self.address} runs step protocol {runs}, this device asked for "
                                f"{self.protocol}; upgrade dlora-cloud or use --protocol layerwise")
        self.session_id = welcome.session_id
        log.info("session %s on %s (%s, %d layers)", self.session_id, self.address, welcome.model_type,
                 welcome.num_layers)
        return self.session_id

    def close(self, drain_s: float = 2.0) -> None:
        """End the session: half-close the stream, give the cloud drain_s to end it with its status,
        then close the channel (which cancels the call only if the cloud has not ended it)."""
        if self._channel is None:
            return
        self._outbox.put(_END)
        if self._reader is not None:
            self._reader.join(timeout=drain_s)
        self._channel.close()
        self._channel = None
        if self._reader is not None:
            self._reader.join(timeout=10)
            self._reader = None

    def _read(self) -> None:
        try:
            for msg in self._call:
                self._inbox.put(msg)
            self._inbox.put(_END)
        except grpc.RpcError as e:
            self._inbox.put(e)

    def _serialize(self, frame: Frame) -> bytes:
        raw = frames.serialize(frame)
        self._bytes_up += len(raw)  # (ByteSize() would cost a second serialization)
        return raw

    def _parse(self, raw: bytes) -> Frame | ProtocolError:
        """A CloudMessage, or the ProtocolError that recv raises (a deserializer that raised would end the
        call with INTERNAL, and the real reason would be lost)."""
        self._bytes_down += len(raw)
        try:
            frame = frames.parse(raw, pb.CloudMessage)
        except ProtocolError as e:
            return ProtocolError(f"dlora-cloud at {self.address} sent a malformed message: {e}")
        if not frame.kind:
            return ProtocolError(f"dlora-cloud at {self.address} sent a message with no kind")
        return frame

    def bytes_totals(self) -> tuple[int, int]:
        """Serialized bytes (up, down) of whole messages over this link's lifetime."""
        return self._bytes_up, self._bytes_down

    # -- messages
    def _count_message(self, traffic: Traffic, frame: Frame, direction: str) -> None:
        """Count one message and its tensor payload in `traffic` (direction: "up" or "down")."""
        with self._count:
            if direction == "up":
                traffic.payload_up += _payload(frame.msg)
            else:
                traffic.payload_down += _payload(frame.msg)
            kind = f"{direction}:{frame.kind}"
            traffic.messages[kind] = traffic.messages.get(kind, 0) + 1

    def send(self, frame: Frame, traffic: Traffic) -> None:
        """Queue a message for the cloud, counting it in `traffic`."""
        self._count_message(traffic, frame, "up")
        self._outbox.put(frame)

    def fail(self, error: Exception) -> None:
        """Make the next recv raise `error` (a step's helper thread failed)."""
        self._inbox.put(error)

    def recv(self, traffic: Traffic) -> Frame:
        """The cloud's next message, counted in `traffic`.

        Raises:
            RemoteError: the cloud ended the stream, failed, or sent nothing for reply_timeout_s.
        """
        try:
            item = self._inbox.get(timeout=self.config.reply_timeout_s)
        except queue.Empty:
            self.close()
            raise RemoteError("DEADLINE_EXCEEDED", f"dlora-cloud at {self.address} sent nothing for "
                                                   f"{self.config.reply_timeout_s:.0f}s") from None
        if item is _END or isinstance(item, grpc.RpcError):
            self._inbox.put(item)  # an ended stream stays ended: the next recv fails at once, not after reply_timeout_s
        if item is _END:
            raise RemoteError("UNAVAILABLE", f"dlora-cloud at {self.address} closed the session")
        if isinstance(item, grpc.RpcError):
            code = item.code().name if item.code() else "UNKNOWN"
            details = one_line(item.details() or code)
            if code == "RESOURCE_EXHAUSTED" and "larger than max" in details:  # gRPC's own message-size limit
                details += ("; raise --max-message-mb on this device and on dlora-cloud serve, or send less per "
                            "message (--micro-batches, --batch-size, --max-length)")
            raise RemoteError(code, f"dlora-cloud at {self.address}: {details}")
        if isinstance(item, Exception):
            raise item
        frame: Frame = item  # type: ignore[assignment]
        self._count_message(traffic, frame, "down")
        return frame

    # -- tensors, in the session's codecs
    def encode_into(self, out: pb.Tensor, t: torch.Tensor) -> memoryview:
        """Encode a tensor this device sends into `out`; its bytes, to travel as the frame's payload."""
        return codecs.encode_into(out, t, self.config.codec_up, self.config.int8_block_size)

    def decode(self, frame: Frame, field: str, what: str, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor field of a cloud message, checked against `shape` and the session's down codec.

        Raises:
            ProtocolError: wrong codec, shape, byte length or non-finite values.
        """
        return codecs.decode(getattr(frame.body, field), what, shape, self.config.codec_down,
                             payload=frame.payloads.get(field), device=self.edge.device)

    # -- Kill-and-Revive
    def report_epoch(self, epoch: int, deltas: dict[int, float]) -> Decision:
        """Send an epoch's module deltas; the cloud's scheduler answers with the next active set.

        Raises:
            RemoteError: the cloud refused the report or could not be reached.
        """
        traffic = Traffic()
        layers = sorted(deltas)
        self.send(Frame(pb.EdgeMessage(epoch_report=pb.EpochReport(
            epoch=epoch, layers=layers, deltas=[deltas[i] for i in layers]))), traffic)
        frame = self.recv(traffic)
        kind, msg = frame.kind, frame.msg
        if kind == "step_error":
            raise cloud_error(msg.step_error.code,
                              f"dlora-cloud rejected the epoch {epoch} report: {msg.step_error.message}")
        if kind != "kr_command" or msg.kr_command.epoch != epoch:
            raise ProtocolError(f"expected the Kill-and-Revive command for epoch {epoch}, got {kind}")
        c = msg.kr_command
        layers = self.edge.num_layers
        for name in ("active", "killed", "revived", "next_active"):
            got = list(getattr(c, name))
            if len(set(got)) != len(got) or any(i >= layers for i in got):
                raise ProtocolError(f"the Kill-and-Revive command for epoch {epoch} names {name} layers "
                                    f"{one_line(str(got[:8]), 80)}: each at most once, below {layers}")
        return Decision(epoch=epoch, active=tuple(c.active), deltas=deltas, killed=tuple(c.killed),
                        revived=tuple(c.revived), next_active=tuple(c.next_active))
