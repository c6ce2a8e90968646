"""`dlora-edge daemon`: training sessions that outlive the terminal, with a local control API.

Each session lives in STATE_DIR/sessions/ID (request.json, status.json, log.txt, checkpoints/) and
runs in its own process (edge_client.app.session_runner). A daemon that starts (or restarts after a
crash) resumes every session that was queued or running from its last checkpoint. The control API is
the gRPC service dlora.v1.EdgeControl on a unix socket (default) or 127.0.0.1:PORT.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc

from common.pb.dlora.v1 import edge_control_pb2 as pb
from common.pb.dlora.v1 import edge_control_pb2_grpc as pb_grpc
from common.tuning import tune_process
from edge_client.app.session_runner import read_status, write_status

log = logging.getLogger("dlora.daemon")
_STATUS_FIELDS = {f.name for f in pb.SessionStatus.DESCRIPTOR.fields}
ACTIVE_STATES = ("queued", "running", "stopping")


def default_state_dir() -> Path:
    return Path(os.environ.get("DLORA_EDGE_STATE", Path.home() / ".cache" / "dlora" / "edge"))


def default_address(state_dir: Path | None = None) -> str:
    return os.environ.get("DLORA_DAEMON") or f"unix:{(state_dir or default_state_dir()) / 'daemon.sock'}"


def to_message(status: dict) -> pb.SessionStatus:
    return pb.SessionStatus(**{k: v for k, v in status.items() if k in _STATUS_FIELDS and v is not None})


def _kill_orphan(pid: int | None, session_dir: Path) -> None:
    """A runner of a previous daemon that is somehow still alive must not train beside the new one."""
    if not pid:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if b"edge_client.app.session_runner" in cmdline and str(session_dir).encode() in cmdline:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


class Sessions:
    """The state dir's sessions and their runner processes."""

    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "sessions"
        self.root.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def dir(self, session_id: str) -> Path:
        path = self.root / session_id
        if not session_id or "/" in session_id or not path.is_dir():
            raise KeyError(session_id)
        return path

    def submit(self, config_json: str, kind: str) -> dict:
        session_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
        path = self.root / session_id
        path.mkdir()
        (path / "request.json").write_text(json.dumps({"kind": kind, "config": json.loads(config_json)}, indent=1))
        config = json.loads(config_json)
        write_status(path, {"session_id": session_id, "state": "queued", "kind": kind, "epochs": config["epochs"],
                            "output": config["output"], "created": time.time()})
        self.start(session_id)
        return read_status(path)

    def start(self, session_id: str) -> None:
        path = self.dir(session_id)
        status = read_status(path)
        status.update(state="queued", error="")
        write_status(path, status)
        with self.lock:
            self.procs[session_id] = subprocess.Popen(
                [sys.executable, "-m", "edge_client.app.session_runner", str(path)],
                stdout=subprocess.DEVNULL, stderr=open(path / "runner.err", "ab"), start_new_session=False,
            )
        log.info("session %s started (pid %d)", session_id, self.procs[session_id].pid)

    def stop(self, session_id: str) -> dict:
        path = self.dir(session_id)
        with self.lock:
            proc = self.procs.get(session_id)
        status = read_status(path)
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            status["state"] = "stopping"
            write_status(path, status)
        return status

    def reap(self) -> None:
        """Notice runners that died without saying so (killed): their sessions become failed."""
        with self.lock:
            for sid, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    del self.procs[sid]
                    path = self.root / sid
                    status = read_status(path)
                    if status.get("state") in ACTIVE_STATES:
                        status.update(state="failed", error=f"the session process exited with code {proc.returncode}; "
                                      "see `dlora logs` and `dlora resume` it")
                        write_status(path, status)

    def all(self) -> list[dict]:
        return [read_status(p) for p in sorted(self.root.iterdir(), reverse=True) if p.is_dir()]

    def resume_interrupted(self) -> list[str]:
        """After a (re)start: sessions that were queued or running continue from their last checkpoint."""
        resumed = []
        for status in self.all():
            if status.get("state") in ACTIVE_STATES:
                _kill_orphan(status.get("pid"), self.root / status["session_id"])
                self.start(status["session_id"])
                resumed.append(status["session_id"])
        return resumed


