"""The gRPC server: decode, call the session, encode. No model math lives here."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc

from cloud_server.session import PROTOCOL, EdgeLink, open_spec, run_session
from cloud_server.stack import DecoderStack
from common.config import ServeConfig
from common.errors import ConfigError, DloraError, status_of
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
VERSION = "0.1.0"


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """gRPC message limits, set explicitly on both ends (gRPC's default receive limit is 4 MB)."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]


class SplitTrainingServicer(pb_grpc.SplitTrainingServicer):
    """Sessions over one shared DecoderStack."""

    def __init__(self, stack: DecoderStack, config: ServeConfig) -> None:
        self.stack, self.config = stack, config
        self._lock = threading.Lock()
        self._open: set[str] = set()

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthReply:
        with self._lock:
            n = len(self._open)
        return pb.HealthReply(
            status="SERVING", model_type=self.stack.config.model_type,
            model_fingerprint=self.stack.fingerprint, open_sessions=n,
        )

    def Session(self, request_iterator: Iterator[pb.EdgeMessage], context: grpc.ServicerContext) -> Iterator[pb.CloudMessage]:
        link = EdgeLink(request_iterator, self.config.step_timeout_s)
        try:
            first = link.recv()
            if first is None or first.WhichOneof("kind") != "hello":
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message of a session must be hello")
            hello = first.hello
            session_id = hello.session_id or uuid.uuid4().hex[:12]
            spec = open_spec(hello, self.stack, session_id)
        except DloraError as e:
            log.warning("session refused (%s): %s", getattr(context, "peer", lambda: "?")(), e)
            context.abort(status_of(e), str(e))
        with self._lock:
            self._open.add(session_id)
        log.info("session %s opened by %s targets=%s wire=%s/%s", session_id, hello.client_name or "?",
                 ",".join(hello.targets), spec.codec_up, spec.codec_down)
        link.send(pb.CloudMessage(welcome=pb.Welcome(
            session_id=session_id, protocol=PROTOCOL, num_layers=self.stack.num_layers,
            model_type=self.stack.config.model_type, server_version=VERSION)))
        worker = threading.Thread(target=self._serve, args=(link, spec, context), daemon=True, name=f"session-{session_id}")
        worker.start()
        yield from link.responses()

    def _serve(self, link: EdgeLink, spec, context: grpc.ServicerContext) -> None:  # type: ignore[no-untyped-def]
        try:
            run_session(link, self.stack, spec, self.config.max_tokens)
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
                self._open.discard(spec.session_id)
            log.info("session %s closed", spec.session_id)
            link.close()


def start_server(stack: DecoderStack, config: ServeConfig) -> tuple[grpc.Server, int]:
    """Start serving; returns the server and the bound port.

    Raises:
        ConfigError: the address cannot be bound.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=config.max_sessions + 4),
        options=channel_options(config.max_message_mb),
        maximum_concurrent_rpcs=config.max_sessions + 4,
    )
    pb_grpc.add_SplitTrainingServicer_to_server(SplitTrainingServicer(stack, config), server)
    try:
        port = server.add_insecure_port(f"{config.host}:{config.port}")
    except RuntimeError as e:
        raise ConfigError(f"cannot listen on {config.host}:{config.port} ({e}); pick another --port") from e
    if port == 0:
        raise ConfigError(f"cannot listen on {config.host}:{config.port}; pick another --port or --host")
    server.start()
    return server, port
