"""Where the cloud's Redis lives, and how the admin commands reach it.

`dlora-cloud serve` without --redis-url runs an embedded Redis server whose unix socket is
`STATE_DIR/redis.sock` (mode 0600); only `serve` starts it. The admin commands (`dlora-cloud token`,
...) never start one: they connect to --redis-url, or to the socket of the `serve` running on
--state-dir, and fail with one line when neither answers.
"""

from __future__ import annotations

from pathlib import Path

import redis

from common.errors import ConfigError

SOCKET_NAME = "redis.sock"


def socket_path(state_dir: Path) -> Path:
    """The unix socket of the embedded Redis server that `serve` runs on state_dir."""
    return Path(state_dir) / SOCKET_NAME


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
        raise ConfigError(f"cannot reach {where} ({str(e).splitlines()[0][:100]}); start `dlora-cloud serve` "
                          "with that --state-dir first, or pass --redis-url") from None
    return client
