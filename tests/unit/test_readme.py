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
OTHER_TOOLS = {"--env-file", "--no-deps", "--rm", "--scale"}  # flags of docker and pip that the README also shows


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


ROOT = Path(__file__).resolve().parents[2]


def _layout_block() -> str:
    section = README[README.index("### Layout"):]
    return section[section.index("```") + 3 : section.index("```", section.index("```") + 3)]


def test_layout_names_every_module_and_no_other():
    """The README's layout tree lists every module of ours by its file name, and names no .py file that is gone."""
    block = _layout_block()
    ours = sorted(p for pkg in ("common", "cloud_server", "edge_client") for p in (ROOT / pkg).rglob("*.py")
                  if p.name != "__init__.py" and "pb" not in p.relative_to(ROOT).parts)
    missing = [str(p.relative_to(ROOT)) for p in ours if not re.search(rf"(?<![\w.]){re.escape(p.name)}\b", block)]
    assert not missing, f"README's layout does not name {missing}"
    named = set(re.findall(r"[a-z_]+\.py", block))
    gone = sorted(named - {p.name for p in ours})
    assert not gone, f"README's layout names modules that do not exist: {gone}"
    for folder in re.findall(r"^ *([a-z_]+)/ ", block, flags=re.M):
        assert any(ROOT.glob(f"**/{folder}")), f"README's layout names a folder {folder}/ that does not exist"
