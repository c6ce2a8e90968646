"""A device link for the bench: one-way delay and a rate limit per direction.

Where the machine allows it (root, iproute2, a kernel with sch_netem: `netem_status` says), the
cloud runs in its own network namespace behind a veth pair with `tc qdisc ... netem delay D rate R`
on each end (`NetemLink`): the kernel's TCP over an emulated link. Elsewhere `LinkEmulator` emulates
the link in user space: a TCP relay on 127.0.0.1 that serialises each direction at its rate and
delivers every chunk DELAY after it left, like a link with that bandwidth and propagation delay.
"""

from __future__ import annotations

import asyncio
import os
import re
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
    """One direction of the link: serialisation at `rate`, then `delay` of flight."""

    def __init__(self, name: str, delay: float, rate: float, busy: list[tuple[str, float, float]] | None) -> None:
        self.name, self.delay, self.rate, self.free_at, self.busy = name, delay, rate, 0.0, busy

    def departure(self, now: float, size: int) -> float:
        start = max(now, self.free_at)
        self.free_at = start + size / self.rate
        if self.busy is not None:
            self.busy.append((self.name, start, self.free_at))
        return self.free_at + self.delay


class LinkEmulator:
    """A TCP relay 127.0.0.1:port -> upstream with a delayed, rate-limited link in each direction."""

    def __init__(self, upstream: str, delay_s: float, rate_bytes_s: float, record: bool = False,
                 rate_down: float | None = None) -> None:
        """rate_bytes_s: the uplink's (device to cloud), and the downlink's unless rate_down is given;
        record: keep every transmission as ("up"|"down", start, end) in `busy` (time.monotonic)."""
        self.busy: list[tuple[str, float, float]] | None = [] if record else None
        self.upstream_host, port = upstream.rsplit(":", 1)
        self.upstream_port = int(port)
        self.delay, self.rate, self.rate_down = delay_s, rate_bytes_s, rate_down or rate_bytes_s
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="link-emulator")
        self._thread.start()
        self._ready.wait(10)
        self.address = f"127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.upstream_host, self.upstream_port)
        except OSError:  # the cloud is gone: the device sees its connection closed, as on a real link
            writer.close()
            return
        await asyncio.gather(
            self._pump(reader, up_writer, _Direction("up", self.delay, self.rate, self.busy)),
            self._pump(up_reader, writer, _Direction("down", self.delay, self.rate_down, self.busy)),
        )

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: _Direction) -> None:
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await queue.get()) is not None:
                at, data = item
                wait = at - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        sender = asyncio.ensure_future(deliver())
        try:
            while data := await reader.read(_CHUNK):
                await queue.put((link.departure(time.monotonic(), len(data)), data))
        except (ConnectionError, OSError):
            pass
        await queue.put(None)
        try:
            await sender
        except (ConnectionError, OSError):
            pass

    def close(self) -> None:
        async def shutdown() -> None:
            self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(shutdown(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
