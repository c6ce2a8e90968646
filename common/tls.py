"""TLS between device and cloud: PEM files read and checked, credentials for both ends, the transport
rule (TLS on every non-loopback address unless --insecure), and handshake failures told apart.

gRPC reports every failed connection as UNAVAILABLE and, on a secure channel that cannot complete its
handshake, simply never becomes ready; `wait_ready` probes the cloud's Health instead, reads the reason
gRPC gives, and turns a TLS mismatch into one line naming the flag to fix, at once rather than after
--connect-timeout. `dlora-cloud tls init` (cloud_server/tls_init.py) makes a set of files for all of it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.config import ServeConfig
from common.errors import ConfigError, RemoteError
from common.net import is_loopback
from common.wire.protocol import HEALTH_METHOD


def read_pem(path: Path, flag: str, what: str = "CERTIFICATE") -> bytes:
    """The bytes of a PEM file given as `flag`, checked to hold at least one `what` block
    (CERTIFICATE, or PRIVATE KEY for any key type).

    Raises:
        ConfigError: missing, unreadable, or not PEM of that kind (one line naming the flag).
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{flag} {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"{flag} {path}: cannot read it ({e.strerror}); check the path and its permissions") from None
    if what == "PRIVATE KEY":
        ok = b"-----BEGIN " in data and b"PRIVATE KEY-----" in data
    else:
        ok = f"-----BEGIN {what}-----".encode() in data
    if not ok:
        kind = "a private key" if what == "PRIVATE KEY" else "a certificate"
        raise ConfigError(f"{flag} {path}: not a PEM file holding {kind} (-----BEGIN {what}-----)")
    return data


def _certificates(data: bytes, path: Path, flag: str) -> list[x509.Certificate]:
    """Every certificate in a PEM file, checked to be in its validity period.

    Raises:
        ConfigError: unparsable, or expired or not yet valid.
    """
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise ConfigError(f"{flag} {path}: not a valid PEM certificate ({e})") from None
    now = dt.datetime.now(dt.UTC)
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise ConfigError(f"{flag} {path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d}; "
                              "make a new one (e.g. `dlora-cloud tls init DIR --host NAME --force`)")
        if cert.not_valid_before_utc > now:
            raise ConfigError(f"{flag} {path}: the certificate is valid only from "
                              f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC; check this machine's clock")
    return certs


def key_pair(cert_path: Path, key_path: Path, cert_flag: str, key_flag: str) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM), as gRPC takes them, checked to belong together.

    Raises:
        ConfigError: a file missing, unreadable, not PEM, expired, an encrypted key, or a key that does not
            match the certificate.
    """
    cert_pem, key_pem = read_pem(cert_path, cert_flag), read_pem(key_path, key_flag, "PRIVATE KEY")
    leaf = _certificates(cert_pem, cert_path, cert_flag)[0]
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise ConfigError(f"{key_flag} {key_path}: the key is encrypted; give it without a passphrase "
                          "(e.g. `openssl pkey -in KEY -out KEY.plain`) and keep the file mode 0600") from None
    except ValueError as e:
        raise ConfigError(f"{key_flag} {key_path}: not a valid PEM private key ({e})") from None
    pub = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, pub) != leaf.public_key().public_bytes(
            serialization.Encoding.DER, pub):
        raise ConfigError(f"{key_flag} {key_path} is not the key of {cert_flag} {cert_path}; give the matching pair")
    return key_pem, cert_pem


def read_ca(path: Path, flag: str) -> bytes:
    """A CA bundle (one or more PEM certificates).

    Raises:
        ConfigError: missing, unreadable, not PEM, expired.
    """
    data = read_pem(path, flag)
    _certificates(data, path, flag)
    return data


def _check_pair(cert: Path | None, key: Path | None, whose: str) -> None:
    """--tls-cert and --tls-key come together or not at all.

    Raises:
        ConfigError: one without the other (one line naming both flags).
    """
    if (cert is None) != (key is None):
        given, missing = ("--tls-cert", "--tls-key") if cert else ("--tls-key", "--tls-cert")
        raise ConfigError(f"{given} needs {missing} too: pass {whose} certificate and its key together")


# -- the cloud
def server_credentials(config: ServeConfig) -> grpc.ServerCredentials | None:
    """The serve config's TLS credentials (mTLS with --tls-client-ca), or None for plaintext, which only a
    loopback --host or --insecure allows.

    Raises:
        ConfigError: one of --tls-cert / --tls-key without the other, --tls-client-ca without them, a bad PEM
            file (read_pem, key_pair), or plaintext on a non-loopback address without --insecure.
    """
    _check_pair(config.tls_cert, config.tls_key, "the server")
    if config.tls_cert is None or config.tls_key is None:
        if config.tls_client_ca is not None:
            raise ConfigError("--tls-client-ca needs --tls-cert and --tls-key: mTLS is TLS plus client certificates")
        if not is_loopback(config.host) and not config.insecure:
            raise ConfigError(f"--host {config.host} is not a loopback address: serve TLS with --tls-cert and "
                              "--tls-key (make them with `dlora-cloud tls init DIR --host NAME`), or pass --insecure "
                              "to send training data in the clear")
        return None
    pair = key_pair(config.tls_cert, config.tls_key, "--tls-cert", "--tls-key")
    client_ca = read_ca(config.tls_client_ca, "--tls-client-ca") if config.tls_client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=client_ca, require_client_auth=client_ca is not None)


def describe_transport(config: ServeConfig) -> str:
    """"mTLS", "TLS" or "plaintext", for the cloud's log."""
    if config.tls_cert is None:
        return "plaintext"
    return "mTLS (client certificates required)" if config.tls_client_ca else "TLS"


