"""The wire contract: generated code is committed as generated, and every field is documented."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest

from common.pb.dlora.v1 import dlora_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
PROTO = ROOT / "protos" / "dlora" / "v1" / "dlora.proto"
COMMITTED = ROOT / "common" / "pb"

_FIELD = re.compile(r"^\s*(?:repeated\s+|optional\s+)?[\w.]+\s+(\w+)\s*=\s*\d+\s*(?:\[.*\])?\s*;")
_OPEN = re.compile(r"^\s*(message|oneof|enum|service)\s+(\w+)\s*\{")


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dlora_generate_protos", ROOT / "protos" / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


def test_regenerated_code_is_byte_identical(tmp_path: Path) -> None:
    written = _generator().generate(tmp_path / "pb")
    fresh, committed = _files(tmp_path / "pb"), _files(COMMITTED)
    assert {str(p.relative_to(tmp_path / "pb")) for p in written} == set(fresh)
    assert set(fresh) == set(committed), "files differ; run `make protos`"
    for name in fresh:
        assert fresh[name] == committed[name], (
            f"common/pb/{name} differs from the generated code; run `make protos`"
        )


def _message_fields(text: str) -> list[tuple[str, str, list[str]]]:
    """(message, field, the run of comment and field lines directly above it) for every message field.

    The run stops at the first line that is neither a comment nor a field (blank line, brace, ...).
    """
    lines = text.splitlines()
    stack: list[tuple[str, str]] = []  # (kind, name) of the open blocks
    out = []
    for i, line in enumerate(lines):
        code = line.split("//", 1)[0]
        if m := _OPEN.match(code):
            stack.append((m.group(1), m.group(2)))
        elif (m := _FIELD.match(code)) and stack and stack[-1][0] in ("message", "oneof"):
            message = next(name for kind, name in reversed(stack) if kind == "message")
            above = []
            for prev in reversed(lines[:i]):
                if prev.strip().startswith("//") or _FIELD.match(prev.split("//", 1)[0]):
                    above.append(prev.strip())
                else:
                    break
            out.append((message, m.group(1), above))
        if "}" in code and not _OPEN.match(code) and stack:
            stack.pop()
        elif "}" in code and "{" in code and _OPEN.match(code) and code.strip().endswith("{}"):
            stack.pop()  # `message HealthRequest {}`
    return out


def _covered(field: str, above: list[str]) -> bool:
    """A comment line directly above the field, or a comment directly above a run of fields that names it.

    The second form is how the proto documents shared fields: "// Step and micro-batch of ..." above
    `uint64 step = 1; uint32 micro_batch = 2;`.
    """
    if not above:
        return False
    if above[0].startswith("//"):
        return True
    comment = next((line for line in above if line.startswith("//")), None)
    if comment is None:
        return False
    words = {field, field.replace("_", "-"), field.replace("_", " ")}
    return any(re.search(rf"\b{re.escape(w)}\b", comment, flags=re.I) for w in words)


def test_parser_sees_every_field_of_the_descriptor() -> None:
    parsed = {(m, f) for m, f, _ in _message_fields(PROTO.read_text())}
    declared = {(m.name, f.name) for m in pb.DESCRIPTOR.message_types_by_name.values() for f in m.fields}
    assert parsed == declared


@pytest.mark.parametrize(
    "field,above,ok",
    [
        ("step", ["// Optimizer step."], True),
        ("micro_batch", ["uint64 step = 1;", "// Step and micro-batch of the forward."], True),
        (
            "layer",
            ["uint32 micro_batch = 2;", "uint64 step = 1;", "// Step, micro-batch, layer and group."],
            True,
        ),
        (
            "extra",
            ["uint32 micro_batch = 2;", "uint64 step = 1;", "// Step and micro-batch of the forward."],
            False,
        ),
        ("step", [], False),
        ("step", ["uint32 micro_batch = 2;"], False),
    ],
)
def test_comment_rule(field: str, above: list[str], ok: bool) -> None:
    assert _covered(field, above) is ok


def test_every_message_field_has_a_comment() -> None:
    missing = [f"{m}.{f}" for m, f, above in _message_fields(PROTO.read_text()) if not _covered(f, above)]
    assert not missing, f"fields without a comment directly above: {missing}"


def _absolute_dlora_imports(source: str) -> list[str]:
    bad = []
    for node in ast.walk(ast.parse(source)):
        if (
            isinstance(node, ast.ImportFrom)
            and node.level == 0
            and (node.module or "").split(".")[0] == "dlora"
        ):
            bad.append(f"from {node.module} import ...")
        elif isinstance(node, ast.Import):
            bad += [f"import {a.name}" for a in node.names if a.name.split(".")[0] == "dlora"]
    return bad


@pytest.mark.parametrize("name", ["dlora_pb2.py", "dlora_pb2_grpc.py"])
def test_generated_modules_import_package_relative(name: str) -> None:
    source = (COMMITTED / "dlora" / "v1" / name).read_text()
    assert "from dlora.v1 import" not in source
    assert not _absolute_dlora_imports(source)


def test_grpc_module_imports_its_messages_relatively() -> None:
    source = (COMMITTED / "dlora" / "v1" / "dlora_pb2_grpc.py").read_text()
    assert re.search(r"^from \. import dlora_pb2 as ", source, flags=re.M)
    assert _absolute_dlora_imports("from dlora.v1 import dlora_pb2 as x\nimport dlora.v1\n") == [
        "from dlora.v1 import ...",
        "import dlora.v1",
    ]


def test_generated_grpc_module_uses_the_common_messages() -> None:
    from common.pb.dlora.v1 import dlora_pb2_grpc

    assert any(value is pb for value in vars(dlora_pb2_grpc).values()), "grpc module loaded another dlora_pb2"
