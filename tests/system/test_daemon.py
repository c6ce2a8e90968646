"""The edge daemon end to end: submit, status, logs, stop, resume, a SIGKILLed daemon that resumes; and who
may use it and what it refuses: socket modes, loopback-only TCP, session configs outside the allowed roots,
session ids that are paths, checkpoints pruned by epoch number."""

from __future__ import annotations

import grp
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
import torch
from safetensors.torch import load_file

from common.config import TrainConfig
from common.errors import ConfigError
from common.pb.dlora.v1 import edge_control_pb2 as pb
from common.pb.dlora.v1 import edge_control_pb2_grpc as pb_grpc
from edge_client.app import admission
from edge_client.app.cli import main as dlora
from edge_client.train.engines import LocalEngine
from edge_client.train.trainer import train

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


_LINES: dict[int, queue.Queue] = {}


def read_line(proc: subprocess.Popen, timeout_s: float = 60.0) -> str:
    """The daemon's next stdout line, or "" after timeout_s (never blocks the test forever)."""
    if proc.pid not in _LINES:
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout], daemon=True).start()
        _LINES[proc.pid] = lines
    try:
        return _LINES[proc.pid].get(timeout=timeout_s)
    except queue.Empty:
        return ""


def start_daemon(state: Path, allow: Path, *flags: str, address: str = "") -> tuple[subprocess.Popen, str]:
    """A real `dlora-edge daemon` process with --allow-root `allow` (pytest's temp folder holds the tests'
    models, data and outputs: tmp_path.parent)."""
    address = address or f"unix:{state / 'd.sock'}"
    proc = subprocess.Popen([sys.executable, "-m", "edge_client.app.daemon", "daemon", "--state-dir", str(state),
                             "--listen", address, "--allow-root", str(allow), *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
    line = read_line(proc)
    assert "listening on" in line, line
    return proc, address


def ok(argv: list[str], capsys) -> str:
    """Run the dlora CLI in-process; its stdout, after checking it exited 0 (else its stderr says why)."""
    capsys.readouterr()
    code = dlora(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"dlora {' '.join(argv)} exited {code}: {err.strip()}"
    return out


def status(address: str, capsys, session_id: str = "") -> list[dict]:
    return json.loads(ok(["--daemon", address, "status", *([session_id] if session_id else []), "--json"], capsys))


def wait_state(address, capsys, sid, done: callable, timeout_s=180.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        s = status(address, capsys, sid)[0]
        if done(s):
            return s
        time.sleep(0.2)
    raise AssertionError(f"session {sid} never reached the expected state: {s}")


def submit(address, capsys, model_dir, data_file, out, epochs=4) -> str:
    return ok(["--daemon", address, "local-train", "--model", str(model_dir), "--data", str(data_file),
               "--output", str(out), "--epochs", str(epochs), "--batch-size", "4", "--lr", "3e-2", "--budget", "2",
               "--revive", "1", "--detach"], capsys).strip()


def test_daemon_sessions(tiny_dir, data_file, tmp_path, capsys):
    model_dir = tiny_dir("llama", layers=4)
    daemon, address = start_daemon(tmp_path / "state", tmp_path.parent)
    try:
        # submit, poll to completion, adapter present, logs readable
        sid = submit(address, capsys, model_dir, data_file, tmp_path / "a")
        s = wait_state(address, capsys, sid, lambda s: s["state"] in ("done", "failed"))
        assert s["state"] == "done", s
        assert s["step"] == s["total_steps"] == 16 and s["epoch"] == 4 and s["active"] == 2
        assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
        assert "done; adapter in" in ok(["--daemon", address, "logs", sid], capsys)
        # stop in the middle, then resume to the end
        sid2 = submit(address, capsys, model_dir, data_file, tmp_path / "b", epochs=40)
        wait_state(address, capsys, sid2, lambda s: s["epoch"] >= 2)
        ok(["--daemon", address, "stop", sid2], capsys)
        s = wait_state(address, capsys, sid2, lambda s: s["state"] not in ("running", "stopping"))
        assert s["state"] == "stopped", s
        ok(["--daemon", address, "resume", sid2], capsys)
        wait_state(address, capsys, sid2, lambda s: s["state"] == "running")
        ok(["--daemon", address, "stop", sid2], capsys)
        wait_state(address, capsys, sid2, lambda s: s["state"] == "stopped")
        listing = ok(["--daemon", address, "list"], capsys)
        assert sid in listing and sid2 in listing and "done" in listing and "stopped" in listing
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)


def test_sigkilled_daemon_resumes_to_the_uninterrupted_adapter(tiny_dir, data_file, tmp_path, capsys):
    """A session whose daemon is SIGKILLed resumes from its last checkpoint and ends with the very bits of
    an uninterrupted run of the same local-train.

    Why bit equality holds on any CPU: both are `train` with LocalEngine on the same config, the same
    code and the same default thread count; the resumed part starts from weights, AdamW state, schedule,
    data order and RNG restored bit for bit. torch's CPU kernels are deterministic for a given shape
    and thread count, so the two runs perform the same float operations in the same order on any
    machine. (A tolerance would not do after 600 AdamW steps: AdamW moves an element whose gradient is
    round-off by +-lr on its sign alone, so a run that differed in one bit could end far apart.)
    """
    model_dir = tiny_dir("llama", layers=4)
    epochs = 150  # long enough (~5 s) that the kill lands mid-run
    state = tmp_path / "state"
    daemon, address = start_daemon(state, tmp_path.parent)
    try:
        sid = submit(address, capsys, model_dir, data_file, tmp_path / "run", epochs=epochs)
        s = wait_state(address, capsys, sid, lambda s: s["epoch"] >= 4)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert s["state"] == "running", s
        checkpoints = sorted(p.name for p in (state / "sessions" / sid / "checkpoints").glob("epoch-*"))
        assert checkpoints, "no checkpoint before the kill"
        daemon, address = start_daemon(state, tmp_path.parent)
        status_after_kill = json.loads((state / "sessions" / sid / "status.json").read_text())
        assert status_after_kill["epoch"] < epochs, "the run ended before the kill; make it longer"
        assert "resumed 1 interrupted session" in read_line(daemon)
        s = wait_state(address, capsys, sid, lambda s: s["state"] in ("done", "failed"))
        assert s["state"] == "done", s
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    log = (state / "sessions" / sid / "log.txt").read_text()
    assert "resuming from epoch-" in log
    ref = TrainConfig(model=model_dir, data=data_file, output=tmp_path / "ref", epochs=epochs, batch_size=4, lr=3e-2,
                      budget=2, revive=1, progress=False)
    train(ref, LocalEngine(ref))
    a = load_file(str(ref.output / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "run" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for k in a:
        assert torch.equal(b[k], a[k]), k


def test_no_daemon_says_how_to_start_one(tmp_path, capsys):
    code = dlora(["--daemon", f"unix:{tmp_path / 'none.sock'}", "list"])
    err = capsys.readouterr().err
    assert code == 3 and "start one with `dlora-edge daemon`" in err


pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def test_status_byte_totals_do_not_count_redone_steps_twice(tmp_path):
    """A resumed split session redoes the steps after its checkpoint; status.json's totals held them already."""
    from edge_client.app.session_runner import _Progress, read_status

    metrics = tmp_path / "metrics.jsonl"
    row = {"epoch": 1, "loss": 1.0, "active_modules": 2, "bytes_to_cloud": 100, "bytes_from_cloud": 40}
    # before the stop: steps 1-3 ran, the checkpoint is at step 2; the resumed trainer dropped row 3 and wrote it again
    stale = {"session_id": "s", "state": "running", "bytes_to_cloud": 300, "bytes_from_cloud": 120}
    metrics.write_text("".join(json.dumps({**row, "step": k}) + "\n" for k in (1, 2, 3)))
    progress = _Progress(tmp_path, stale, metrics)
    for k in (3, 4):
        if k == 4:
            with metrics.open("a") as f:
                f.write(json.dumps({**row, "step": k}) + "\n")
        progress({"kind": "step", "total_steps": 8, **row, "step": k})
    s = read_status(tmp_path)
    assert (s["bytes_to_cloud"], s["bytes_from_cloud"]) == (400, 160)


# -- who may use the daemon, and what it refuses (docs/security.md) --------------------------------------------


def stop_daemon(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(timeout=30)


def control(address: str) -> pb_grpc.EdgeControlStub:
    return pb_grpc.EdgeControlStub(grpc.insecure_channel(address))


def refusal(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    """The status code and message of a control call that must fail."""
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


def test_socket_is_0600_and_the_state_dir_0700(tmp_path):
    """The control socket is created mode 0600 (bound under umask 0177, then chmod) and the state dir, which
    existed as 0755, is narrowed to 0700: no other local user can reach the daemon or read its sessions."""
    state = tmp_path / "state"
    state.mkdir()
    os.chmod(state, 0o755)
    daemon, _ = start_daemon(state, tmp_path)
    try:
        sock = os.stat(state / "d.sock")
        assert stat.S_ISSOCK(sock.st_mode) and stat.S_IMODE(sock.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(state / "sessions").st_mode) == 0o700
    finally:
        stop_daemon(daemon)


def test_socket_group_makes_it_0660_for_that_group(tmp_path, capsys):
    """--socket-group GROUP (here this user's primary group) makes the socket 0660 and owned by GROUP, and the
    daemon still answers through it."""
    (tmp_path / "run").mkdir()
    group = grp.getgrgid(os.getgid()).gr_name
    daemon, address = start_daemon(tmp_path / "state", tmp_path, "--socket-group", group,
                                   address=f"unix:{tmp_path / 'run' / 'd.sock'}")
    try:
        sock = os.stat(tmp_path / "run" / "d.sock")
        assert stat.S_IMODE(sock.st_mode) == 0o660 and sock.st_gid == os.getgid()
        assert "no sessions" in ok(["--daemon", address, "list"], capsys)
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("listen", ["0.0.0.0:50999", "[::]:50999"])
def test_tcp_off_loopback_is_refused(tmp_path, listen):
    """--listen on an address other than loopback (here every interface) is refused with one line, exit 2,
    before the daemon creates anything."""
    state = tmp_path / "state"
    run = subprocess.run([sys.executable, "-m", "edge_client.app.daemon", "daemon", "--state-dir", str(state),
                          "--listen", listen], capture_output=True, text=True, env=ENV, timeout=60)
    assert run.returncode == 2, run.stderr
    assert run.stderr.count("\n") == 1 and "only on a loopback address" in run.stderr, run.stderr
    assert not state.exists()


def test_tcp_on_loopback_serves(tmp_path, capsys):
    """--listen 127.0.0.1:PORT is accepted and answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    daemon, address = start_daemon(tmp_path / "state", tmp_path, address=f"127.0.0.1:{port}")
    try:
        assert "no sessions" in ok(["--daemon", address, "list"], capsys)
    finally:
        stop_daemon(daemon)


@pytest.mark.parametrize("listen,ok_", [("127.0.0.1:1", True), ("localhost:1", True), ("[::1]:1", True),
                                        ("unix:/x/d.sock", True), ("10.0.0.1:1", False), ("example.com:1", False),
                                        ("unix-abstract:d", False), ("127.0.0.1", False), ("127.0.0.1:0", False)])
def test_listen_addresses(listen, ok_):
    """Only unix:PATH and a loopback HOST:PORT pass the daemon's --listen check."""
    if ok_:
        assert admission.check_listen(listen) == listen
    else:
        with pytest.raises(ConfigError):
            admission.check_listen(listen)


def test_configs_outside_the_allowed_roots_are_refused(tiny_dir, data_file, tmp_path, capsys):
    """The daemon checks every session config on its own side (a raw client, not `dlora`): data, output and
    token file must resolve, symlinks followed, under --allow-root; the cloud must be HOST:PORT. A refusal
    names the field (and the roots) in one line, and writes nothing: no session, no output folder. A config
    under the roots is accepted by the same daemon and trains."""
    allowed, outside = tmp_path / "allowed", tmp_path / "outside"
    allowed.mkdir(), outside.mkdir()
    for folder in (allowed, outside):
        (folder / "train.jsonl").write_bytes(data_file.read_bytes())
        (folder / "token").write_text("t" * 43)
    (allowed / "link.jsonl").symlink_to(outside / "train.jsonl")
    (allowed / "dir").symlink_to(outside)
    daemon, address = start_daemon(tmp_path / "state", allowed)
    stub = control(address)
    good = json.loads(TrainConfig(model=tiny_dir("llama", layers=4), data=allowed / "train.jsonl",
                                  output=allowed / "out", epochs=1, batch_size=4).model_dump_json())
    cases = [  # (kind, changed fields, expected code, words the message names)
        ("local-train", {"data": str(outside / "train.jsonl")}, grpc.StatusCode.PERMISSION_DENIED, "--data"),
        ("local-train", {"data": str(allowed / "link.jsonl")}, grpc.StatusCode.PERMISSION_DENIED, "--data"),
        ("local-train", {"data": str(allowed / "dir" / "train.jsonl")}, grpc.StatusCode.PERMISSION_DENIED, "--data"),
        ("local-train", {"output": str(outside / "run")}, grpc.StatusCode.PERMISSION_DENIED, "--output"),
        ("local-train", {"output": str(allowed / "dir" / "run")}, grpc.StatusCode.PERMISSION_DENIED, "--output"),
        ("local-train", {"output": f"{allowed}/../outside/run"}, grpc.StatusCode.PERMISSION_DENIED, "--output"),
        ("local-train", {"token_file": str(outside / "token")}, grpc.StatusCode.PERMISSION_DENIED, "--token-file"),
        ("local-train", {"data": "train.jsonl"}, grpc.StatusCode.INVALID_ARGUMENT, "absolute"),
        ("local-train", {"data": str(allowed / "none.jsonl")}, grpc.StatusCode.INVALID_ARGUMENT, "no such file"),
        ("local-train", {"evil": 1}, grpc.StatusCode.INVALID_ARGUMENT, "--evil"),
        ("train", {"cloud": "unix:/var/run/docker.sock"}, grpc.StatusCode.INVALID_ARGUMENT, "--cloud"),
        ("train", {"cloud": "http://h:1"}, grpc.StatusCode.INVALID_ARGUMENT, "--cloud"),
        ("train", {"cloud": "h:99999"}, grpc.StatusCode.INVALID_ARGUMENT, "--cloud"),
        ("train", {"cloud": None}, grpc.StatusCode.INVALID_ARGUMENT, "--cloud"),
        ("shell", {}, grpc.StatusCode.INVALID_ARGUMENT, "kind"),
    ]
    try:
        for kind, change, code, words in cases:
            request = pb.SubmitRequest(config_json=json.dumps({**good, **change}), kind=kind)
            got, details = refusal(lambda r=request: stub.Submit(r, timeout=10))
            assert (got, "\n" in details) == (code, False) and words in details, (change, got, details)
            if code == grpc.StatusCode.PERMISSION_DENIED:
                assert str(allowed) in details and "--allow-root" in details, details
        assert not list((tmp_path / "state" / "sessions").iterdir())
        assert sorted(p.name for p in outside.iterdir()) == ["token", "train.jsonl"]
        assert not (allowed / "out").exists()
        # the CLI says it in one line, exit 3 (refused)
        capsys.readouterr()
        code = dlora(["--daemon", address, "local-train", "--model", good["model"], "--data",
                      str(outside / "train.jsonl"), "--output", str(allowed / "out"), "--detach"])
        err = capsys.readouterr().err
        assert code == 3 and err.count("\n") == 1 and "outside the daemon's allowed roots" in err, err
        sid = stub.Submit(pb.SubmitRequest(config_json=json.dumps(good), kind="local-train"), timeout=10).session_id
        s = wait_state(address, capsys, sid, lambda s: s["state"] in ("done", "failed"))
        assert s["state"] == "done", s
    finally:
        stop_daemon(daemon)


BAD_IDS = [".", "..", "../x", "../../etc", "a/b", "/etc", "20250101-120000-abcdeg", "20250101-120000-abcdef/.."]


def test_session_ids_that_are_not_the_daemons_are_refused(tmp_path, capsys):
    """status, logs, stop and resume refuse every id not of the daemon's own format (`.`, `..`, paths) with
    INVALID_ARGUMENT before it reaches a path; an empty id too, except for status (= all sessions)."""
    daemon, address = start_daemon(tmp_path / "state", tmp_path)
    stub = control(address)
    calls = {"status": lambda sid: stub.Status(pb.SessionRef(session_id=sid), timeout=10),
             "stop": lambda sid: stub.Stop(pb.SessionRef(session_id=sid), timeout=10),
             "resume": lambda sid: stub.Resume(pb.SessionRef(session_id=sid), timeout=10),
             "logs": lambda sid: list(stub.Logs(pb.LogsRequest(session_id=sid), timeout=10))}
    try:
        for name, call in calls.items():
            for sid in BAD_IDS + ([] if name == "status" else [""]):
                code, details = refusal(lambda c=call, s=sid: c(s))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a dlora-edge session id" in details, \
                    (name, sid, code, details)
        assert refusal(lambda: stub.Stop(pb.SessionRef(session_id="20250101-120000-abcdef"), timeout=10))[0] \
            == grpc.StatusCode.NOT_FOUND
        capsys.readouterr()
        assert dlora(["--daemon", address, "stop", ".."]) == 3
        assert "not a dlora-edge session id" in capsys.readouterr().err
    finally:
        stop_daemon(daemon)


def test_sessions_are_admitted_again_when_they_start(tiny_dir, data_file, tmp_path):
    """A session recorded under roots the daemon no longer allows is not started: an interrupted one is not
    resumed when the daemon starts, a stopped one's resume is PERMISSION_DENIED; both become failed, saying why."""
    sessions = tmp_path / "state" / "sessions"
    cfg = TrainConfig(model=tiny_dir("llama", layers=4), data=data_file, output=tmp_path / "out", epochs=1)
    for sid, state in (("20250101-120000-000001", "running"), ("20250101-120000-000002", "stopped")):
        (sessions / sid).mkdir(parents=True)
        (sessions / sid / "request.json").write_text(admission.request_json(cfg, "local-train"))
        (sessions / sid / "status.json").write_text(json.dumps({"session_id": sid, "state": state}))
    (tmp_path / "allowed").mkdir()
    daemon, address = start_daemon(tmp_path / "state", tmp_path / "allowed")
    try:
        code, details = refusal(lambda: control(address).Resume(pb.SessionRef(session_id="20250101-120000-000002"),
                                                                timeout=10))
        assert code == grpc.StatusCode.PERMISSION_DENIED and "allowed roots" in details, details
        for sid in ("20250101-120000-000001", "20250101-120000-000002"):
            s = json.loads((sessions / sid / "status.json").read_text())
            assert s["state"] == "failed" and "allowed roots" in s["error"] and "pid" not in s, s
        assert not (tmp_path / "out").exists()
    finally:
        stop_daemon(daemon)


def test_checkpoints_are_pruned_by_epoch_number(tmp_path):
    """Pruning keeps the newest checkpoints by epoch NUMBER: past epoch 9999 the names' text order
    (epoch-10000 < epoch-9999) would delete the newest. Loading picks the highest number too."""
    from edge_client.train import checkpoint

    param = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([param])
    saved: list[int] = []
    for epoch in (9, 10, 9998, 9999, 10000, 10001):
        checkpoint.save(tmp_path, [("w", param)], opt, checkpoint.TrainerState(epoch, epoch, [0], [], {}))
        saved.append(epoch)
        kept = sorted(int(p.name.removeprefix("epoch-")) for p in tmp_path.glob("epoch-*"))
        assert kept == sorted(saved)[-checkpoint.KEEP:], (epoch, kept)
        assert checkpoint.load_latest(tmp_path).state.epochs_done == epoch
