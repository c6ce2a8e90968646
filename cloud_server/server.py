"""The gRPC server: decode, call the session, encode. No model math lives here."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from cloud_server.kr_queue import KRQueue, SchedulerWorker, SessionStore, connect, disconnect
from cloud_server.session import SessionSpec, Wake, compute_pool, open_spec, run_session
from cloud_server.slots import Gate, SessionSlots, Slot
from cloud_server.stack import DecoderStack
from cloud_server.stream import EdgeStream
from cloud_server.tokens import Caller, DeviceAuth, TokenStore, auth_mode
from cloud_server.workers import WorkerRegistry
from common.config import ServeConfig
from common.errors import (
    AccessError,
    ConfigError,
    DloraError,
    LimitError,
    ProtocolError,
    SessionError,
    SupersededError,
    status_of,
)
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc
from common.recording import prepare_root
from common.tls import describe_transport, server_credentials
from common.wire import frames
from common.wire.frames import Frame
from common.wire.protocol import PROTOCOL, SERVICE, SESSION_ID_HEX, channel_options, is_session_id, new_session_id

log = logging.getLogger(__name__)
VERSION = "0.1.0"
HEALTH_THREADS = 4  # gRPC threads no session stream can take: Health never waits behind sessions
HELLO_WAITERS_PER_SESSION = 4  # streams that may wait for their Hello at once, per --max-sessions
STREAMS_PER_SESSION = 2  # live session streams in this process per --max-sessions: room for a device's new stream
# to replace its half-open one while the old one ends


def rpc_threads(config: ServeConfig) -> int:
    """gRPC's threads. A session stream holds one from its start to its end; the servicer refuses at once
    (RESOURCE_EXHAUSTED) a stream beyond HELLO_WAITERS_PER_SESSION x --max-sessions waiting for their Hello,
    or beyond STREAMS_PER_SESSION x --max-sessions live ones, so HEALTH_THREADS are always left for Health
    (and for those refusals, which take a thread for a moment)."""
    return config.max_sessions * (HELLO_WAITERS_PER_SESSION + STREAMS_PER_SESSION) + HEALTH_THREADS


def connection_options(config: ServeConfig) -> list[tuple[str, int]]:
    """HTTP/2 keepalive and idle limits: the server pings every --keepalive seconds and drops a peer that
    does not answer within as long (a half-open device); a connection with no call for --idle-timeout is
    closed; a client may ping at most every 10 s without data (more often is a ping flood: GOAWAY)."""
    keepalive_ms = int(config.keepalive_s * 1000)
    return [
        ("grpc.keepalive_time_ms", keepalive_ms),
        ("grpc.keepalive_timeout_ms", keepalive_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),  # keep pinging through a long silence between steps
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        ("grpc.max_connection_idle_ms", int(config.idle_timeout_s * 1000)),
    ]


def _parse_request(raw: bytes) -> Frame | ProtocolError:
    """An EdgeMessage, or the ProtocolError that says why the bytes are not one: the session loop raises it
    (INVALID_ARGUMENT). A deserializer that raised would end the call with INTERNAL."""
    try:
        return frames.parse(raw, pb.EdgeMessage)
    except ProtocolError as e:
        return e


class SplitTrainingServicer(pb_grpc.SplitTrainingServicer):
    """Sessions over one shared DecoderStack."""

    def __init__(self, stack: DecoderStack, config: ServeConfig, store: SessionStore, kr: KRQueue,
                 auth: DeviceAuth | None = None) -> None:
        self.stack, self.config, self.store, self.kr = stack, config, store, kr
        self.auth = auth or DeviceAuth("none", TokenStore(store.r))
        self.pool = compute_pool(config.max_sessions, config.max_micro_batches)
        self.slots = SessionSlots(store.r, config.max_sessions, config.max_sessions_per_token)  # on all workers
        self.waiting = Gate(HELLO_WAITERS_PER_SESSION * config.max_sessions)  # streams before their Hello
        self.streams = Gate(STREAMS_PER_SESSION * config.max_sessions)  # and after it, in this process
        self._lock = threading.Lock()
        self._live: dict[str, EdgeStream] = {}  # session id -> its one live stream in this process
        self.draining = threading.Event()  # set by CloudServer.drain: no new streams, live ones end between steps
        self.sessions_changed: Callable[[], None] = lambda: None  # the worker registry's nudge, once it exists

    def wake_all(self) -> None:
        """Make every live stream's session loop look at its state again (draining has begun)."""
        with self._lock:
            streams = list(self._live.values())
        for stream in streams:
            stream.interrupt(Wake())

    def live_sessions(self) -> list[str]:
        """The ids of the sessions this process serves now (the worker registry's load)."""
        with self._lock:
            return list(self._live)

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        with self._lock:
            n = len(self._live)
        return pb.HealthReply(
            status="DRAINING" if self.draining.is_set() else "SERVING", model_type=self.stack.config.model_type,
            model_fingerprint=self.stack.fingerprint, open_sessions=n,
        )

    def Session(self, request_iterator: Iterator[Frame], context: grpc.ServicerContext) -> Iterator[Frame]:
        try:  # the token first: a stream without a valid one reads, computes and writes nothing
            caller = self.auth.admit(context.invocation_metadata())
        except DloraError as e:
            log.warning("session refused (%s): %s", getattr(context, "peer", lambda: "?")(), e)
            context.abort(status_of(e), str(e))
        if self.draining.is_set():
            context.abort(grpc.StatusCode.UNAVAILABLE, "this worker is shutting down; reconnect (a balancer sends "
                          "you to another worker)")
        if not self.waiting.enter():  # each holds a gRPC thread until its Hello: bounded
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many streams are waiting to say Hello on this "
                          "cloud; retry later")
        stream = EdgeStream(request_iterator, self.config.step_timeout_s)
        slot: Slot | None = None
        try:
            try:
                first = stream.recv(self.config.hello_timeout_s, f"--hello-timeout ({self.config.hello_timeout_s:g}s)")
            finally:
                self.waiting.leave()
            if first is None or first.kind != "hello":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be hello")
            hello = first.msg.hello
            session_id = hello.session_id or new_session_id()
            spec = open_spec(hello, self.stack, session_id, self.config.max_adapter_mb)
            if hello.session_id:  # read-only: a resume of another token's, or an unknown, session writes nothing
                self._check_resume(spec, list(hello.targets), caller)
            slot = self._admit(session_id, caller.name)  # over a limit: refused before anything is written
            self._register(spec, list(hello.targets), caller, resume=bool(hello.session_id))
        except BaseException as e:
            if slot is not None:
                self._leave(slot)
            if not isinstance(e, DloraError):
                raise
            log.warning("session refused (%s): %s", getattr(context, "peer", lambda: "?")(), e)
            context.abort(status_of(e), str(e))
        with self._lock:
            old, self._live[session_id] = self._live.get(session_id), stream
        self.sessions_changed()
        if old is not None:  # the device came back, e.g. after a half-open connection: the old stream ends
            old.interrupt(SupersededError(f"session {session_id} continues on a newer stream with its token; "
                                          "this one ends"))
        log.info("session %s opened by %s (token %s) targets=%s wire=%s/%s", session_id, hello.client_name or "?",
                 caller.name or "-", ",".join(hello.targets), spec.codec_up, spec.codec_down)
        stream.send(pb.CloudMessage(welcome=pb.Welcome(
            session_id=session_id, protocol=PROTOCOL, num_layers=self.stack.num_layers,
            model_type=self.stack.config.model_type, server_version=VERSION,
            step_protocol=pb.ADAPTER if spec.lora is not None else pb.LAYERWISE)))
        worker = threading.Thread(target=self._serve, args=(stream, spec, caller, context, slot), daemon=True, name=f"session-{session_id}")
        worker.start()
        yield from stream.responses()

    def _register(self, spec: SessionSpec, targets: list[str], caller: Caller, resume: bool) -> None:
        """Create the session's Redis record, owned by the caller's token; refresh a resumed one's TTL
        (`_check_resume` has admitted it).

        Raises:
            UnavailableError: Redis failed.
        """
        if resume:
            self.store.touch(spec.session_id)
        else:
            self.store.create(spec.session_id, spec.record(self.stack.fingerprint, targets), spec.kr, owner=caller.name)

    def _check_resume(self, spec: SessionSpec, targets: list[str], caller: Caller) -> None:
        """Check, reading only, that a session to resume is one this cloud issued, is the caller's, and was
        opened with the same settings.

        Raises:
            ProtocolError: a session id this cloud never issues.
            SessionError: an old 48-bit id, an unknown or expired one, or other settings than it was opened with.
            AccessError: the session belongs to another token.
            UnavailableError: Redis failed.
        """
        record = spec.record(self.stack.fingerprint, targets)
        if re.fullmatch("[0-9a-f]{12}", spec.session_id):
            raise SessionError(f"session {spec.session_id} has an old 48-bit id, which a guess could take over; "
                               "this cloud resumes none of those: start a new session")
        if not is_session_id(spec.session_id):
            raise ProtocolError(f"session id {spec.session_id[:40]!r} is not one this cloud issues "
                                f"({SESSION_ID_HEX} hex digits); start a new session")
        stored = self.store.load(spec.session_id, touch=False)
        if stored is None:
            raise SessionError(f"session {spec.session_id} is unknown or expired on this cloud; start a new session")
        if stored.get("owner", "") != caller.name:
            raise AccessError(f"session {spec.session_id} belongs to another device token; resume it with the token "
                              "that opened it, or start a new session")
        if json.loads(stored["record"]) != record:
            raise SessionError(f"session {spec.session_id} was opened with other targets, codecs or "
                               "Kill-and-Revive settings; resume it with the same flags or start a new session")

    def _admit(self, session_id: str, owner: str) -> Slot:
        """Hold a live stream's place in this process and its session's slot on all workers.

        Raises:
            LimitError: over --max-sessions (all workers, or this process's streams) or --max-sessions-per-token.
            UnavailableError: Redis failed.
        """
        if not self.streams.enter():
            raise LimitError(f"this cloud process already serves {self.streams.cap} session streams "
                             "(--max-sessions); retry later")
        try:
            return self.slots.acquire(session_id, owner)
        except BaseException:
            self.streams.leave()
            raise

    def _leave(self, slot: Slot) -> None:
        """Give back what _admit took."""
        self.slots.release(slot)
        self.streams.leave()

    def _serve(self, stream: EdgeStream, spec: SessionSpec, caller: Caller, context: grpc.ServicerContext,
               slot: Slot) -> None:
        try:
            def before_step() -> None:  # the token still valid, and this stream still the session's (fence)
                self.auth.check(caller)
                self.slots.check(slot)

            run_session(stream, self.stack, spec, self.config, self.kr, self.pool, before_step=before_step,
                        draining=self.draining.is_set)
        except DloraError as e:
            log.warning("session %s ended: %s", spec.session_id, e)
            context.set_code(status_of(e))
            context.set_details(str(e))
        except Exception:
            log.exception("session %s failed", spec.session_id)
            context.set_code(grpc.StatusCode.INTERNAL)
            context.set_details(f"internal error in session {spec.session_id}; see the cloud's log")
        finally:
            with self._lock:
                if self._live.get(spec.session_id) is stream:  # not when a newer stream took its place
                    del self._live[spec.session_id]
            self.sessions_changed()
            try:
                self._leave(slot)
            finally:  # whatever happens there, the response stream must end, or its gRPC thread waits forever
                log.info("session %s closed", spec.session_id)
                stream.close()


