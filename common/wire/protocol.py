"""Facts both ends of a session stream must agree on: the protocol name, the RPC paths, the codec
names a flag may choose, and the gRPC channel options. Nothing here imports torch, so command lines
can use it before process tuning (common/tuning.py) has run."""

from __future__ import annotations

import re
import secrets

PROTOCOL = "dlora.v1"  # Hello.protocol; a cloud refuses an edge that speaks another
SERVICE = "dlora.v1.SplitTraining"
SESSION_METHOD = f"/{SERVICE}/Session"  # the bidirectional session stream
HEALTH_METHOD = f"/{SERVICE}/Health"

WIRE_CODECS = ("float32", "bfloat16", "float16", "int8")  # what --wire, --wire-up, --wire-down accept
DEFAULT_BLOCK_SIZE = 4096  # int8: elements per absmax scale (--int8-block-size)
MAX_BLOCK_SIZE = 1 << 24  # the largest int8 block a receiver accepts
AUTH_METADATA = "authorization"  # the session stream's call metadata carrying `Bearer <device token>`
SESSION_ID_HEX = 32  # a session id: 128 random bits as lowercase hex (secrets.token_hex(16))
_SESSION_ID = re.compile(f"[0-9a-f]{{{SESSION_ID_HEX}}}")


def new_session_id() -> str:
    """A fresh session id, as the cloud issues them: SESSION_ID_HEX lowercase hex digits, 128 random bits."""
    return secrets.token_hex(SESSION_ID_HEX // 2)


def is_session_id(text: str) -> bool:
    """Whether `text` has the form of a session id the cloud issues (new_session_id)."""
    return _SESSION_ID.fullmatch(text) is not None


def channel_options(max_message_mb: int) -> list[tuple[str, int]]:
    """gRPC message limits, set explicitly on both ends (gRPC's default receive limit is 4 MB)."""
    limit = max_message_mb * 1024 * 1024
    return [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