# -- the device
@dataclass(frozen=True)
class ClientTLS:
    """What a device needs to speak TLS to the cloud: PEM bytes, read once when the config is built."""

    ca: bytes  # the CA that signed the cloud's certificate (--tls-ca)
    cert: bytes | None = None  # this device's certificate chain, for mTLS (--tls-cert)
    key: bytes | None = None  # its private key (--tls-key)
    cert_file: Path | None = None  # where cert and key came from: tls_probe presents them too (ssl takes files)
    key_file: Path | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca, private_key=self.key,
                                            certificate_chain=self.cert)


def client_tls(ca: Path | None, cert: Path | None = None, key: Path | None = None) -> ClientTLS | None:
    """--tls-ca [--tls-cert --tls-key] read and checked; None (plaintext) when none is given.

    Raises:
        ConfigError: --tls-cert without --tls-key (or the reverse), either without --tls-ca, or a bad PEM file.
    """
    _check_pair(cert, key, "this device's")
    if ca is None:
        if cert is not None:
            raise ConfigError("--tls-cert and --tls-key need --tls-ca: the CA that signed the cloud's certificate")
        return None
    pair = key_pair(cert, key, "--tls-cert", "--tls-key") if cert and key else None
    return ClientTLS(read_ca(ca, "--tls-ca"), pair[1] if pair else None, pair[0] if pair else None, cert, key)


def add_client_flags(p: argparse.ArgumentParser) -> None:
    """--tls-ca, --tls-cert, --tls-key: for dlora train, eval, bench workers and dlora-cloud health."""
    p.add_argument("--tls-ca", type=Path, default=None, metavar="PEM",
                   help="speak TLS to the cloud, trusting this CA (ca.pem of `dlora-cloud tls init`) (default: plaintext)")
    p.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="this device's certificate, for a cloud serving mTLS (with --tls-key)")
    p.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")


def open_channel(address: str, tls: ClientTLS | None, options: list[tuple[str, int]] | None = None) -> grpc.Channel:
    """A channel to the cloud: secure with `tls`, plaintext without."""
    if tls is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, tls.credentials(), options=options)


