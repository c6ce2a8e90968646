"""The device CLI's side of the daemon: submit, status, logs, stop, resume, list."""

from __future__ import annotations

import argparse
import json
import sys

import grpc

from common.config import TrainConfig
from common.errors import RemoteError
from common.pb.dlora.v1 import edge_control_pb2 as pb
from common.pb.dlora.v1 import edge_control_pb2_grpc as pb_grpc
from edge_client.app.daemon import default_address

TIMEOUT_S = 10.0
COMMANDS = ("status", "logs", "stop", "resume", "list")  # the `dlora` commands run here


def add_control_commands(sub: argparse._SubParsersAction) -> None:
    """The `dlora` commands that talk to the dlora-edge daemon, and their flags."""
    st = sub.add_parser("status", help="status of daemon sessions (one, or all)")
    st.add_argument("session_id", nargs="?", default="", help="a session id (default: all)")
    st.add_argument("--json", action="store_true", help="print JSON")
    lg = sub.add_parser("logs", help="a daemon session's log")
    lg.add_argument("session_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing new lines until the session ends")
    for name, text in (("stop", "stop a daemon session at the next step (resumable)"),
                       ("resume", "resume a stopped or failed daemon session from its last checkpoint")):
        sub.add_parser(name, help=text).add_argument("session_id")
    sub.add_parser("list", help="every daemon session, one line each")


def _stub(address: str | None) -> tuple[pb_grpc.EdgeControlStub, str, grpc.Channel]:
    address = address or default_address()
    channel = grpc.insecure_channel(address)
    try:
        grpc.channel_ready_future(channel).result(timeout=3)
    except grpc.FutureTimeoutError:
        channel.close()
        raise RemoteError("UNAVAILABLE", f"no dlora-edge daemon at {address}; start one with `dlora-edge daemon` "
                                         "(or point --daemon / $DLORA_DAEMON at it)") from None
    return pb_grpc.EdgeControlStub(channel), address, channel


def _call(fn, request):  # type: ignore[no-untyped-def]
    try:
        return fn(request, timeout=TIMEOUT_S)
    except grpc.RpcError as e:
        raise RemoteError(e.code().name, f"dlora-edge daemon: {e.details()}") from None


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}MB"


def _eta(seconds: float) -> str:
    if not seconds:
        return "-"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def describe(s: pb.SessionStatus) -> str:
    """One line a person reads at a glance."""
    line = f"{s.session_id}  {s.state:<8} {s.kind:<11} epoch {s.epoch}/{s.epochs}  step {s.step}/{s.total_steps}"
    if not s.step and s.state == "running":
        line += "  (loading the model and running the first step)"
    if s.step:
        line += f"  loss {s.loss:.4f}  active {s.active}/{s.layers}"
        if s.kind == "train":
            line += f"  up {_mb(s.bytes_to_cloud)} down {_mb(s.bytes_from_cloud)}"
        line += f"  {s.steps_per_s:.2f} step/s  eta {_eta(s.eta_s)}"
    if s.error:
        line += f"\n    error: {s.error}"
    return line


def submit(address: str | None, cfg: TrainConfig, kind: str) -> int:
    cfg = cfg.model_copy(update={"model": cfg.model.resolve(), "data": cfg.data.resolve(),
                                 "output": cfg.output.resolve(), "progress": False,
                                 **{f: getattr(cfg, f).resolve() for f in ("tls_ca", "tls_cert", "tls_key", "token_file")
                                    if getattr(cfg, f) is not None}})  # the daemon works in another folder
    stub, where, channel = _stub(address)
    with channel:
        status = _call(stub.Submit, pb.SubmitRequest(config_json=cfg.model_dump_json(), kind=kind))
    print(status.session_id)
    print(f"submitted to the daemon at {where}; watch it with `dlora status {status.session_id}` "
          f"or `dlora logs {status.session_id} --follow`", file=sys.stderr)
    return 0


def run_control(args: argparse.Namespace) -> int:
    stub, _, channel = _stub(args.daemon)
    with channel:
        if args.command in ("status", "list"):
            reply = _call(stub.Status, pb.SessionRef(session_id=getattr(args, "session_id", "")))
            if getattr(args, "json", False):
                fields = [f.name for f in pb.SessionStatus.DESCRIPTOR.fields]
                print(json.dumps([{k: getattr(s, k) for k in fields} for s in reply.sessions], indent=1))
            elif not reply.sessions:
                print("no sessions; start one with `dlora train ... --detach`")
            for s in reply.sessions if not getattr(args, "json", False) else []:
                print(describe(s))
        elif args.command == "logs":
            try:
                for line in stub.Logs(pb.LogsRequest(session_id=args.session_id, follow=args.follow),
                                      timeout=None if args.follow else TIMEOUT_S):
                    print(line.line, flush=True)
            except grpc.RpcError as e:
                raise RemoteError(e.code().name, f"dlora-edge daemon: {e.details()}") from None
        elif args.command == "stop":
            print(describe(_call(stub.Stop, pb.SessionRef(session_id=args.session_id))))
        elif args.command == "resume":
            print(describe(_call(stub.Resume, pb.SessionRef(session_id=args.session_id))))
    return 0
