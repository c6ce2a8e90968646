"""`dlora-cloud`: serve the frozen decoder stack of a model folder, check a server's health, make TLS
certificates (`tls init`)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import grpc
from pydantic import ValidationError

from cloud_server import tls_init
from cloud_server.redis_server import redact_url, url_has_password
from cloud_server.tokens import add_token_command, auth_mode, run_token
from common.config import DEVICES, DTYPES, ServeConfig, field_default, flag_error
from common.errors import ConfigError, DloraError
from common.tls import add_client_flags, client_tls, handshake_problem, open_channel, server_credentials
from common.tuning import tune_process

log = logging.getLogger("dlora.cloud")


def _default(name: str) -> Any:
    """What a serve flag left unset (None) means: ServeConfig's default, the one owner of that fact."""
    return field_default(ServeConfig, name)


def _serve_flags(s: argparse.ArgumentParser) -> None:
    s.add_argument("--model", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    s.add_argument("--host", default=None, help=f"address to listen on (default {_default('host')})")
    s.add_argument("--port", type=int, default=None, help=f"port; 0 picks a free one (default {_default('port')})")
    s.add_argument("--device", default=None, choices=DEVICES, help=f"where the stack runs (default {_default('device')})")
    s.add_argument("--dtype", default=None, choices=DTYPES,
                   help=f"compute dtype of the frozen stack (default {_default('dtype')})")
    s.add_argument("--device-map", default=None, choices=("auto", "balanced", "sequential"),
                   help="place the decoder layers over every visible GPU, then the CPU (accelerate's device_map), so a "
                        "model larger than one GPU still serves; placement, not parallel speed: a step runs the layers "
                        "one device after another (default: all on --device)")
    s.add_argument("--max-sessions", type=int, default=None,
                   help=f"live sessions on all workers sharing this Redis (default {_default('max_sessions')})")
    s.add_argument("--max-sessions-per-token", type=int, default=None,
                   help=f"live sessions one device token may hold, on all workers (default {_default('max_sessions_per_token')})")
    s.add_argument("--max-micro-batches", type=int, default=None,
                   help=f"micro-batches a session may have running at once (default {_default('max_micro_batches')})")
    s.add_argument("--max-adapter-mb", type=int, default=None,
                   help="adapter protocol: the most LoRA weights (MB, float32) one session may make this cloud hold; "
                        f"a larger rank x targets is refused at the Hello (default {_default('max_adapter_mb')})")
    s.add_argument("--record", type=Path, default=None, metavar="DIR",
                   help="the curious operator's view: keep a copy of every tensor that crosses in the first "
                        "--record-steps steps of every session under DIR (made 0700; refused if others may read it), "
                        "the one exception to the rule that the cloud keeps nothing of a session; for attack "
                        "harnesses (docs/security.md) (default: off)")
    s.add_argument("--record-steps", type=int, default=None,
                   help=f"steps of each session --record keeps (default {_default('record_steps')})")
    s.add_argument("--max-tokens", type=int, default=None,
                   help="tokens (B x T) a session may have in flight: a step's micro-batches together "
                        f"(default {_default('max_tokens')})")
    s.add_argument("--hello-timeout", type=float, default=None,
                   help=f"seconds a new stream has to say Hello (default {_default('hello_timeout_s'):g})")
    s.add_argument("--idle-timeout", type=float, default=None,
                   help="seconds a session stream may stay silent between steps; also closes a connection with no "
                        f"call for that long (default {_default('idle_timeout_s'):g})")
    s.add_argument("--keepalive", type=float, default=None,
                   help="seconds between HTTP/2 pings to each device; one that does not answer within as long is "
                        f"dropped (default {_default('keepalive_s'):g})")
    s.add_argument("--drain-timeout", type=float, default=None,
                   help="on SIGTERM or SIGINT: seconds to let live sessions finish their step in flight and move to "
                        f"another worker before stopping; a second signal stops at once (default {_default('drain_timeout_s'):g})")
    s.add_argument("--step-timeout", type=float, default=None,
                   help=f"seconds to wait for one edge reply before closing its session (default {_default('step_timeout_s'):g})")
    s.add_argument("--max-message-mb", type=int, default=None,
                   help=f"gRPC message size limit in MB (default {_default('max_message_mb')})")
    s.add_argument("--redis-url", default=None,
                   help="Redis for the Kill-and-Revive queue, session records and device tokens, e.g. "
                        "redis://HOST:6379/0, without a password (`ps` shows flags: a URL with one goes in "
                        "--redis-url-file or $DLORA_REDIS_URL) (default: an embedded Redis server in --state-dir)")
    s.add_argument("--redis-url-file", type=Path, default=None, metavar="FILE",
                   help="read the Redis URL from FILE (for one with a password; or set $DLORA_REDIS_URL)")
    s.add_argument("--state-dir", type=Path, default=None,
                   help="where the embedded Redis server keeps its data and socket; mode 0700, one cloud at a time "
                        f"(default {_home(_default('state_dir'))})")
    s.add_argument("--session-ttl", type=float, default=None,
                   help=f"seconds an idle session's keys live in Redis (default {_default('session_ttl_s'):g})")
    s.add_argument("--claim-idle", type=float, default=None,
                   help=f"seconds before a report pending on a dead scheduler is taken over (default {_default('claim_idle_s'):g})")
    s.add_argument("--reports-maxlen", type=int, default=None,
                   help=f"the Kill-and-Revive reports stream is trimmed to about this many entries (default {_default('reports_maxlen')})")
    s.add_argument("--report-max-tries", type=int, default=None,
                   help="a report the scheduler fails on this often goes to the dead-letter stream dlora:kr:dead "
                        f"(default {_default('report_max_tries')})")
    s.add_argument("--auth", default=None, choices=("token", "none"),
                   help="device tokens (`dlora-cloud token add NAME`): required (token) or not (none) "
                        "(default none on a loopback --host, token on any other)")
    s.add_argument("--insecure", action="store_true", default=None,
                   help="allow plaintext or --auth none on a non-loopback --host (anyone who reaches the port can train)")
    s.add_argument("--tls-cert", type=Path, default=None, metavar="PEM",
                   help="serve TLS only, with this certificate (chain) (server.pem of `dlora-cloud tls init`) "
                        "(default: plaintext, which a non-loopback --host refuses without --insecure)")
    s.add_argument("--tls-key", type=Path, default=None, metavar="PEM", help="the private key of --tls-cert")
    s.add_argument("--tls-client-ca", type=Path, default=None, metavar="PEM",
                   help="mTLS: every client (Health included) must present a certificate this CA signed")
    s.add_argument("--log-level", default=os.environ.get("DLORA_LOG_LEVEL", "INFO"), help="logging level (default INFO)")


def _home(path: Path) -> str:
    """~/... for a path under the home folder, as --help shows it."""
    return f"~/{path.relative_to(Path.home())}" if path.is_relative_to(Path.home()) else str(path)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlora-cloud", description="The cloud side of dlora split LoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    _serve_flags(sub.add_parser("serve", help="host the frozen decoder blocks of a model folder over gRPC"))
    h = sub.add_parser("health", help="ask a running server whether it is serving; exit 0 if so")
    h.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server (default 127.0.0.1:50051)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    add_client_flags(h)
    tls_init.add_parser(sub)
    add_token_command(sub)
    st = sub.add_parser("status", help="the workers on this cloud's Redis, their sessions and last heartbeat")
    st.add_argument("--state-dir", type=Path, default=None,
                    help="the --state-dir of a `dlora-cloud serve` whose embedded Redis to read "
                         f"(default {_home(_default('state_dir'))})")
    st.add_argument("--redis-url", default=None, help="the --redis-url the workers share (no password in a flag)")
    st.add_argument("--redis-url-file", type=Path, default=None, metavar="FILE",
                    help="read that Redis URL from FILE (or set $DLORA_REDIS_URL)")
    st.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def serve_config(args: argparse.Namespace) -> ServeConfig:
    """The ServeConfig for the serve flags; a flag left unset takes the config's default.

    Raises:
        ConfigError: a flag value is invalid (one line naming it), a TLS file is missing or wrong, or plaintext
            on a non-loopback --host without --insecure (checked here, before a model is loaded).
    """
    fields = ServeConfig.model_fields  # --step-timeout sets step_timeout_s (flag_error maps back)
    given = {f: v for flag, v in vars(args).items() if v is not None for f in (flag, flag + "_s") if f in fields}
    try:
        config = ServeConfig(**given)
    except ValidationError as e:
        raise flag_error(e) from None
    server_credentials(config)
    return config


def redis_url(args: argparse.Namespace, environ: Mapping[str, str]) -> str | None:
    """The Redis URL of a command with --redis-url: that flag, else --redis-url-file, else $DLORA_REDIS_URL.

    A password never comes from a flag value, which `ps` shows to every user.

    Raises:
        ConfigError: --redis-url holds a password, both flags are given, or the file is unreadable or empty.
    """
    url, file = args.redis_url, getattr(args, "redis_url_file", None)
    if url and url_has_password(url):
        raise ConfigError(f"--redis-url {redact_url(url)}: a password in a flag shows in `ps`; "
                          "put it in --redis-url-file FILE or $DLORA_REDIS_URL")
    if url and file:
        raise ConfigError("--redis-url and --redis-url-file: give one")
    if file:
        try:
            url = file.read_text().strip()
        except OSError as e:
            raise ConfigError(f"--redis-url-file {file}: {e.strerror}") from None
        if not url:
            raise ConfigError(f"--redis-url-file {file}: empty; write the URL in it")
    return url or environ.get("DLORA_REDIS_URL") or None


def _serve(args: argparse.Namespace) -> int:
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack

    config = serve_config(args)
    auth_mode(config)  # refuse --auth none off loopback before loading the model (CloudServer checks again)
    stack = DecoderStack(config.model, config.device, config.dtype, config.device_map)
    server = CloudServer(stack, config)
    print(f"listening on {config.host}:{server.port}", flush=True)
    stop, now = threading.Event(), threading.Event()

    def on_signal(*_: object) -> None:  # the first: drain; a second: stop at once
        (now if stop.is_set() else stop).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    stop.wait()
    log.info("draining: no new sessions; live ones end after their step in flight (at most %gs; a second signal "
             "stops at once)", config.drain_timeout_s)
    left = server.drain(config.drain_timeout_s, abort=now)
    log.info("stopped%s", f"; {left} session stream(s) were still open" if left else "")
    return 0


def _status(args: argparse.Namespace) -> int:
    """`dlora-cloud status`: the registered workers and their sessions, from Redis.

    Raises:
        ConfigError: the Redis cannot be reached.
    """
    import dataclasses
    import json

    import redis

    from cloud_server.redis_server import admin_client
    from cloud_server.workers import list_workers, render

    client = admin_client(args.redis_url, args.state_dir or _default("state_dir"))
    try:
        workers = list_workers(client)
    except redis.RedisError as e:
        raise ConfigError(f"reading the workers from Redis failed ({type(e).__name__}); retry") from None
    print(json.dumps([dataclasses.asdict(w) for w in workers], indent=1) if args.json else render(workers), end="\n"
          if args.json else "")
    return 0


def _health(args: argparse.Namespace) -> int:
    from common.pb.dlora.v1 import dlora_pb2 as pb
    from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc

    tls = client_tls(args.tls_ca, args.tls_cert, args.tls_key)
    with open_channel(args.address, tls) as channel:
        try:
            reply = pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            unavailable = e.code() == grpc.StatusCode.UNAVAILABLE  # a TLS mismatch too: say which flag to fix
            problem = handshake_problem(e.details() or "", args.address, tls) if unavailable else None
            reason = problem or f"{args.address} is not serving ({e.code().name}); start `dlora-cloud serve`"
            print(f"dlora-cloud health: {reason}", file=sys.stderr)
            return 1
    print(f"{reply.status} {reply.model_type} {reply.model_fingerprint} sessions={reply.open_sessions}")
    return 0 if reply.status == "SERVING" else 1  # DRAINING: a readiness check takes the worker out of rotation


def main(argv: list[str] | None = None) -> int:
    tune_process()  # before anything imports torch: see common/tuning.py
    args = _parser().parse_args(argv)
    sys.setswitchinterval(float(os.environ.get("DLORA_GIL_SWITCH_S", "0.005")))
    level = getattr(args, "log_level", "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if hasattr(args, "redis_url"):
            args.redis_url = redis_url(args, os.environ)
        if args.command == "token":
            return run_token(args)
        if args.command == "tls":
            return tls_init.run(args)
        if args.command == "status":
            return _status(args)
        return _serve(args) if args.command == "serve" else _health(args)
    except DloraError as e:
        print(f"dlora-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