def handlers(servicer: SplitTrainingServicer) -> grpc.GenericRpcHandler:
    """The service's methods, as the generated code registers them, but with the session stream's
    tensor bytes framed by common.wire.frames (valid protobuf either way; see that module)."""
    return grpc.method_handlers_generic_handler(SERVICE, {
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session, request_deserializer=_parse_request,
            response_serializer=frames.serialize),
        "Health": grpc.unary_unary_rpc_method_handler(
            servicer.Health, request_deserializer=pb.HealthRequest.FromString,
            response_serializer=pb.HealthReply.SerializeToString),
    })


class CloudServer:
    """A running dlora cloud: the gRPC server, its Redis connection and its scheduler worker."""

    def __init__(self, stack: DecoderStack, config: ServeConfig) -> None:
        """Start serving.

        Raises:
            ConfigError: the address cannot be bound, Redis cannot be reached, --auth none or plaintext off
                loopback without --insecure, a TLS file is missing or wrong (common.tls), or --record names
                a folder others may access (common.recording).
        """
        mode = auth_mode(config)
        credentials = server_credentials(config)  # checks the PEM files and the plaintext rule before any work
        if config.record is not None:  # the curious operator's view: a folder only its owner can read
            prepare_root(config.record)
            log.warning("--record: keeping a copy of what crosses in the first %d steps of every session under %s",
                        config.record_steps, config.record)
        self.redis, where = connect(config.redis_url, config.state_dir)
        log.info("Kill-and-Revive queue: %s", where)
        self.store = SessionStore(self.redis, config.session_ttl_s)
        self.worker = SchedulerWorker(self.redis, self.store, f"{socket.gethostname()}-{os.getpid()}", config.claim_idle_s,
                                      config.report_max_tries, config.reports_maxlen)
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=rpc_threads(config)),
            options=channel_options(config.max_message_mb) + connection_options(config),
            maximum_concurrent_rpcs=4 * rpc_threads(config),  # beyond the servicer's own counts: a flood, refused by gRPC
        )
        self.servicer = SplitTrainingServicer(stack, config, self.store, KRQueue(self.redis, self.store, config.reports_maxlen),
                                              DeviceAuth(mode, TokenStore(self.redis)))
        log.info("device tokens: %s", "required (--auth token)" if mode == "token" else "not required (--auth none)")
        self.server.add_generic_rpc_handlers([handlers(self.servicer)])
        try:
            address = f"{config.host}:{config.port}"  # TLS only when configured: no plaintext port beside it
            self.port = (self.server.add_secure_port(address, credentials) if credentials
                         else self.server.add_insecure_port(address))
        except RuntimeError as e:
            raise ConfigError(f"cannot listen on {config.host}:{config.port} ({e}); pick another --port") from e
        if self.port == 0:
            raise ConfigError(f"cannot listen on {config.host}:{config.port}; pick another --port or --host")
        log.info("transport: %s", describe_transport(config))
        self.worker.start()
        self.server.start()
        host = socket.gethostname() if config.host in ("0.0.0.0", "::", "") else config.host
        self.registry = WorkerRegistry(self.redis, f"{host}:{self.port}", stack.config.model_type, stack.fingerprint,
                                       self.servicer.live_sessions)
        self.servicer.sessions_changed = self.registry.nudge
        log.info("registered as worker %s (dlora-cloud status lists the workers on this Redis)",
                 self.registry.worker_id)

    def drain(self, timeout_s: float, abort: threading.Event | None = None) -> int:
        """Shut down gracefully: Health says DRAINING (a balancer's readiness check fails), the registration goes,
        new streams are refused (UNAVAILABLE), and each live stream ends at its next step boundary, after the step
        in flight, so its device continues the session elsewhere; then stop. `abort` set: stop at once. Returns
        the streams still open when it stopped (the stop ends them)."""
        self.servicer.draining.set()
        self.registry.stop()
        self.servicer.wake_all()  # streams idle between steps end now; the others after their step
        deadline = time.monotonic() + timeout_s
        while self.servicer.live_sessions() and time.monotonic() < deadline and not (abort and abort.is_set()):
            time.sleep(0.1)
        left = len(self.servicer.live_sessions())
        self.stop(grace=1)
        return left

    def stop(self, grace: float | None = None) -> None:
        self.registry.stop()
        self.worker.stop_event.set()
        self.server.stop(grace).wait()
        self.servicer.slots.stop()
        self.servicer.pool.shutdown(wait=False, cancel_futures=True)  # cancelled streams end their micro-batches
        self.worker.join(timeout=5)
        disconnect(self.redis)
