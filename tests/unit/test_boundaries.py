"""House rules checked on the source: who may import whom (packages, and the layers inside edge_client), no
pickle, no assert for validation, edge_client/ made of sub-packages only, no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "cloud_server", "edge_client")
# package -> top-level packages it must never import
FORBIDDEN = {
    "edge_client": {"cloud_server"},
    "cloud_server": {"edge_client"},
    "common": {"edge_client", "cloud_server"},
}
# Serialisers that run code on load; only protobuf crosses the wire.
PICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "shelve", "marshal", "joblib"}


def _sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every module a source imports: import statements (relative ones resolved) and literal
    importlib.import_module / __import__ calls."""
    found: set[str] = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            # `from x import submodule` imports x.submodule
            found.update(f"{target}.{alias.name}" if target else alias.name for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = (
                func.attr
                if isinstance(func, ast.Attribute)
                else func.id
                if isinstance(func, ast.Name)
                else ""
            )
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                found.add(node.args[0].value)
    return found


def _tops(modules: set[str]) -> set[str]:
    return {m.split(".")[0] for m in modules if m}


def _all_sources() -> list[Path]:
    return [p for pkg in PACKAGES for p in _sources(pkg)]


@pytest.mark.parametrize("package", PACKAGES)
def test_package_has_sources(package: str) -> None:
    assert len(_sources(package)) >= 2, f"found no sources under {package}/; is ROOT right?"


@pytest.mark.parametrize("package", PACKAGES)
def test_import_boundaries(package: str) -> None:
    bad = []
    for path in _sources(package):
        tops = _tops(imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py"))
        bad += [f"{path.relative_to(ROOT)} imports {t}" for t in sorted(tops & FORBIDDEN[package])]
    assert not bad, "\n".join(bad)


def test_no_pickle() -> None:
    bad = []
    for path in _all_sources():
        tops = _tops(imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py"))
        bad += [f"{path.relative_to(ROOT)} imports {t}" for t in sorted(tops & PICKLERS)]
    assert not bad, "\n".join(bad)


def test_no_assert_statements() -> None:
    """`python -O` strips asserts, so they must not guard inputs; raise a DloraError instead."""
    bad = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _all_sources()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assert)
    ]
    assert not bad, f"assert statements in library code: {bad}"


@pytest.mark.parametrize(
    "source,module,expected",
    [
        ("import cloud_server.session", "edge_client.remote.link", {"cloud_server"}),
        ("from cloud_server import stack", "edge_client.remote.link", {"cloud_server"}),
        ("from ...cloud_server import stack", "edge_client.remote.link", {"cloud_server"}),
        ("from ... import cloud_server", "edge_client.remote.link", {"cloud_server"}),
        (
            "import importlib\nimportlib.import_module('cloud_server.stack')",
            "edge_client.remote.link",
            {"cloud_server"},
        ),
        ("def f():\n    import pickle", "common.wire.codecs", {"pickle"}),
        ("from . import codecs", "common.config", set()),
        ("from .errors import ConfigError", "common.config", set()),
        ("import torch", "common.wire.codecs", set()),
    ],
)
def test_import_walker(source: str, module: str, expected: set[str]) -> None:
    """The walker itself: it must see every form of import, or the checks above prove nothing."""
    watched = {"cloud_server", "pickle"}
    assert _tops(imported_modules(source, module)) & watched == expected


def test_relative_imports_resolve_inside_their_package() -> None:
    assert "common.errors" in imported_modules("from .errors import ConfigError", "common.config")
    assert "common.pb.dlora.v1.dlora_pb2" in imported_modules(
        "from . import dlora_pb2", "common.pb.dlora.v1", True
    )


# sub-package -> modules of our own it must never import (the training core runs without the link,
# the CLI or the tools; the link without the CLI or the tools)
LAYERS = {
    "edge_client.train": ("edge_client.app", "edge_client.tools", "edge_client.remote"),
    "edge_client.remote": ("edge_client.app", "edge_client.tools"),
}
MAX_LINES = 400  # STYLE.md: a file owns one noun and stays roughly 100-400 lines


def _violations(imported: set[str], forbidden: tuple[str, ...]) -> set[str]:
    return {f for m in imported for f in forbidden if m == f or m.startswith(f + ".")}


@pytest.mark.parametrize("subpackage", sorted(LAYERS))
def test_edge_layers(subpackage: str) -> None:
    folder = ROOT / subpackage.replace(".", "/")
    sources = sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)
    assert sources, f"no sources under {folder}"
    bad = []
    for path in sources:
        imported = imported_modules(path.read_text(), _module_name(path), path.name == "__init__.py")
        bad += [f"{path.relative_to(ROOT)} imports {m}" for m in sorted(_violations(imported, LAYERS[subpackage]))]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize(
    "source,module,expected",
    [
        ("from ..remote.link import CloudLink", "edge_client.train.engines", {"edge_client.remote"}),
        ("from edge_client import app", "edge_client.train.trainer", {"edge_client.app"}),
        ("from .. import tools", "edge_client.remote.link", {"edge_client.tools"}),
        ("import edge_client.tools.bench", "edge_client.remote.link", {"edge_client.tools"}),
        ("from edge_client.train.data import Batch", "edge_client.remote.link", set()),
        ("from .lora import LoraAdapter", "edge_client.train.engines", set()),
        ("import edge_client.remoteness", "edge_client.train.engines", set()),  # a prefix of a name is not the name
    ],
)
def test_layer_walker(source: str, module: str, expected: set[str]) -> None:
    forbidden = ("edge_client.app", "edge_client.tools", "edge_client.remote")
    assert _violations(imported_modules(source, module), forbidden) == expected


def test_edge_client_holds_only_subpackages() -> None:
    """edge_client/ is train/ remote/ app/ tools/ and an __init__.py; a module lives in one of them."""
    root = ROOT / "edge_client"
    bad = [p.name for p in sorted(root.iterdir())
           if (p.is_file() and p.suffix == ".py" and p.name != "__init__.py")
           or (p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").is_file())]
    assert not bad, f"edge_client/ holds {bad}; move each module into a sub-package"


def test_no_module_over_400_lines() -> None:
    """Our modules (generated protobuf code aside) stay within STYLE.md's size."""
    generated = ROOT / "common" / "pb"
    long = [f"{p.relative_to(ROOT)} ({n} lines)" for p in _all_sources()
            if not p.is_relative_to(generated) and (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: {long}; split by the nouns they own"
