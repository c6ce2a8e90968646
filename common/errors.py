"""The dlora error tree, and the one table that maps it to gRPC status codes.

Every error carries a one-line message that names what is wrong and what to do.
"""

from __future__ import annotations

import grpc


class DloraError(Exception):
    """Base of every error dlora raises on purpose."""


class ConfigError(DloraError, ValueError):
    """A flag, a config file, a model folder or a data file is not what dlora needs."""


class ProtocolError(DloraError, ValueError):
    """A message does not match what the step expects (shape, dtype, byte length, values, order)."""


class SessionError(DloraError):
    """A session cannot start or continue (unknown id, model mismatch, expired state)."""


class AuthError(DloraError):
    """A call carries no device token, or one the cloud does not know (wrong or revoked)."""


class AccessError(SessionError):
    """A valid device token asks for a session that belongs to another token."""


class SupersededError(SessionError):
    """A newer stream of the same session, with the owning token, has taken this stream's place."""


class LimitError(DloraError):
    """A request is over one of the cloud's limits (sessions, micro-batches or tokens in flight).

    Not the peer's mistake, and not worth an immediate retry: wait, or send less.
    """


class SilenceError(SessionError):
    """A peer said nothing for longer than a limit allows (no Hello in time, or idle between steps)."""


class UnavailableError(DloraError):
    """A service the cloud relies on (its Redis) failed or cannot be reached; the same call may succeed later."""


class DrainingError(UnavailableError):
    """This worker is shutting down gracefully: the device reconnects (through a balancer, to another worker)."""


class RemoteError(DloraError):
    """The other side answered with an error, or could not be reached.

    Attributes:
        code: the gRPC status code name ("UNAVAILABLE", "INVALID_ARGUMENT", ...).
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


STATUS_OF: dict[type[DloraError], grpc.StatusCode] = {
    ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    ProtocolError: grpc.StatusCode.INVALID_ARGUMENT,
    SessionError: grpc.StatusCode.FAILED_PRECONDITION,
    AuthError: grpc.StatusCode.UNAUTHENTICATED,
    AccessError: grpc.StatusCode.PERMISSION_DENIED,
    SupersededError: grpc.StatusCode.ABORTED,
    LimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    SilenceError: grpc.StatusCode.DEADLINE_EXCEEDED,
    UnavailableError: grpc.StatusCode.UNAVAILABLE,
    RemoteError: grpc.StatusCode.UNAVAILABLE,
}

# Only these are worth a retry: the call may succeed if tried again.
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def status_of(error: BaseException) -> grpc.StatusCode:
    """The gRPC status code for an error; INTERNAL for anything dlora did not raise on purpose."""
    for cls in type(error).__mro__:
        if cls in STATUS_OF:
            return STATUS_OF[cls]
    return grpc.StatusCode.INTERNAL


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message, at most `limit` long; its type's name when the message is empty
    (for a one-line error that quotes a library's multi-line one)."""
    return (str(error).splitlines() or [type(error).__name__])[0][:limit]


def one_line(text: str, limit: int = 300) -> str:
    """Text from the other side, safe to show: one line of printable characters, at most `limit` long.

    A peer's error message is untrusted input: it could carry newlines, terminal escapes or megabytes.
    """
    flat = "".join(c if c.isprintable() else " " for c in text[: limit + 1])
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."
