"""bench/gpu_check.sh runs on a lent GPU machine with no second try: its `dlora bench` lines must parse
and pass the bench's own flag checks here, before any device time is spent on them."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from edge_client.app.cli import _parser
from edge_client.tools.bench import check_flags, with_defaults

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"


def _bench_lines() -> list[list[str]]:
    """Each `python3 -m edge_client.app.cli bench ...` command of the script, continuation lines joined,
    ${VAR:-default} replaced by its default and "$OUT/..." by a path."""
    text = SCRIPT.read_text().replace("\\\n", " ")
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", text).replace("$OUT", "/tmp/gpu")
    found = []
    for line in text.splitlines():
        if "edge_client.app.cli bench" in line:
            words = shlex.split(line.split("2>&1")[0])
            found.append(words[words.index("edge_client.app.cli") + 1:])
    return found


def test_every_bench_line_parses_and_passes_the_flag_checks():
    lines = _bench_lines()
    assert len(lines) == 2, "the adapter rows and the layerwise rows"
    protocols = []
    for words in lines:
        args = with_defaults(_parser().parse_args(words))
        args.device = args.cloud_device = "cpu"  # check_flags refuses cuda where torch sees none; the rest is the same
        protocols += check_flags(args)[2]
    assert sorted(protocols) == ["adapter", "layerwise"]
