"""A real gRPC hop between a device and a cloud that keeps every message the cloud receives: the view of
whoever runs the cloud, for tests that check what crosses the wire (test_privacy.py, test_privacy_noise.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager

import grpc

from common.pb.dlora.v1 import dlora_pb2 as pb
from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc


class RecordingProxy(pb_grpc.SplitTrainingServicer):
    """Forwards each Session stream to `upstream`, keeping the bytes of every message the device sends."""

    def __init__(self, upstream: str) -> None:
        self.stub = pb_grpc.SplitTrainingStub(grpc.insecure_channel(upstream))
        self.seen: list[bytes] = []
        self.lock = threading.Lock()

    def Session(self, request_iterator, context):  # noqa: N802 (the generated servicer's name)
        def tap():
            for msg in request_iterator:
                with self.lock:
                    self.seen.append(msg.SerializeToString())
                yield msg

        yield from self.stub.Session(tap())

    def messages(self) -> list[pb.EdgeMessage]:
        """What was seen, parsed."""
        with self.lock:
            return [pb.EdgeMessage.FromString(m) for m in self.seen]

    def first(self, kind: str):  # -> the first message's `kind` field (e.g. pb.StepBegin)
        return next(getattr(m, kind) for m in self.messages() if m.WhichOneof("kind") == kind)


@contextmanager
def recording_hop(upstream: str) -> Iterator[tuple[RecordingProxy, str]]:
    """A RecordingProxy in front of `upstream` on a loopback port: yields (proxy, its address)."""
    proxy = RecordingProxy(upstream)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_SplitTrainingServicer_to_server(proxy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield proxy, f"127.0.0.1:{port}"
    finally:
        server.stop(0)
