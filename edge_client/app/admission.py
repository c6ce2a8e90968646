"""Who may reach the dlora-edge daemon, and what they may ask of it.

Whoever reaches the daemon's control API makes this user's daemon read files, send what it reads to a
cloud and write files. Who that is: the unix socket is created mode 0600 (0660 and chgrp'd with
--socket-group), never wider even for an instant (`bind`); the state dir is 0700; TCP is served on a
loopback address only, and there every local user gets in (a single-user machine's choice). What they may
ask for is checked on the daemon's side, before anything is written or started (`admit`):
- every file a session reads (data, token, TLS files) and the folder it writes (output) must lie, after
  following symlinks, under one of the allowed roots (`--allow-root`, default: the home of the user who
  started the daemon);
- the cloud address is HOST:PORT, nothing else (no `unix:` path, no scheme);
- a session id is exactly the daemon's own format, so `.`, `..` and slashes never reach a path.
The model folder is not held to the roots: it is only read, parsed as a model, and only a hash of it
leaves the device (the handshake's fingerprint).
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import re
import secrets
import stat
import time
from collections.abc import Sequence
from pathlib import Path

import grpc
from pydantic import ValidationError

from common.config import TrainConfig, flag_error
from common.errors import ConfigError
from common.net import is_loopback

log = logging.getLogger("dlora.daemon")
KINDS = ("train", "local-train")
SESSION_ID = re.compile(r"[0-9]{8}-[0-9]{6}-[0-9a-f]{6}")  # what new_session_id makes: 20250101-120000-1a2b3c
_PORT = r"([0-9]{1,5})"
_HOST = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?")  # a DNS name or IPv4
_HOST_PORT = re.compile(rf"(\[[0-9A-Fa-f:.]+\]|[^:\[\]]+):{_PORT}")
_READ_FILES = ("data", "token_file", "tls_ca", "tls_cert", "tls_key")  # TrainConfig fields: files a session reads


class OutsideRootsError(ConfigError):
    """A session config names a path outside the daemon's allowed roots (refused with PERMISSION_DENIED)."""


def new_session_id() -> str:
    """A new session id: the time it was made (so they sort) and 24 random bits (local names, not secrets)."""
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def check_session_id(session_id: str) -> str:
    """The id, if it has the daemon's own format.

    Raises:
        ConfigError: anything else (".", "..", a path, an empty id).
    """
    if not SESSION_ID.fullmatch(session_id):
        raise ConfigError(f"session id {session_id[:40]!r} is not a dlora-edge session id "
                          "(YYYYMMDD-HHMMSS-xxxxxx); `dlora list` shows them")
    return session_id


def _host_port(address: str) -> tuple[str, int] | None:
    """(host, port) of a HOST:PORT or [IPv6]:PORT address, or None if it is not one."""
    m = _HOST_PORT.fullmatch(address)
    if not m or not 1 <= int(m.group(2)) <= 65535:
        return None
    host = m.group(1)
    if host.startswith("[") or _HOST.fullmatch(host):
        return host, int(m.group(2))
    return None


def check_listen(listen: str) -> str:
    """The daemon's --listen, if it is a unix socket path or a loopback HOST:PORT.

    Raises:
        ConfigError: another scheme, or a TCP host that is not loopback.
    """
    if listen.startswith("unix:") and not listen.startswith("unix://"):
        if not listen[5:]:
            raise ConfigError("--listen unix: needs a path (unix:/path/to/daemon.sock)")
        return listen
    hp = _host_port(listen)
    if hp is None:
        raise ConfigError(f"--listen {listen!r}: use unix:PATH or 127.0.0.1:PORT")
    if not is_loopback(hp[0]):
        raise ConfigError(f"--listen {listen}: the daemon listens on TCP only on a loopback address "
                          "(127.0.0.1, ::1, localhost); use unix:PATH to reach it from elsewhere through ssh")
    return listen


def check_cloud(address: str | None, kind: str) -> None:
    """A train session's cloud is HOST:PORT (local-train has none).

    Raises:
        ConfigError: missing or not HOST:PORT.
    """
    if kind != "train":
        return
    if not address or _host_port(address) is None:
        raise ConfigError(f"--cloud {address!r}: use HOST:PORT (a host name or an IP address, and a port 1-65535)")


def default_roots() -> tuple[Path, ...]:
    """The home of the user running this process (from the password database, not $HOME)."""
    return (Path(pwd.getpwuid(os.getuid()).pw_dir).resolve(),)


