"""The cloud's end of one session stream: it moves messages and knows nothing of steps.

gRPC hands the servicer an iterator of requests and wants an iterator of responses. `EdgeStream`
turns both into queues: a reader thread drains the requests into `inbox`, and whatever is put in
`outbox` becomes the response stream. The session loop reads `inbox` with a timeout, so an edge
that goes silent ends its session instead of holding a thread forever.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterator

from common.errors import SilenceError
from common.pb.dlora.v1 import dlora_pb2 as pb
from common.wire.frames import Frame

log = logging.getLogger(__name__)

_END = object()  # end-of-stream marker on the queues


class EdgeStream:
    """The cloud's end of one stream: a reader thread fills `inbox`, `outbox` feeds the response."""

    def __init__(self, requests: Iterator[Frame], reply_timeout_s: float) -> None:
        self.inbox: queue.Queue[object] = queue.Queue()
        self.outbox: queue.Queue[object] = queue.Queue()
        self.reply_timeout_s = reply_timeout_s  # how long the cloud waits for any edge message
        self._reader = threading.Thread(target=self._read, args=(requests,), daemon=True)
        self._reader.start()

    def _read(self, requests: Iterator[Frame]) -> None:
        try:
            for msg in requests:
                self.inbox.put(msg)
        except Exception as e:  # noqa: BLE001 - a cancelled stream raises grpc.RpcError here
            log.debug("request stream ended: %s", e)
        self.inbox.put(_END)

    def send(self, msg: pb.CloudMessage | Frame) -> None:
        """Queue a message for the edge (a bare CloudMessage travels without tensor payloads)."""
        self.outbox.put(msg if isinstance(msg, Frame) else Frame(msg))

    def interrupt(self, error: Exception) -> None:
        """Make the session loop's next `recv` raise `error` (e.g. a newer stream took this session over)."""
        self.inbox.put(error)

    def close(self) -> None:
        """End the response stream once everything queued before it has gone out."""
        self.outbox.put(_END)

    def responses(self) -> Iterator[Frame]:
        """The response stream gRPC sends, until `close`."""
        while (msg := self.outbox.get()) is not _END:
            yield msg  # type: ignore[misc]

    def recv(self, timeout_s: float | None = None, limit: str | None = None) -> Frame | None:
        """The next edge message, None at end of stream.

        Args:
            timeout_s: how long to wait (default reply_timeout_s); `limit` names the flag that set it and its
                value, for the error (default --step-timeout's).

        Raises:
            SilenceError: the edge sent nothing for that long (DEADLINE_EXCEEDED).
            Exception: what `interrupt` was given, or a request that could not be parsed (ProtocolError).
        """
        wait = self.reply_timeout_s if timeout_s is None else timeout_s
        try:
            msg = self.inbox.get(timeout=wait)
        except queue.Empty:
            limit = limit or f"--step-timeout ({self.reply_timeout_s:g}s)"
            raise SilenceError(f"the edge sent nothing within {limit}; closing the stream") from None
        if isinstance(msg, Exception):
            raise msg
        return None if msg is _END else msg  # type: ignore[return-value]
