"""The edge daemon end to end: submit, status, logs, stop, resume, and a SIGKILLed daemon that resumes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from common.config import TrainConfig
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


def start_daemon(state: Path) -> tuple[subprocess.Popen, str]:
    address = f"unix:{state / 'd.sock'}"
    proc = subprocess.Popen([sys.executable, "-m", "edge_client.app.daemon", "daemon", "--state-dir", str(state),
                             "--listen", address], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=ENV)
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
    daemon, address = start_daemon(tmp_path / "state")
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
    daemon, address = start_daemon(state)
    try:
        sid = submit(address, capsys, model_dir, data_file, tmp_path / "run", epochs=epochs)
        s = wait_state(address, capsys, sid, lambda s: s["epoch"] >= 4)
        daemon.send_signal(signal.SIGKILL)
        daemon.wait()
        assert s["state"] == "running", s
        checkpoints = sorted(p.name for p in (state / "sessions" / sid / "checkpoints").glob("epoch-*"))
        assert checkpoints, "no checkpoint before the kill"
        daemon, address = start_daemon(state)
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