def tls_probe(address: str, tls: ClientTLS | None, timeout_s: float = 2.0) -> str:
    """What the peer at HOST:PORT does with a TLS handshake of our own (stdlib ssl), presenting this device's
    certificate if it has one; used only after gRPC saw a connection closed at once, which alone cannot tell
    a TLS cloud from a proxy whose cloud is down. The probe asks whether, not whom: it verifies nothing.

    Returns:
        "tls": it completed the handshake and spoke HTTP/2; "mtls": it completed the handshake and then hung
        up (it wants a client certificate, or not this one); "plain": it answered, not in TLS; "closed": it hung
        up before answering (or the address is not HOST:PORT, or nothing listens).
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "/" in host:
        return "closed"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["h2"])
    if tls is not None and tls.cert_file and tls.key_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file)
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s) as raw, \
                ctx.wrap_socket(raw) as conn:
            try:
                return "tls" if conn.recv(1) else "mtls"  # a gRPC server sends its SETTINGS frame at once
            except (ssl.SSLError, ConnectionError):
                return "mtls"
            except TimeoutError:
                return "tls"
    except ssl.SSLError as e:
        return "closed" if isinstance(e, ssl.SSLEOFError) else "plain"
    except OSError:
        return "closed"


def handshake_problem(details: str, address: str, tls: ClientTLS | None) -> str | None:
    """One line naming what a failed connection's gRPC details say about TLS and the flag to fix, or None
    when they say nothing about TLS (the cloud is down, unreachable, or refused the connection). A connection
    closed at once is looked at closer with tls_probe."""
    if "WRONG_VERSION_NUMBER" in details:
        return (f"TLS handshake with {address} failed: the cloud does not speak TLS there; drop --tls-ca, or serve "
                "with --tls-cert and --tls-key")
    if "CERTIFICATE_VERIFY_FAILED" in details:
        return (f"TLS handshake with {address} failed: the cloud's certificate is not signed by --tls-ca (or has "
                "expired); check --tls-ca")
    if "Hostname Verification" in details or "Peer name" in details:
        host = address.rsplit(":", 1)[0].strip("[]")
        return (f"TLS handshake with {address} failed: the cloud's certificate does not name {host}; dial a name it "
                f"holds, or make it with `dlora-cloud tls init DIR --host {host}`")
    if "Socket closed" in details or "Connection reset" in details:
        peer = tls_probe(address, tls)
        if tls is None and peer in ("tls", "mtls"):
            return (f"{address} serves TLS and this device spoke plaintext: pass --tls-ca (the CA that signed its "
                    "certificate, ca.pem of `dlora-cloud tls init`)")
        if tls is None or peer != "mtls":
            return None  # the cloud, or a proxy before it, hung up: not a TLS matter; try again
        if tls.cert is None:
            return (f"TLS handshake with {address} failed: the cloud requires a client certificate (mTLS); pass "
                    "--tls-cert and --tls-key")
        return (f"TLS handshake with {address} failed: the cloud refused this device's certificate; pass a "
                "--tls-cert signed by the cloud's --tls-client-ca")
    return None


def _transport_failed(error: grpc.RpcError) -> bool:
    """True when a call failed because the connection did (not an answer from the cloud)."""
    details = error.details() or ""
    return error.code() == grpc.StatusCode.UNAVAILABLE and any(
        s in details for s in ("failed to connect", "Socket closed", "Connection reset", "DNS resolution failed",
                               "handshake", "Handshake"))


def _connected(channel: grpc.Channel) -> bool:
    try:
        grpc.channel_ready_future(channel).result(timeout=0.05)
    except grpc.FutureTimeoutError:
        return False
    return True


def wait_ready(channel: grpc.Channel, address: str, tls: ClientTLS | None, timeout_s: float) -> None:
    """Wait until the cloud answers on `channel` (any answer to a Health probe, even an error status).

    Raises:
        RemoteError: UNAVAILABLE, at once on a TLS mismatch (handshake_problem's line), else when nothing
            answered within timeout_s.
    """
    probe = channel.unary_unary(HEALTH_METHOD)  # bytes in, bytes out: an empty HealthRequest; any answer will do
    deadline = time.monotonic() + timeout_s
    pause, last = 0.05, ""
    while True:
        left = deadline - time.monotonic()
        try:
            probe(b"", timeout=max(0.05, min(left, 5.0)), wait_for_ready=False)
            return
        except grpc.RpcError as e:
            if not _transport_failed(e) and e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return  # the cloud answered (UNIMPLEMENTED, UNAUTHENTICATED, ...): the transport works
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED and _connected(channel):
                return  # connected, but Health is slow to answer: the session's own deadlines take over
            last = e.details() or e.code().name
            problem = handshake_problem(last, address, tls)
            if problem is not None:
                raise RemoteError("UNAVAILABLE", problem) from None
        if time.monotonic() + pause >= deadline:
            reason = last.rsplit(": ", 1)[-1] if last else "no answer"
            raise RemoteError("UNAVAILABLE", f"cannot reach dlora-cloud at {address} within {timeout_s:.0f}s "
                                             f"({reason}); is `dlora-cloud serve` running there?")
        time.sleep(pause)
        pause = min(pause * 2, 1.0)
