"""deploy/: every dlora command and flag that compose.yaml, the Dockerfiles and the systemd unit use exists."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cloud_server.cli import _parser as cloud_parser
from edge_client.app.cli import _parser as dlora_parser
from edge_client.app.daemon import parser as edge_parser

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
PARSERS = {"dlora": dlora_parser, "dlora-cloud": cloud_parser, "dlora-edge": edge_parser}


def _defaults(text: str) -> str:
    """Compose-style ${VAR:-default} and ${VAR} with their defaults (or a placeholder)."""
    return re.sub(r"\$\{(\w+)(?::-([^}]*))?\}", lambda m: m.group(2) if m.group(2) is not None else "x", text)


def _commands_in_compose(doc: dict) -> list[list[str]]:
    found = []
    for svc in doc["services"].values():
        for cmd in (svc.get("command"), (svc.get("healthcheck") or {}).get("test")):
            if isinstance(cmd, list):
                found.append([_defaults(str(c)) for c in cmd if c != "CMD"])
    return found


def _commands_in_dockerfile(text: str) -> list[list[str]]:
    found = []
    for line in text.splitlines():
        m = re.match(r"\s*(?:CMD|HEALTHCHECK .*CMD)\s+(\[.*\])\s*$", line)
        if m:
            found.append(json.loads(m.group(1)))
    return found


def _commands_in_unit(text: str) -> list[list[str]]:
    return [shlex.split(line.split("=", 1)[1]) for line in text.splitlines() if line.startswith("ExecStart=")]


def _all_commands() -> list[tuple[str, list[str]]]:
    out = [("compose.yaml", c) for c in _commands_in_compose(yaml.safe_load((DEPLOY / "compose.yaml").read_text()))]
    for name in ("Dockerfile.cloud", "Dockerfile.edge"):
        out += [(name, c) for c in _commands_in_dockerfile((DEPLOY / name).read_text())]
    out += [("dlora-edge.service", c) for c in _commands_in_unit((DEPLOY / "dlora-edge.service").read_text())]
    return [(where, c) for where, c in out if c and Path(c[0]).name in PARSERS]


def test_the_deploy_files_hold_dlora_commands():
    where = {w for w, _ in _all_commands()}
    assert where == {"compose.yaml", "Dockerfile.cloud", "Dockerfile.edge", "dlora-edge.service"}
    programs = {Path(c[0]).name for _, c in _all_commands()}
    assert programs == {"dlora-cloud", "dlora-edge"}


@pytest.mark.parametrize("where,command", _all_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x[:2]))
def test_every_command_and_flag_exists(where, command):
    parser = PARSERS[Path(command[0]).name]()
    try:
        parser.parse_args(command[1:])
    except SystemExit as e:
        pytest.fail(f"{where}: `{' '.join(command)}` is not a valid command line ({e})")


def test_compose_wires_redis_and_health():
    doc = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    redis, cloud = doc["services"]["redis"], doc["services"]["cloud"]
    assert "--appendonly" in redis["command"] and redis["healthcheck"]["test"][-1] == "ping"
    assert any("redis-data" in v for v in redis["volumes"])
    assert cloud["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "redis://redis:6379/0" in cloud["command"]
    assert cloud["healthcheck"]["test"][1:3] == ["dlora-cloud", "health"]
    assert any(v.endswith(":/models:ro") for v in cloud["volumes"])
    for name in ("cloud.env.example", "edge.env.example", "compose.gpu.yaml"):
        assert (DEPLOY / name).is_file()
