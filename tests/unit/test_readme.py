"""The README's CLI reference stays true to --help: every flag of every command is documented, and
every flag the README names exists."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from cloud_server.cli import _parser as cloud_parser
from edge_client.app.cli import _parser as dlora_parser
from edge_client.app.daemon import parser as edge_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()
OTHER_TOOLS = {"--env-file", "--no-deps"}  # flags of docker and pip that the README also shows


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    found = set()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                found |= _flags(sub)
        found |= {o for o in action.option_strings if o.startswith("--")}
    return found


def test_every_flag_is_documented():
    flags = _flags(dlora_parser()) | _flags(cloud_parser()) | _flags(edge_parser())
    missing = sorted(f for f in flags - {"--help"} if not re.search(re.escape(f) + r"(?![\w-])", README))
    assert not missing, f"README does not document {missing}"


def test_every_documented_flag_exists():
    flags = _flags(dlora_parser()) | _flags(cloud_parser()) | _flags(edge_parser())
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", README))
    assert not named - flags - OTHER_TOOLS, f"README names flags no command has: {sorted(named - flags - OTHER_TOOLS)}"


def test_every_command_is_documented():
    for action in dlora_parser()._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name in action.choices:
                assert f"dlora {name}" in README, name