class EdgeControlServicer(pb_grpc.EdgeControlServicer):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def _lookup(self, session_id: str, context: grpc.ServicerContext) -> Path:
        try:
            return self.sessions.dir(session_id)
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}; `dlora list` shows them")
            raise  # unreachable: abort raises

    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SessionStatus:
        if request.kind not in ("train", "local-train"):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind must be train or local-train, not {request.kind!r}")
        return to_message(self.sessions.submit(request.config_json, request.kind))

    def Status(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.StatusReply:
        self.sessions.reap()
        if request.session_id:
            return pb.StatusReply(sessions=[to_message(read_status(self._lookup(request.session_id, context)))])
        return pb.StatusReply(sessions=[to_message(s) for s in self.sessions.all()])

    def Stop(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.SessionStatus:
        self._lookup(request.session_id, context)
        return to_message(self.sessions.stop(request.session_id))

    def Resume(self, request: pb.SessionRef, context: grpc.ServicerContext) -> pb.SessionStatus:
        path = self._lookup(request.session_id, context)
        self.sessions.reap()
        state = read_status(path).get("state")
        if state in ACTIVE_STATES:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session_id} is already {state}")
        if state == "done":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, f"session {request.session_id} is done; nothing to resume")
        self.sessions.start(request.session_id)
        return to_message(read_status(path))

    def Logs(self, request: pb.LogsRequest, context: grpc.ServicerContext) -> Iterator[pb.LogLine]:
        path = self._lookup(request.session_id, context) / "log.txt"
        deadline = time.monotonic() + 30
        while not path.exists() and request.follow and context.is_active() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not path.exists():
            return
        with path.open() as f:
            while context.is_active():
                line = f.readline()
                if line:
                    yield pb.LogLine(line=line.rstrip("\n"))
                    continue
                self.sessions.reap()
                if not request.follow or read_status(path.parent).get("state") not in ACTIVE_STATES:
                    return
                time.sleep(0.2)


def serve(state_dir: Path, listen: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state_dir.mkdir(parents=True, exist_ok=True)
    if listen.startswith("unix:"):
        Path(listen[5:]).unlink(missing_ok=True)
    sessions = Sessions(state_dir)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    pb_grpc.add_EdgeControlServicer_to_server(EdgeControlServicer(sessions), server)
    if server.add_insecure_port(listen) == 0 and not listen.startswith("unix:"):
        print(f"dlora-edge: error: cannot listen on {listen}; pick another --listen", file=sys.stderr)
        return 2
    server.start()
    resumed = sessions.resume_interrupted()
    print(f"dlora-edge daemon listening on {listen} (state in {state_dir})", flush=True)
    if resumed:
        print(f"resumed {len(resumed)} interrupted session(s): {', '.join(resumed)}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(2.0):
        sessions.reap()
    server.stop(grace=2)
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dlora-edge", description="The dlora device daemon.")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("daemon", help="run training sessions in the background")
    d.add_argument("--state-dir", type=Path, default=None, help="default $DLORA_EDGE_STATE or ~/.cache/dlora/edge")
    d.add_argument("--listen", default=None,
                   help="unix:PATH or 127.0.0.1:PORT (default unix:STATE_DIR/daemon.sock)")
    return p


def main(argv: list[str] | None = None) -> int:
    tune_process()  # this process and, through GOMP_SPINCOUNT, its sessions: see common/tuning.py
    args = parser().parse_args(argv)
    state_dir = args.state_dir or default_state_dir()
    return serve(state_dir, args.listen or default_address(state_dir))


if __name__ == "__main__":
    sys.exit(main())
