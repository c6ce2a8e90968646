"""One daemon session, in its own process: `python -m edge_client.app.session_runner SESSION_DIR`.

The daemon starts one per session. It trains with end-of-epoch checkpoints under SESSION_DIR, keeps
SESSION_DIR/status.json current after every step (written atomically), logs to SESSION_DIR/log.txt,
stops at the next step on SIGTERM, and dies with the daemon (PR_SET_PDEATHSIG), which resumes it
from its last checkpoint when it starts again.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from common.config import TrainConfig
from common.errors import DloraError
from common.tuning import tune_process

log = logging.getLogger("dlora.session")


def write_status(session_dir: Path, status: dict[str, Any]) -> None:
    tmp = session_dir / "status.json.tmp"
    tmp.write_text(json.dumps(status, indent=1))
    tmp.replace(session_dir / "status.json")


def read_status(session_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((session_dir / "status.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {"session_id": session_dir.name, "state": "failed", "error": "status.json is missing or unreadable"}


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        log.warning("cannot tie this session to the daemon's life (no prctl); it may outlive a killed daemon")


class _Progress:
    """Turns the trainer's step and epoch events into status.json."""

    def __init__(self, session_dir: Path, status: dict[str, Any], metrics: Path) -> None:
        self.dir, self.status, self.metrics = session_dir, status, metrics
        self.recent: deque[float] = deque(maxlen=20)  # step end times
        self.counted = False  # byte totals taken from metrics.jsonl yet

    def __call__(self, event: dict[str, Any]) -> None:
        s = self.status
        if event["kind"] == "step":
            self.recent.append(time.monotonic())
            rate = (len(self.recent) - 1) / (self.recent[-1] - self.recent[0]) if len(self.recent) > 1 else 0.0
            s.update(epoch=event["epoch"], step=event["step"], total_steps=event["total_steps"], loss=event["loss"],
                     active=event["active_modules"], steps_per_s=rate,
                     eta_s=(event["total_steps"] - event["step"]) / rate if rate else 0.0)
            if self.counted:
                s["bytes_to_cloud"] += event["bytes_to_cloud"]
                s["bytes_from_cloud"] += event["bytes_from_cloud"]
            else:
                # First step of this process: a resumed run redoes the steps after its checkpoint, which
                # the totals in status.json already hold. metrics.jsonl has one row per step kept (the
                # trainer has just dropped the redone ones and written this step's).
                rows = [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
                s["bytes_to_cloud"] = sum(r["bytes_to_cloud"] for r in rows)
                s["bytes_from_cloud"] = sum(r["bytes_from_cloud"] for r in rows)
                self.counted = True
        else:
            s["active"] = len(event["next_active"])
        write_status(self.dir, s)


def run(session_dir: Path) -> int:
    from edge_client.remote.link import device_token
    from edge_client.remote.split_engine import SplitEngine
    from edge_client.train.engines import LocalEngine
    from edge_client.train.trainer import Stopped, train

    request = json.loads((session_dir / "request.json").read_text())
    cfg = TrainConfig.model_validate_json(json.dumps(request["config"]))
    status = read_status(session_dir)
    status.update(state="running", kind=request["kind"], epochs=cfg.epochs, output=str(cfg.output), error="",
                  pid=os.getpid())
    write_status(session_dir, status)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        # the device token: the file `dlora train --detach --token-file` named, read afresh at every start (a
        # replaced token takes effect on resume), else this process's $DLORA_TOKEN (the daemon's environment)
        engine = (SplitEngine(cfg, token=device_token(cfg.token_file, os.environ)) if request["kind"] == "train"
                  else LocalEngine(cfg))
        status["layers"] = engine.num_layers
        try:
            progress = _Progress(session_dir, status, cfg.output / "metrics.jsonl")
            train(cfg, engine, session_dir / "checkpoints", observer=progress, should_stop=stop.is_set)
        finally:
            engine.close()
    except Stopped as e:
        log.info("%s", e)
        status.update(state="stopped")
        write_status(session_dir, status)
        return 0
    except DloraError as e:
        log.error("%s", e)
        status.update(state="failed", error=str(e))
        write_status(session_dir, status)
        return 2
    except Exception as e:  # noqa: BLE001 - recorded for `dlora status`, with the traceback in the log
        log.exception("session failed")
        status.update(state="failed", error=f"{type(e).__name__}: {e}"[:300])
        write_status(session_dir, status)
        return 1
    status.update(state="done", eta_s=0.0)
    write_status(session_dir, status)
    log.info("done; adapter in %s", cfg.output)
    return 0


def main(argv: list[str] | None = None) -> None:
    tune_process()  # before anything imports torch: see common/tuning.py
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        sys.exit("usage: python -m edge_client.app.session_runner SESSION_DIR (the dlora-edge daemon starts it)")
    session_dir = Path(argv[0])
    _die_with_parent()
    logging.basicConfig(filename=session_dir / "log.txt", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(run(session_dir))


if __name__ == "__main__":
    main()