def under_roots(path: Path, field: str, roots: Sequence[Path]) -> Path:
    """`path` with every symlink resolved, if that lies under one of `roots` (themselves resolved).

    Raises:
        ConfigError: a relative path.
        OutsideRootsError: the resolved path is outside every root.
    """
    flag = "--" + field.replace("_", "-")
    if not path.is_absolute():
        raise ConfigError(f"{flag} {path}: the daemon needs an absolute path")
    real = path.resolve()
    if not any(real.is_relative_to(root) for root in roots):
        shown = f"{path} (-> {real})" if real != path else str(path)
        raise OutsideRootsError(f"{flag} {shown} is outside the daemon's allowed roots "
                                f"({', '.join(map(str, roots))}); move it, or start the daemon with --allow-root")
    return real


def admit(config_json: str, kind: str, roots: Sequence[Path]) -> TrainConfig:
    """The session config a client sent, checked on the daemon's side, with every checked path resolved
    (the session then opens exactly what was checked).

    Raises:
        ConfigError: an unknown kind, a config that does not validate, a missing data file, a bad cloud address.
        OutsideRootsError: data, output, the token file or a TLS file outside the allowed roots.
    """
    if kind not in KINDS:
        raise ConfigError(f"kind must be train or local-train, not {kind[:40]!r}")
    try:
        cfg = TrainConfig.model_validate_json(config_json)
    except ValidationError as e:
        raise flag_error(e) from None
    check_cloud(cfg.cloud, kind)
    resolved: dict[str, Path] = {"output": under_roots(cfg.output, "output", roots)}
    for field in _READ_FILES:
        value = getattr(cfg, field)
        if value is not None:
            resolved[field] = under_roots(value, field, roots)
            if not resolved[field].is_file():
                raise ConfigError(f"--{field.replace('_', '-')} {value}: no such file")
    return cfg.model_copy(update={**resolved, "progress": False})


def request_json(cfg: TrainConfig, kind: str) -> str:
    """What the daemon keeps as a session's request.json (and the session runner reads)."""
    return json.dumps({"kind": kind, "config": json.loads(cfg.model_dump_json())}, indent=1)


def state_dir(path: Path) -> None:
    """Create the state dir, or narrow it, to mode 0700: session requests, logs and checkpoints are this user's.

    Raises:
        ConfigError: it cannot be created, or it is another user's.
    """
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(path, 0o700)
    except OSError as e:
        raise ConfigError(f"--state-dir {path}: {e.strerror}; choose a folder of your own") from None


def _group_id(group: str) -> int:
    """The id of a group given by name or number.

    Raises:
        ConfigError: no such group.
    """
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        if group.isdigit():
            return int(group)
        raise ConfigError(f"--socket-group {group!r}: no such group") from None


def _add_port(server: grpc.Server, listen: str) -> None:
    try:
        server.add_insecure_port(listen)
    except RuntimeError:
        raise ConfigError(f"--listen {listen}: cannot listen there (in use, or no such folder); pick another") from None


def bind(server: grpc.Server, listen: str, socket_group: str | None) -> None:
    """Bind the control API. A unix socket is created mode 0600, or 0660 owned by `socket_group`: bound under
    umask 0177, so it is never open wider than 0600, then chmod'ed (and chgrp'ed). TCP only on loopback.

    Raises:
        ConfigError: a refused address, a path that is not a socket, an unknown group or one this user cannot give.
    """
    check_listen(listen)
    if not listen.startswith("unix:"):
        if socket_group is not None:
            raise ConfigError("--socket-group applies to a unix socket (--listen unix:PATH)")
        _add_port(server, listen)
        log.warning("listening on TCP %s: every local user can submit sessions that run as this user; "
                    "prefer --listen unix:PATH on a shared machine", listen)
        return
    path = Path(listen[5:])
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise ConfigError(f"--listen {listen}: {path} exists and is not a socket; pick another path")
        path.unlink()  # a previous daemon's socket
    gid = _group_id(socket_group) if socket_group is not None else None
    old = os.umask(0o177)
    try:
        _add_port(server, listen)
    finally:
        os.umask(old)
    if gid is None:
        os.chmod(path, 0o600)
        return
    try:
        os.chown(path, -1, gid)
        os.chmod(path, 0o660)
    except OSError as e:
        raise ConfigError(f"--socket-group {socket_group}: cannot give the socket to it ({e.strerror}); "
                          "use a group you belong to") from None
    if not os.stat(path.parent).st_mode & stat.S_IXGRP:
        log.warning("--socket-group %s: the group cannot enter %s; put the socket in a folder it can "
                    "(e.g. /run/dlora-edge)", socket_group, path.parent)


def allowed_roots(given: list[Path] | None) -> tuple[Path, ...]:
    """--allow-root folders, resolved; default: the home of the user running the daemon.

    Raises:
        ConfigError: a root that is not an existing folder.
    """
    if not given:
        return default_roots()
    for root in given:
        if not root.resolve().is_dir():
            raise ConfigError(f"--allow-root {root}: no such folder")
    return tuple(root.resolve() for root in given)
