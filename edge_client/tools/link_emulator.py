"""A device link for the bench: one-way delay and a rate limit per direction.

Where the machine allows it (root, iproute2, a kernel with sch_netem: `netem_status` says), the
cloud runs in its own network namespace behind a veth pair with `tc qdisc ... netem delay D rate R`
on each end (`NetemLink`): the kernel's TCP over an emulated link. Elsewhere `LinkEmulator` emulates
the link in user space: a TCP relay on 127.0.0.1 that serialises each direction at its rate and
delivers every chunk DELAY after it left, like a link with that bandwidth and propagation delay.
"""

from __future__ import annotations

import os
import queue
import re
import socket
import subprocess
import threading
import time
import uuid

from common.errors import ConfigError

_CHUNK = 64 * 1024


_RATE = r"\s*([\d.]+)\s*(kbit|mbit|gbit)\s*"


def parse_wan(spec: str) -> tuple[float, float, float]:
    """"10ms,100mbit" -> (0.010 s one-way delay, 12.5e6 bytes/s up, 12.5e6 down); "10ms,20mbit/100mbit"
    gives the device's uplink and downlink their own rates.

    Raises:
        ConfigError: not DELAY,RATE or DELAY,UP/DOWN with units ms|s and kbit|mbit|gbit, or a rate of 0.
    """
    m = re.fullmatch(rf"\s*([\d.]+)\s*(ms|s)\s*,{_RATE}(?:/{_RATE})?", spec.lower())
    if not m:
        raise ConfigError(f"--wan={spec!r}: use DELAY,RATE such as 10ms,100mbit, or DELAY,UP/DOWN such as 10ms,20mbit/100mbit")
    delay = float(m.group(1)) / (1000 if m.group(2) == "ms" else 1)
    units = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
    up = float(m.group(3)) * units[m.group(4)] / 8
    down = float(m.group(5)) * units[m.group(6)] / 8 if m.group(5) else up
    if up <= 0 or down <= 0:
        raise ConfigError(f"--wan={spec!r}: a rate must be > 0")
    return delay, up, down


