"""A `dlora-cloud serve` child process on 127.0.0.1 with a free port (for the demo and the bench)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO, cast

from common.errors import RemoteError


class CloudProcess:
    """`dlora-cloud serve` as a child process on 127.0.0.1 with a free port."""

    def __init__(self, model_dir: Path, start_timeout_s: float = 300.0, extra: list[str] | None = None,
                 prefix: list[str] | None = None) -> None:
        """prefix: what the command runs under, e.g. `ip netns exec NAME` (then pass --host in extra)."""
        cmd = [*(prefix or []), sys.executable, "-m", "cloud_server.cli", "serve", "--model", str(model_dir), "--port", "0",
               *(extra or [])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self._stderr: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + start_timeout_s
        stdout = cast(IO[str], self.proc.stdout)
        while time.monotonic() < deadline:
            line = stdout.readline()
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                return
            if not line and self.proc.poll() is not None:
                break
        self.stop()
        tail = "".join(self._stderr[-5:]).strip()
        raise RemoteError("UNAVAILABLE", f"dlora-cloud did not start: {tail or 'no output'}")

    def _drain(self) -> None:
        for line in cast(IO[str], self.proc.stderr):
            self._stderr.append(line)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
