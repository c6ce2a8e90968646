"""`dlora-edge daemon`: training sessions that outlive the terminal, with a local control API.

Each session lives in STATE_DIR/sessions/ID (request.json, status.json, log.txt, checkpoints/) and
runs in its own process (edge_client.app.session_runner). A daemon that starts (or restarts after a
crash) resumes every session that was queued or running from its last checkpoint. The control API is
the gRPC service dlora.v1.EdgeControl on a unix socket (default) or a loopback TCP port.

Who may use it: the socket is created mode 0600 (0660 and chgrp'd with --socket-group), its mode set
race-free (bound under umask 0177, then chmod), and the state dir is 0700. A TCP port on loopback is
open to every local user: for a single-user machine only. What they may ask for: admission.py.
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
from collections.abc import Iterator, Sequence
from concurrent import futures
from pathlib import Path

import grpc

from common.errors import ConfigError
from common.pb.dlora.v1 import edge_control_pb2 as pb
from common.pb.dlora.v1 import edge_control_pb2_grpc as pb_grpc
from common.tuning import tune_process
from edge_client.app import admission
from edge_client.app.admission import OutsideRootsError, admit, check_session_id, new_session_id, request_json
from edge_client.app.session_runner import read_status, write_status

log = logging.getLogger("dlora.daemon")
_STATUS_FIELDS = {f.name for f in pb.SessionStatus.DESCRIPTOR.fields}
ACTIVE_STATES = ("queued", "running", "stopping")
MAX_REQUEST_BYTES = 1 << 20  # a control message (a session config is a few kB)


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

    def __init__(self, state_dir: Path, roots: Sequence[Path]) -> None:
        self.root = state_dir / "sessions"
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.roots = tuple(roots)  # what session configs may name (admission.py)
        self.procs: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    def dir(self, session_id: str) -> Path:
        """The folder of an existing session.

        Raises:
            ConfigError: not an id of the daemon's format (".", "..", a path...).
            KeyError: no such session.
        """
        path = self.root / check_session_id(session_id)
        if not path.is_dir():
            raise KeyError(session_id)
        return path

    def submit(self, config_json: str, kind: str) -> dict:
        """Admit a session config (nothing is written if it is refused), record it and start its process.

        Raises:
            ConfigError: the config is refused (OutsideRootsError for a path outside the allowed roots).
        """
        cfg = admit(config_json, kind, self.roots)
        session_id = new_session_id()
        path = self.root / session_id
        path.mkdir(mode=0o700)
        (path / "request.json").write_text(request_json(cfg, kind))
        status = {"session_id": session_id, "kind": kind, "epochs": cfg.epochs, "output": str(cfg.output),
                  "created": time.time()}
        self._launch(session_id, path, status)  # admitted just now: not again
        return read_status(path)

    def start(self, session_id: str) -> None:
        """(Re)start a session's process, after admitting its request again: the roots may have changed.

        Raises:
            ConfigError: the stored request is refused now; the session is marked failed, saying why.
        """
        path = self.dir(session_id)
        status = read_status(path)
        try:
            request = json.loads((path / "request.json").read_text())
            admit(json.dumps(request["config"]), request["kind"], self.roots)
        except (ConfigError, OSError, ValueError, KeyError, TypeError) as e:
            error = e if isinstance(e, ConfigError) else ConfigError(f"session {session_id}: request.json is unreadable")
            status.update(state="failed", error=str(error))
            write_status(path, status)
            raise error from None
        self._launch(session_id, path, status)

    def _launch(self, session_id: str, path: Path, status: dict) -> None:
        """Mark an admitted session queued and start its runner process."""
        status.update(state="queued", error="")
        write_status(path, status)
        with open(path / "runner.err", "ab") as err, self.lock:  # the child keeps its copy; this one is closed
            self.procs[session_id] = subprocess.Popen(
                [sys.executable, "-m", "edge_client.app.session_runner", str(path)],
                stdout=subprocess.DEVNULL, stderr=err, start_new_session=False,
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
                try:
                    self.start(status["session_id"])
                except (ConfigError, KeyError) as e:
                    log.error("session %s not resumed: %s", status["session_id"], e)
                    continue
                resumed.append(status["session_id"])
        return resumed


class EdgeControlServicer(pb_grpc.EdgeControlServicer):
    def __init__(self, sessions: Sessions) -> None:
        self.sessions = sessions

    def _lookup(self, session_id: str, context: grpc.ServicerContext) -> Path:
        try:
            return self.sessions.dir(session_id)
        except ConfigError as e:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        except KeyError:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no session {session_id!r}; `dlora list` shows them")
        raise AssertionError("unreachable: abort raises")

    @staticmethod
    def _refuse(error: ConfigError, context: grpc.ServicerContext) -> None:
        code = grpc.StatusCode.PERMISSION_DENIED if isinstance(error, OutsideRootsError) else grpc.StatusCode.INVALID_ARGUMENT
        log.warning("refused: %s", error)
        context.abort(code, str(error))

    def Submit(self, request: pb.SubmitRequest, context: grpc.ServicerContext) -> pb.SessionStatus:
        try:
            return to_message(self.sessions.submit(request.config_json, request.kind))
        except ConfigError as e:
            self._refuse(e, context)
        raise AssertionError("unreachable: abort raises")

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
        try:
            self.sessions.start(request.session_id)
        except ConfigError as e:
            self._refuse(e, context)
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


def serve(state_dir: Path, listen: str, roots: Sequence[Path], socket_group: str | None = None) -> int:
    """Run the daemon until SIGINT or SIGTERM.

    Raises:
        ConfigError: a refused --listen, --socket-group or --state-dir (before anything is served).
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    admission.check_listen(listen)
    admission.state_dir(state_dir)
    sessions = Sessions(state_dir, roots)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16),
                         options=[("grpc.max_receive_message_length", MAX_REQUEST_BYTES)])
    pb_grpc.add_EdgeControlServicer_to_server(EdgeControlServicer(sessions), server)
    admission.bind(server, listen, socket_group)
    server.start()
    resumed = sessions.resume_interrupted()
    print(f"dlora-edge daemon listening on {listen} (state in {state_dir}; sessions may use files under "
          f"{', '.join(map(str, roots))})", flush=True)
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
                   help="unix:PATH or a loopback HOST:PORT such as 127.0.0.1:PORT (default unix:STATE_DIR/daemon.sock)")
    d.add_argument("--socket-group", default=None, metavar="GROUP",
                   help="make the unix socket mode 0660 and owned by GROUP, so its members can use the daemon "
                        "(default: mode 0600, this user only)")
    d.add_argument("--allow-root", type=Path, action="append", default=None, metavar="DIR",
                   help="sessions may read data and write outputs only under DIR (repeatable; "
                        "default: the home of the user running the daemon)")
    return p


def main(argv: list[str] | None = None) -> int:
    tune_process()  # this process and, through GOMP_SPINCOUNT, its sessions: see common/tuning.py
    args = parser().parse_args(argv)
    state_dir = args.state_dir or default_state_dir()
    try:
        return serve(state_dir, args.listen or default_address(state_dir), admission.allowed_roots(args.allow_root),
                     args.socket_group)
    except ConfigError as e:
        print(f"dlora-edge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