def netem_status() -> str:
    """'available', or one line saying why kernel netem cannot be used here."""
    if os.geteuid() != 0:
        return "not root, so no network namespaces or tc"
    name = "dlnm" + uuid.uuid4().hex[:6]
    try:
        subprocess.run(["ip", "link", "add", name, "type", "veth", "peer", "name", name + "p"], check=True,
                       capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "cannot create a veth pair (no iproute2 or no permission)"
    try:
        r = subprocess.run(["tc", "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms"],
                           capture_output=True, text=True, timeout=10)
        return "available" if r.returncode == 0 else f"this kernel has no netem qdisc ({r.stderr.strip()})"
    except (OSError, subprocess.SubprocessError):
        return "no tc command"
    finally:
        subprocess.run(["ip", "link", "del", name], capture_output=True, timeout=10)


def _run(cmd: list[str]) -> None:
    """Run one ip/tc command; ConfigError with its stderr when it fails."""
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        raise ConfigError(f"`{' '.join(cmd)}` failed: {e}") from e
    if r.returncode != 0:
        raise ConfigError(f"`{' '.join(cmd)}` failed: {r.stderr.strip() or r.returncode}")


def reap_stale_namespaces() -> list[str]:
    """Delete the namespaces of bench processes that no longer run (killed before they could clean up);
    returns their names. Namespaces are named dlora<pid>-<tag> after the process that made them."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    stale = []
    for name in (line.split()[0] for line in listed.splitlines() if line.strip()):
        m = re.fullmatch(r"dlora(\d+)-[0-9a-f]+", name)
        if m and not os.path.exists(f"/proc/{m.group(1)}"):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
            stale.append(name)
    return stale


class Namespace:
    """A network namespace joined to this one by a veth pair: this side HOST_IP, the other NS_IP.

    `prefix` runs a command inside it (`ip netns exec NAME ...`); close() deletes the namespace, and
    with it both ends of the pair. Needs root and iproute2.

    Raises (from the constructor):
        ConfigError: a step failed (it says which); nothing is left behind.
    """

    def __init__(self) -> None:
        reap_stale_namespaces()
        tag = uuid.uuid4().hex[:6]
        self.name, self.host_if, self.ns_if = f"dlora{os.getpid()}-{tag}", f"dl{tag}h", f"dl{tag}c"
        taken = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True, timeout=10).stdout
        octet = next((o for o in range(256) if f" 10.254.{o}." not in taken), 0)  # a /30 no other bench uses
        self.host_ip, self.ns_ip = f"10.254.{octet}.1", f"10.254.{octet}.2"
        self.prefix = ["ip", "netns", "exec", self.name]
        try:
            _run(["ip", "netns", "add", self.name])
            _run(["ip", "link", "add", self.host_if, "type", "veth", "peer", "name", self.ns_if])
            _run(["ip", "link", "set", self.ns_if, "netns", self.name])
            _run(["ip", "addr", "add", f"{self.host_ip}/30", "dev", self.host_if])
            _run(["ip", "link", "set", self.host_if, "up"])
            _run([*self.prefix, "ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.ns_if])
            _run([*self.prefix, "ip", "link", "set", self.ns_if, "up"])
            _run([*self.prefix, "ip", "link", "set", "lo", "up"])
        except ConfigError:
            self.close()
            raise

    def close(self) -> None:
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True, timeout=10)  # if not moved yet
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


class NetemLink(Namespace):
    """The cloud's side of the link in a namespace, with netem's delay and rate on each end of the veth:
    this side's egress is the device's uplink, the namespace's egress its downlink."""

    def __init__(self, delay_s: float, rate_up: float, rate_down: float) -> None:
        super().__init__()
        try:
            for prefix, dev, rate in (([], self.host_if, rate_up), (self.prefix, self.ns_if, rate_down)):
                _run([*prefix, "tc", "qdisc", "add", "dev", dev, "root", "netem", "delay", f"{delay_s * 1e6:.0f}us",
                      "rate", f"{rate * 8:.0f}bit"])
        except ConfigError:
            self.close()
            raise


class _Direction:
    """One direction of the link: serialisation at `rate`, then `delay` of flight. Every connection
    through the relay shares it, as they would share a real link."""

    def __init__(self, name: str, delay: float, rate: float, busy: list[tuple[str, float, float]] | None) -> None:
        self.name, self.delay, self.rate, self.free_at, self.busy = name, delay, rate, 0.0, busy
        self._lock = threading.Lock()

    def departure(self, now: float, size: int) -> float:
        with self._lock:
            start = max(now, self.free_at)
            self.free_at = start + size / self.rate
            if self.busy is not None:
                self.busy.append((self.name, start, self.free_at))
            return self.free_at + self.delay


def _shutdown(sock: socket.socket) -> None:
    """Shut both directions of a socket that may already be closed; unlike close(), this wakes a
    thread blocked in accept() or recv() on it."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


class LinkEmulator:
    """A TCP relay 127.0.0.1:port -> upstream with a delayed, rate-limited link in each direction.

    Each direction of a connection is two threads on blocking sockets: one reads whatever arrived
    (up to _CHUNK bytes), stamps it with its arrival time at the far end and queues it; the other
    sleeps until that time and writes it on. The relay shares the machine's CPUs with the cloud and
    the device it sits between, so it is kept cheap: an asyncio version of it spent ~1.7x the CPU
    (0.19–0.22 against 0.11–0.17 CPU-s per bench step of 35 MB), which the busier of two
    configurations paid for."""

    def __init__(self, upstream: str, delay_s: float, rate_bytes_s: float, record: bool = False,
                 rate_down: float | None = None) -> None:
        """rate_bytes_s: the uplink's (device to cloud), and the downlink's unless rate_down is given;
        record: keep every transmission as ("up"|"down", start, end) in `busy` (time.monotonic)."""
        self.busy: list[tuple[str, float, float]] | None = [] if record else None
        host, port = upstream.rsplit(":", 1)
        self._upstream = (host, int(port))
        self._up = _Direction("up", delay_s, rate_bytes_s, self.busy)
        self._down = _Direction("down", delay_s, rate_down or rate_bytes_s, self.busy)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._closed = False
        self._accepter = threading.Thread(target=self._accept, daemon=True, name="link-emulator")
        self._accepter.start()

    def _accept(self) -> None:
        while True:
            try:
                device, _ = self._server.accept()
            except OSError:  # closed
                return
            try:
                cloud = socket.create_connection(self._upstream, timeout=10)
                cloud.settimeout(None)
            except OSError:  # the cloud is gone: the device sees its connection closed, as on a real link
                device.close()
                continue
            with self._lock:
                if self._closed:
                    device.close()
                    cloud.close()
                    return
                self._sockets += [device, cloud]
            for sock in (device, cloud):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            ended = threading.Semaphore(0)
            self._pump(device, cloud, self._up, ended)
            self._pump(cloud, device, self._down, ended)
            threading.Thread(target=self._close_when_ended, args=(ended, device, cloud), daemon=True,
                             name="link-closer").start()

    def _close_when_ended(self, ended: threading.Semaphore, *sockets: socket.socket) -> None:
        for _ in range(2):  # both directions
            ended.acquire()
        with self._lock:
            self._sockets = [s for s in self._sockets if s not in sockets]
        for sock in sockets:
            sock.close()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, link: _Direction, ended: threading.Semaphore) -> None:
        chunks: queue.SimpleQueue[tuple[float, bytes] | None] = queue.SimpleQueue()

        def read() -> None:
            try:
                while data := src.recv(_CHUNK):
                    chunks.put((link.departure(time.monotonic(), len(data)), data))
            except OSError:
                pass
            chunks.put(None)

        def deliver() -> None:
            try:
                while (item := chunks.get()) is not None:
                    at, data = item
                    if (wait := at - time.monotonic()) > 0:
                        time.sleep(wait)
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)  # the sender closed: pass the end of stream on
            except OSError:  # the receiver is gone: stop reading from the sender too
                _shutdown(src)
            ended.release()

        for target, role in ((read, "read"), (deliver, "deliver")):
            threading.Thread(target=target, daemon=True, name=f"link-{link.name}-{role}").start()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        for sock in (self._server, *sockets):
            _shutdown(sock)
            sock.close()
        self._accepter.join(timeout=5)
