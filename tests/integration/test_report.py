"""dlora report: PNGs and a Markdown summary for a real run folder."""

from __future__ import annotations

import json

import pytest

from common.config import TrainConfig
from common.errors import ConfigError
from edge_client.app.cli import main as dlora
from edge_client.app.report import write_report
from edge_client.remote.split_engine import SplitEngine
from edge_client.train.trainer import train

PNG = b"\x89PNG\r\n\x1a\n"


def test_report_of_a_split_run(tiny_dir, cloud, data_file, tmp_path, capsys):
    model_dir = tiny_dir("llama", layers=6)
    cfg = TrainConfig(model=model_dir, data=data_file, output=tmp_path / "run", cloud=cloud(model_dir), epochs=4,
                      budget=2, revive=1, batch_size=4, lr=3e-2, progress=False)
    train(cfg, SplitEngine(cfg))
    (cfg.output / "eval.json").write_text(json.dumps({"accuracy_before": 0.4, "accuracy_after": 0.55, "task": "t",
                                                      "test_items": 10}))
    assert dlora(["report", str(cfg.output)]) == 0
    assert "report.md" in capsys.readouterr().out
    for name in ("loss.png", "modules.png", "bytes.png", "accuracy.png"):
        data = (cfg.output / name).read_bytes()
        assert data.startswith(PNG) and len(data) > 5000, name
    md = (cfg.output / "report.md").read_text()
    assert "![modules](modules.png)" in md and "| 4 | 4 |" in md and "0.550 after" in md
    kr = [json.loads(x) for x in (cfg.output / "kr_log.jsonl").read_text().splitlines()]
    killed = [str(d["killed"]) for d in kr if d["killed"]]
    assert killed and all(k in md for k in killed)


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="no metrics.jsonl"):
        write_report(tmp_path)
