"""The bench's user-space device link: parse --wan, and delay + rate per direction, as recorded."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from common.errors import ConfigError
from edge_client.link_emulator import LinkEmulator, parse_wan


def test_parse_wan():
    assert parse_wan("10ms,100mbit") == (0.010, 12.5e6)
    assert parse_wan(" 0.5s , 2gbit ") == (0.5, 2.5e8)
    for bad in ("10ms", "10,100mbit", "10ms,100mb", "fast"):
        with pytest.raises(ConfigError, match="DELAY,RATE"):
            parse_wan(bad)


def _echo_server() -> tuple[socket.socket, int]:
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    return srv, srv.getsockname()[1]


def test_round_trip_pays_delay_and_rate_each_way():
    srv, port = _echo_server()
    delay, rate, size = 0.02, 2e6, 200_000  # 0.1 s of serialisation per direction
    relay = LinkEmulator(f"127.0.0.1:{port}", delay, rate, record=True)
    try:
        with socket.create_connection(("127.0.0.1", int(relay.address.rsplit(":", 1)[1]))) as c:
            start = time.monotonic()
            c.sendall(b"x" * size)
            got = 0
            while got < size:
                got += len(c.recv(65536))
            elapsed = time.monotonic() - start
    finally:
        relay.close()
        srv.close()
    # nothing arrives before its bytes crossed each direction at the rate and flew for the delay
    assert elapsed >= 2 * delay + size / rate
    busy = relay.busy or []
    for direction in ("up", "down"):
        spans = [(s, e) for d, s, e in busy if d == direction]
        assert sum(e - s for s, e in spans) == pytest.approx(size / rate)
        assert all(b[0] >= a[1] - 1e-9 for a, b in zip(spans, spans[1:]))  # one transmission at a time
