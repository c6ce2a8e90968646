"""Bad input to the CLIs: one line naming the problem and the fix, a non-zero exit, no traceback."""

from __future__ import annotations

import json
import socket

import pytest

from cloud_server.cli import main as cloud_main
from edge_client.app.cli import main as dlora_main


def run(main, argv, capsys) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    return code, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_args(model, data, out, cloud="127.0.0.1:1", *extra):
    return ["train", "--cloud", cloud, "--model", str(model), "--data", str(data), "--output", str(out),
            "--connect-timeout", "2", "--no-progress", *extra]


def one_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("dlora")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_missing_model_folder(tmp_path, data_file, capsys):
    code, err = run(dlora_main, train_args(tmp_path / "nope", data_file, tmp_path / "o"), capsys)
    assert code == 2 and "does not exist" in one_line(err) and "dlora prepare" in err


def test_unsupported_architecture(tmp_path, data_file, capsys):
    bad = tmp_path / "t5"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8, "num_layers": 1}))
    code, err = run(dlora_main, train_args(bad, data_file, tmp_path / "o"), capsys)
    line = one_line(err)
    assert code == 2 and "unsupported architecture 't5'" in line and "llama" in line and "gpt_neox" in line


@pytest.mark.parametrize("content,words", [
    ('{"text": "fine"}\nnot json\n', "line 2 is not JSON"),
    ('{"text": "fine"}\n{"prompt": "only a prompt"}\n', 'line 2 needs {"text"} or {"prompt", "completion"}'),
    ("", "no examples"),
])
def test_bad_data_lines(content, words, tmp_path, tiny_dir, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text(content)
    code, err = run(dlora_main, ["local-train", "--model", str(tiny_dir("llama")), "--data", str(data),
                                 "--output", str(tmp_path / "o"), "--no-progress"], capsys)
    assert code == 2 and words in one_line(err)


def test_cloud_unreachable(tmp_path, tiny_dir, data_file, capsys):
    code, err = run(dlora_main, train_args(tiny_dir("llama"), data_file, tmp_path / "o", f"127.0.0.1:{free_port()}"), capsys)
    line = one_line(err)
    assert code == 3 and "cannot reach dlora-cloud" in line and "dlora-cloud serve" in line


def test_base_model_mismatch(tmp_path, tiny_dir, cloud, data_file, capsys):
    address = cloud(tiny_dir("llama", seed=0))
    code, err = run(dlora_main, train_args(tiny_dir("llama", seed=1), data_file, tmp_path / "o", address), capsys)
    line = one_line(err)
    assert code == 3 and "base model mismatch" in line and "same model folder" in line


def test_bad_flag_values(tmp_path, tiny_dir, data_file, capsys):
    code, err = run(dlora_main, train_args(tiny_dir("llama"), data_file, tmp_path / "o", "127.0.0.1:1", "--epochs", "0"), capsys)
    assert code == 2 and one_line(err).startswith("dlora: error: --epochs=0:")
    code, err = run(dlora_main, train_args(tiny_dir("gpt2"), data_file, tmp_path / "o", "127.0.0.1:1", "--targets", "q_proj"), capsys)
    assert code == 2 and "--targets: 'q_proj'" in one_line(err) and "c_attn" in err


def test_existing_adapter_is_not_overwritten(tmp_path, tiny_dir, data_file, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_model.safetensors").write_bytes(b"precious")
    code, err = run(dlora_main, train_args(tiny_dir("llama"), data_file, out), capsys)
    assert code == 2 and "--overwrite" in one_line(err)
    assert (out / "adapter_model.safetensors").read_bytes() == b"precious"


def test_cloud_cli_errors(tmp_path, capsys):
    code, err = run(cloud_main, ["serve", "--model", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in one_line(err)
    code, err = run(cloud_main, ["health", "--address", f"127.0.0.1:{free_port()}", "--timeout", "1"], capsys)
    assert code == 1 and "not serving" in one_line(err)
