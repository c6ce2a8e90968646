"""Device tokens: the secrets devices present to `dlora-cloud serve --auth token`, their store in Redis,
what serve checks on each call (`DeviceAuth`), and the `dlora-cloud token add|list|revoke` commands.

A token is `dlora_` and 43 URL-safe characters: 256 random bits (`secrets.token_urlsafe(32)`); the
prefix lets a secret scanner recognise one. `token add` prints it once; Redis, the control plane every
cloud worker shares, keeps only its SHA-256:
- `dlora:token:{sha256 hex}` (hash): `name`, `created` (unix seconds): what a call's token is looked up by;
- `dlora:tokens` (hash): name -> sha256 hex: the index `token list` and `token revoke` read.
Neither expires. `token revoke NAME` deletes both; the streams that token opened end at their next step
(`DeviceAuth.check` runs before every StepBegin: one EXISTS).

Why a plain SHA-256 and not a password hash (bcrypt, scrypt, Argon2): those make each guess of a
low-entropy password from a leaked hash expensive. Nobody can enumerate 2^256 random secrets however
cheap a guess is, and SHA-256 is preimage resistant, so a copy of Redis reveals no token; a slow hash
would only cost every session start.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import secrets
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import redis

from cloud_server.kr_queue import unavailable_on_redis_error
from common.config import ServeConfig, field_default
from common.errors import AuthError, ConfigError
from common.net import is_loopback
from common.wire.protocol import AUTH_METADATA

PREFIX = "dlora_"
INDEX = "dlora:tokens"  # name -> sha256 hex of the token
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def token_key(digest: str) -> str:
    return f"dlora:token:{digest}"


def _text(value: bytes | str) -> str:
    """A Redis reply as text (a client may or may not decode replies)."""
    return value.decode() if isinstance(value, bytes) else value


def digest_of(secret: str) -> str:
    """SHA-256 hex of a token: all Redis ever holds of it (why not a slow hash: the module docstring)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenStore:
    """The device tokens in Redis. A Redis failure is an UnavailableError (UNAVAILABLE: the device retries)."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    @unavailable_on_redis_error
    def add(self, name: str) -> str:
        """Make a token named `name`; returns the secret, which is nowhere else from now on.

        Raises:
            ConfigError: a bad name, or a token of that name exists.
        """
        if not _NAME.fullmatch(name):
            raise ConfigError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
                              "starting with a letter or digit")
        secret = PREFIX + secrets.token_urlsafe(32)
        digest = digest_of(secret)
        with self.r.pipeline(transaction=True) as p:
            p.watch(INDEX)  # two `token add NAME` at once: one wins, the other sees the name taken
            if p.hexists(INDEX, name):
                raise ConfigError(f"a token named {name!r} exists; `dlora-cloud token revoke {name}` first, "
                                  "or pick another name")
            p.multi()
            p.hset(INDEX, name, digest)
            p.hset(token_key(digest), mapping={"name": name, "created": f"{time.time():.0f}"})
            p.execute()
        return secret

    @unavailable_on_redis_error
    def names(self) -> list[tuple[str, float]]:
        """(name, created) of every token, by name; never a secret (Redis holds none)."""
        out = []
        for name, digest in sorted(self.r.hgetall(INDEX).items()):
            created = self.r.hget(token_key(_text(digest)), "created")
            out.append((_text(name), float(created or 0)))
        return out

    @unavailable_on_redis_error
    def revoke(self, name: str) -> None:
        """Delete the token named `name`; its open streams end at their next step.

        Raises:
            ConfigError: no token has that name.
        """
        digest = self.r.hget(INDEX, name)
        if digest is None:
            raise ConfigError(f"no token named {name!r}; `dlora-cloud token list` shows the names")
        with self.r.pipeline(transaction=True) as p:
            p.delete(token_key(_text(digest)))
            p.hdel(INDEX, name)
            p.execute()

    @unavailable_on_redis_error
    def name_of(self, secret: str) -> str | None:
        """The name of the token `secret`, None if it is no token (wrong or revoked)."""
        name = self.r.hget(token_key(digest_of(secret)), "name")
        return None if name is None else _text(name)

    @unavailable_on_redis_error
    def exists(self, digest: str) -> bool:
        return bool(self.r.exists(token_key(digest)))


@dataclass(frozen=True)
class Caller:
    """Who opened a stream: the token's name ("" under --auth none) and its digest (for the per-step check)."""

    name: str
    digest: str = field(default="", repr=False)


