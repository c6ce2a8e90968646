"""`dlora-cloud tls init DIR --host NAME_OR_IP ...`: certificates for people without a PKI.

Writes into DIR (made mode 0700 if it does not exist; an existing folder keeps its mode):
    ca.pem                  the CA certificate: devices pass it as --tls-ca (serve: --tls-client-ca for mTLS)
    server.pem, server.key  the cloud's certificate and key: serve --tls-cert, --tls-key
    client.pem, client.key  a device certificate and key, for mTLS: --tls-cert, --tls-key on the device
Keys are ECDSA P-256, written mode 0600. The CA is valid 10 years, the two leaves 2 years. The server
certificate names every --host (a DNS name as a DNSName, an address as an IPAddress) plus localhost,
127.0.0.1 and ::1, so that checks on the cloud's own host (`dlora-cloud health`, a compose healthcheck)
verify too. The CA's private key is never written: it signs the two leaves in memory and is dropped, so a
stolen folder cannot mint certificates; to change anything, run `tls init --force` again (a new CA, which
every device must then get).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import re
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.errors import ConfigError

CA_DAYS = 3650  # the CA: 10 years
LEAF_DAYS = 730  # the server and client certificates: 2 years
ALWAYS = ("localhost", "127.0.0.1", "::1")  # in every server certificate, besides the --host names
FILES = ("ca.pem", "server.pem", "server.key", "client.pem", "client.key")
_DNS = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")


def san_of(host: str) -> x509.GeneralName:
    """A --host value as a subject alternative name: an IP address as IPAddress, anything else as DNSName.

    Raises:
        ConfigError: not a host name or address (a port, a URL, spaces), or 0.0.0.0 / :: (where a server
            listens, not a name a device dials).
    """
    name = host.strip().strip("[]").lower()
    try:
        ip = ipaddress.ip_address(name)
    except ValueError:
        if not _DNS.match(name) or len(name) > 253:
            raise ConfigError(f"--host {host!r}: give the DNS name or IP address devices dial, without port or "
                              "scheme (e.g. --host cloud.example.org --host 203.0.113.7)") from None
        return x509.DNSName(name)
    if ip.is_unspecified:
        raise ConfigError(f"--host {host!r}: that is where a server listens, not an address devices dial; give "
                          "the name or IP address devices connect to")
    return x509.IPAddress(ip)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dlora"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
          days: int, extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))  # tolerate a device clock a little behind
               .not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False))
    for ext, critical in extensions:
        builder = builder.add_extension(ext, critical=critical)
    return builder.sign(signer, hashes.SHA256())


def _key_usage(ca: bool) -> x509.KeyUsage:
    """What a key may do: the CA's signs certificates and CRLs, a leaf's signs and agrees keys (ECDHE)."""
    return x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                         data_encipherment=False, key_agreement=not ca, key_cert_sign=ca, crl_sign=ca,
                         encipher_only=False, decipher_only=False)


def _leaf_extensions(ca_key: ec.EllipticCurvePrivateKey, usage: x509.ObjectIdentifier
                     ) -> list[tuple[x509.ExtensionType, bool]]:
    return [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (_key_usage(ca=False), True),
        (x509.ExtendedKeyUsage([usage]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False),
    ]


def make_certificates(hosts: list[str]) -> dict[str, bytes]:
    """The five files' contents (FILES): a fresh CA, a server certificate for `hosts` (plus ALWAYS), a
    client certificate; PEM, keys unencrypted PKCS#8.

    Raises:
        ConfigError: no --host, or a bad one (san_of).
    """
    if not hosts:
        raise ConfigError("tls init needs at least one --host: the DNS name or IP address devices dial")
    sans: list[x509.GeneralName] = []
    for host in [*hosts, *ALWAYS]:
        san = san_of(host)
        if san not in sans:
            sans.append(san)
    ca_key, server_key, client_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca_name = _name("dlora CA")
    ca = _cert("dlora CA", ca_key, ca_name, ca_key, CA_DAYS, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (_key_usage(ca=True), True),
    ])
    server = _cert(hosts[0].strip().strip("[]"), server_key, ca_name, ca_key, LEAF_DAYS, [
        *_leaf_extensions(ca_key, ExtendedKeyUsageOID.SERVER_AUTH),
        (x509.SubjectAlternativeName(sans), False),
    ])
    client = _cert("dlora device", client_key, ca_name, ca_key, LEAF_DAYS,
                   _leaf_extensions(ca_key, ExtendedKeyUsageOID.CLIENT_AUTH))

    def pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    pem = serialization.Encoding.PEM
    return {"ca.pem": ca.public_bytes(pem), "server.pem": server.public_bytes(pem), "server.key": pem_key(server_key),
            "client.pem": client.public_bytes(pem), "client.key": pem_key(client_key)}


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to path.tmp with `mode` from the start, then rename it over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # an older .tmp may have had another mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def init_dir(folder: Path, hosts: list[str], force: bool = False) -> dict[str, Path]:
    """Make the certificate set in `folder` (made 0700; certificates 0644, keys 0600); file name -> path.

    Raises:
        ConfigError: a bad --host, or the folder already holds a set and force is off.
    """
    files = make_certificates(hosts)  # checks --host before touching the folder
    existing = [name for name in FILES if (folder / name).exists()]
    if existing and not force:
        raise ConfigError(f"{folder} already holds {', '.join(existing)}; pass --force to replace them (every device "
                          "then needs the new ca.pem) or choose another folder")
    if not folder.is_dir():
        folder.mkdir(parents=True, mode=0o700)
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
    for name, data in files.items():
        _write(folder / name, data, 0o600 if name.endswith(".key") else 0o644)
    return {name: folder / name for name in FILES}


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`tls init`, under the dlora-cloud command line's subcommands."""
    tls = sub.add_parser("tls", help="make certificates for TLS and mTLS (for people without a PKI)")
    tls_sub = tls.add_subparsers(dest="tls_command", required=True)
    init = tls_sub.add_parser("init", help="a CA, a server certificate for --host and a client certificate, in DIR")
    init.add_argument("dir", type=Path, metavar="DIR", help="folder for the certificates (made mode 0700)")
    init.add_argument("--host", action="append", default=[], required=True, metavar="NAME_OR_IP",
                      help="a DNS name or IP address devices dial, repeatable (localhost, 127.0.0.1 and ::1 are "
                           "always added)")
    init.add_argument("--force", action="store_true", help="replace a certificate set already in DIR")


def run(args: argparse.Namespace) -> int:
    """`dlora-cloud tls init`: write the set and say which file goes where.

    Raises:
        ConfigError: see init_dir.
    """
    paths = init_dir(args.dir, args.host, args.force)
    d = {name: str(path) for name, path in paths.items()}
    print(f"wrote a CA, a server certificate for {', '.join(args.host)} (and localhost) and a client certificate "
          f"to {args.dir}\n"
          f"  cloud:  dlora-cloud serve --tls-cert {d['server.pem']} --tls-key {d['server.key']}"
          f" [--tls-client-ca {d['ca.pem']}  (mTLS: devices must present client.pem)]\n"
          f"  device: dlora train|eval|bench, dlora-cloud health: --tls-ca {d['ca.pem']}"
          f" [--tls-cert {d['client.pem']} --tls-key {d['client.key']}  (mTLS)]\n"
          f"  copy ca.pem (and, for mTLS, client.pem and client.key) to each device; server.key and client.key "
          "are secrets (mode 0600); the CA's own key was not kept: rerun with --force to change anything")
    return 0
