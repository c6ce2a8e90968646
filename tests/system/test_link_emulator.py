"""The bench's device link: parse --wan; the user-space relay's delay and rate per direction, as
recorded; the network namespace the kernel-netem link puts the cloud in; netem itself where it exists.

The recorded spans are computed, not measured: a transmission's end is its start + bytes / rate in
float64, so their summed durations equal bytes / rate to float64 rounding of monotonic-clock values
(~1e-9 relative), on any CPU; pytest.approx's default rel 1e-6 is exact enough. Elapsed times are
only bounded from below, by delays the relay sleeps through, never compared with a tolerance.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from common.errors import ConfigError
from edge_client.tools.link_emulator import LinkEmulator, Namespace, NetemLink, netem_status, parse_wan


def test_parse_wan():
    assert parse_wan("10ms,100mbit") == (0.010, 12.5e6, 12.5e6)
    assert parse_wan(" 0.5s , 2gbit ") == (0.5, 2.5e8, 2.5e8)
    assert parse_wan("20ms,20mbit/100mbit") == (0.020, 2.5e6, 12.5e6)  # uplink / downlink
    for bad in ("10ms", "10,100mbit", "10ms,100mb", "fast", "10ms,20mbit/", "10ms,20mbit/100mbit/1gbit"):
        with pytest.raises(ConfigError, match="DELAY,RATE"):
            parse_wan(bad)
    with pytest.raises(ConfigError, match="rate must be > 0"):
        parse_wan("10ms,100mbit/0mbit")


def _echo_server(host: str = "127.0.0.1") -> tuple[socket.socket, int]:
    srv = socket.create_server((host, 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def _round_trip(host: str, port: int, size: int) -> float:
    with socket.create_connection((host, port), timeout=30) as c:
        start = time.monotonic()
        c.sendall(b"x" * size)
        got = 0
        while got < size:
            got += len(c.recv(65536))
        return time.monotonic() - start


@pytest.mark.parametrize("rate_down", [None, 4e6])
def test_round_trip_pays_delay_and_rate_each_way(rate_down):
    srv, port = _echo_server()
    delay, rate, size = 0.02, 2e6, 200_000  # 0.1 s of serialisation up (0.05 s down at 4e6)
    relay = LinkEmulator(f"127.0.0.1:{port}", delay, rate, record=True, rate_down=rate_down)
    try:
        elapsed = _round_trip("127.0.0.1", int(relay.address.rsplit(":", 1)[1]), size)
    finally:
        relay.close()
        srv.close()
    # nothing arrives before its bytes crossed each direction at its rate and flew for the delay
    assert elapsed >= 2 * delay + size / rate
    busy = relay.busy or []
    for direction, r in (("up", rate), ("down", rate_down or rate)):
        spans = [(s, e) for d, s, e in busy if d == direction]
        assert sum(e - s for s, e in spans) == pytest.approx(size / r)
        assert all(b[0] >= a[1] - 1e-9 for a, b in zip(spans, spans[1:]))  # one transmission at a time


def test_connections_share_the_link():
    """Two connections at once take as long as their bytes at the link's rate, not half of it."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        for _ in range(2):
            conn, _ = srv.accept()

            def drain(conn: socket.socket = conn) -> None:
                with conn:
                    while conn.recv(65536):
                        pass
                    conn.sendall(b"k")

            threading.Thread(target=drain, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    delay, rate, size = 0.005, 2e6, 200_000
    relay = LinkEmulator(f"127.0.0.1:{srv.getsockname()[1]}", delay, rate, record=True)

    def send() -> None:
        with socket.create_connection(("127.0.0.1", relay.port), timeout=30) as c:
            c.sendall(b"x" * size)
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b"k"

    start = time.monotonic()
    senders = [threading.Thread(target=send) for _ in range(2)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    elapsed = time.monotonic() - start
    relay.close()
    srv.close()
    assert elapsed >= 2 * size / rate
    spans = sorted((s, e) for d, s, e in relay.busy or [] if d == "up")
    assert sum(e - s for s, e in spans) == pytest.approx(2 * size / rate)
    assert all(b[0] >= a[1] - 1e-9 for a, b in zip(spans, spans[1:]))


def test_closing_the_relay_ends_open_connections_and_its_threads():
    srv, port = _echo_server()
    relay = LinkEmulator(f"127.0.0.1:{port}", 0.001, 1e8)
    with socket.create_connection(("127.0.0.1", relay.port), timeout=5) as c:
        c.sendall(b"ping")
        assert c.recv(16) == b"ping"
        relay.close()
        try:
            assert c.recv(16) == b""  # the device sees the link go down
        except ConnectionResetError:
            pass
    srv.close()
    deadline = time.monotonic() + 5
    while any(t.name.startswith("link-") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t.name for t in threading.enumerate() if t.name.startswith("link-")]


def _can_make_namespaces() -> bool:
    return os.geteuid() == 0 and shutil.which("ip") is not None and \
        subprocess.run(["ip", "netns", "list"], capture_output=True).returncode == 0


ECHO = """
import socket, sys
srv = socket.create_server((sys.argv[1], 0))
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
while data := conn.recv(65536):
    conn.sendall(data)
"""


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2")
def test_namespace_runs_a_server_this_side_reaches_and_leaves_nothing_behind():
    ns = Namespace()
    try:
        proc = subprocess.Popen([*ns.prefix, sys.executable, "-c", ECHO, ns.ns_ip], stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline())
        assert _round_trip(ns.ns_ip, port, 100_000) < 5
        proc.wait(timeout=10)
    finally:
        ns.close()
    assert ns.name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert subprocess.run(["ip", "link", "show", ns.host_if], capture_output=True).returncode != 0


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2")
def test_a_killed_benchs_namespace_is_reaped_by_the_next():
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = f"dlora{dead.pid}-abcdef"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    ns = Namespace()
    try:
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in listed and ns.name in listed  # its own, named after this live process, stays
    finally:
        ns.close()


@pytest.mark.skipif(not _can_make_namespaces(), reason="needs root and iproute2")
def test_netem_link_where_the_kernel_has_netem_else_a_clear_refusal():
    status = netem_status()
    if status != "available":
        with pytest.raises(ConfigError, match="netem"):
            NetemLink(0.02, 2e6, 4e6)
        assert not [n for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
                    if n.startswith("dlora")]  # the namespace of the failed attempt is gone
        return
    link = NetemLink(0.02, 2e6, 4e6)
    try:
        proc = subprocess.Popen([*link.prefix, sys.executable, "-c", ECHO, link.ns_ip], stdout=subprocess.PIPE, text=True)
        port = int(proc.stdout.readline())
        size = 200_000
        assert _round_trip(link.ns_ip, port, size) >= 2 * 0.02 + size / 2e6
        proc.wait(timeout=10)
    finally:
        link.close()