def auth_mode(config: ServeConfig) -> Literal["token", "none"]:
    """--auth as it applies: the flag, else none on a loopback host and token on any other.

    Raises:
        ConfigError: --auth none off loopback without --insecure.
    """
    loopback = is_loopback(config.host)
    mode = config.auth or ("none" if loopback else "token")
    if mode == "none" and not loopback and not config.insecure:
        raise ConfigError(f"--auth none on --host {config.host} lets anyone who reaches the port use this cloud; "
                          "use --auth token (the default off loopback) or pass --insecure")
    return mode


class DeviceAuth:
    """What `serve --auth` asks of each session stream: admit its token at the start, re-check it per step."""

    def __init__(self, mode: Literal["token", "none"], store: TokenStore) -> None:
        self.mode, self.store = mode, store

    def admit(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> Caller:
        """The caller a stream's metadata names; under --auth none, an anonymous one.

        Raises:
            AuthError: no token, or one this cloud does not know (wrong or revoked).
            UnavailableError: Redis failed (the device retries).
        """
        if self.mode == "none":
            return Caller("")
        values = [v for k, v in metadata or () if k == AUTH_METADATA]
        value = values[0] if values else ""
        secret = (value.decode(errors="replace") if isinstance(value, bytes) else value).removeprefix("Bearer ").strip()
        if not secret:
            raise AuthError("this cloud needs a device token: pass --token-file FILE or set $DLORA_TOKEN "
                            "(the cloud's operator makes one with `dlora-cloud token add NAME`)")
        name = self.store.name_of(secret)
        if name is None:
            raise AuthError("this cloud does not know the device token (wrong or revoked); "
                            "ask its operator for a new one (`dlora-cloud token add NAME`)")
        return Caller(name, digest_of(secret))

    def check(self, caller: Caller) -> None:
        """Before each step: the caller's token still exists.

        Raises:
            AuthError: it was revoked.
            UnavailableError: Redis failed (the device retries).
        """
        if self.mode == "token" and not self.store.exists(caller.digest):
            raise AuthError(f"device token {caller.name!r} was revoked; ask the cloud's operator for a new one")


# -- `dlora-cloud token`


def add_token_command(sub: argparse._SubParsersAction) -> None:
    """`dlora-cloud token add NAME | list | revoke NAME`, each with --state-dir, --redis-url and --redis-url-file
    (the cli resolves the last two and $DLORA_REDIS_URL into args.redis_url)."""
    t = sub.add_parser("token", help="device tokens for `serve --auth token`: add NAME | list | revoke NAME")
    actions = t.add_subparsers(dest="token_command", required=True)
    for action, what in (("add", "make a token and print it, once"),
                         ("list", "names and creation times, never secrets"),
                         ("revoke", "delete a token; its open sessions stop at their next step")):
        p = actions.add_parser(action, help=what)
        if action != "list":
            p.add_argument("name", help="the device's name, e.g. jetson-1")
        p.add_argument("--state-dir", type=Path, default=None,
                       help="the --state-dir of the running `dlora-cloud serve` whose embedded Redis holds the tokens "
                            f"(default {field_default(ServeConfig, 'state_dir')})")
        p.add_argument("--redis-url", default=None,
                       help="the --redis-url of `dlora-cloud serve`, when it uses its own Redis (no password: "
                            "a URL with one goes in --redis-url-file or $DLORA_REDIS_URL)")
        p.add_argument("--redis-url-file", type=Path, default=None, metavar="FILE",
                       help="read that Redis URL from FILE (or set $DLORA_REDIS_URL)")


def run_token(args: argparse.Namespace) -> int:
    """Run a `dlora-cloud token` command.

    Raises:
        ConfigError: neither --redis-url nor the state dir's Redis answers, or the command cannot be done.
    """
    from cloud_server.redis_server import admin_client

    state_dir = args.state_dir or field_default(ServeConfig, "state_dir")
    store = TokenStore(admin_client(args.redis_url, state_dir))
    if args.token_command == "add":
        secret = store.add(args.name)
        print(secret, flush=True)
        print(f"token {args.name!r} added; it is shown only this once: put it in a file on the device (chmod 600) "
              "and pass --token-file FILE, or set $DLORA_TOKEN", file=sys.stderr)
    elif args.token_command == "list":
        rows = store.names()
        if not rows:
            print("no tokens; add one with `dlora-cloud token add NAME`", file=sys.stderr)
        for name, created in rows:
            print(f"{name}\tcreated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(created))}")
    else:
        store.revoke(args.name)
        print(f"token {args.name!r} revoked; its open sessions stop at their next step", file=sys.stderr)
    return 0
