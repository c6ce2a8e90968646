"""Process configs and flag errors; model folders: config, safetensors index, fingerprint."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError
from tiny_models import save_tiny_model

from common.config import ServeConfig, TrainConfig, flag_error
from common.errors import ConfigError
from common.model_files import fingerprint, load_config, tensor_index
from common.wire.protocol import WIRE_CODECS

TRAIN: dict[str, Any] = {"model": Path("m"), "data": Path("d.jsonl"), "output": Path("out")}
SERVE: dict[str, Any] = {"model": Path("m")}
CONFIGS = [(TrainConfig, TRAIN), (ServeConfig, SERVE)]
IDS = ["train", "serve"]


def _flag_message(cls: type[BaseModel], **kwargs: Any) -> str:
    with pytest.raises(ValidationError) as e:
        cls(**kwargs)
    err = flag_error(e.value)
    assert isinstance(err, ConfigError)
    msg = str(err)
    assert "\n" not in msg, f"not one line: {msg!r}"
    return msg


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("cls,base", CONFIGS, ids=IDS)
def test_config_is_frozen(cls: type[BaseModel], base: dict[str, Any]) -> None:
    cfg = cls(**base)
    with pytest.raises(ValidationError):
        cfg.model = Path("other")  # type: ignore[misc]
    assert cfg.model == Path("m")


@pytest.mark.parametrize("cls,base", CONFIGS, ids=IDS)
def test_config_forbids_extra_fields(cls: type[BaseModel], base: dict[str, Any]) -> None:
    msg = _flag_message(cls, **base, epoch=3)  # a typo of a real field must not be ignored
    assert msg.startswith("--epoch=3:") and "Extra inputs are not permitted" in msg


@pytest.mark.parametrize(
    "cls,base,bad,prefix,allowed",
    [
        (TrainConfig, TRAIN, {"epochs": 0}, "--epochs=0:", "greater than or equal to 1"),
        (TrainConfig, TRAIN, {"rank": -2}, "--rank=-2:", "greater than or equal to 1"),
        (TrainConfig, TRAIN, {"reply_timeout_s": 0}, "--reply-timeout=0:", "greater than 0"),
        (TrainConfig, TRAIN, {"connect_timeout_s": -1.5}, "--connect-timeout=-1.5:", "greater than 0"),
        (TrainConfig, TRAIN, {"lora_dropout": 1.0}, "--lora-dropout=1.0:", "less than 1"),
        (TrainConfig, TRAIN, {"max_length": 1}, "--max-length=1:", "greater than or equal to 2"),
        (TrainConfig, TRAIN, {"max_message_mb": 2}, "--max-message-mb=2:", "greater than or equal to 4"),
        (TrainConfig, TRAIN, {"batch_size": "many"}, "--batch-size='many':", "integer"),
        (TrainConfig, TRAIN, {"int8_block_size": 0}, "--int8-block-size=0:", "greater than or equal to 1"),
        (TrainConfig, TRAIN, {"wire_up": "fp8"}, "--wire-up='fp8':", "int8"),
        (TrainConfig, TRAIN, {"wire_down": "int4"}, "--wire-down='int4':", "bfloat16"),
        (ServeConfig, SERVE, {"port": 70000}, "--port=70000:", "less than or equal to 65535"),
        (ServeConfig, SERVE, {"step_timeout_s": 0}, "--step-timeout=0:", "greater than 0"),
        (ServeConfig, SERVE, {"max_sessions": 0}, "--max-sessions=0:", "greater than or equal to 1"),
        (ServeConfig, SERVE, {"device": "tpu"}, "--device='tpu':", "'cpu' or 'cuda'"),
        (ServeConfig, SERVE, {"dtype": "int4"}, "--dtype='int4':", "'float32', 'bfloat16' or 'float16'"),
    ],
)
def test_flag_error_names_flag_value_and_what_is_allowed(
    cls: type[BaseModel], base: dict[str, Any], bad: dict[str, Any], prefix: str, allowed: str
) -> None:
    msg = _flag_message(cls, **{**base, **bad})
    assert msg.startswith(prefix), msg
    assert allowed in msg, msg


def test_flag_error_for_an_unknown_wire_codec_lists_the_codecs() -> None:
    msg = _flag_message(TrainConfig, **TRAIN, wire="fp8")
    assert msg.startswith("--wire='fp8':"), msg
    for name in WIRE_CODECS:
        assert name in msg


@pytest.mark.parametrize("wire", WIRE_CODECS)
def test_every_wire_codec_is_accepted(wire: str) -> None:
    assert TrainConfig(**TRAIN, wire=wire).wire == wire


def test_each_direction_defaults_to_wire() -> None:
    cfg = TrainConfig(**TRAIN, wire="bfloat16", wire_up="int8")
    assert (cfg.codec_up, cfg.codec_down) == ("int8", "bfloat16")
    assert (TrainConfig(**TRAIN).codec_up, TrainConfig(**TRAIN).codec_down) == ("float32", "float32")


def test_flag_error_for_a_missing_flag_names_it() -> None:
    msg = _flag_message(TrainConfig, data=Path("d.jsonl"), output=Path("out"))
    assert msg.startswith("--model=") and "Field required" in msg


def test_flag_error_reports_the_first_of_several() -> None:
    msg = _flag_message(TrainConfig, **TRAIN, epochs=0, rank=0)
    assert msg.startswith("--epochs=0:")


# ---------------------------------------------------------------- model folders


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny") / "llama", layers=1)


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _one_line_config_error(fn: Any, folder: Path) -> str:
    with pytest.raises(ConfigError) as e:
        fn(folder)
    msg = str(e.value)
    assert "\n" not in msg, f"not one line: {msg!r}"
    assert str(folder) in msg
    return msg


def test_load_config_reads_a_model_folder(tiny_folder: Path) -> None:
    cfg = load_config(tiny_folder)
    assert cfg.model_type == "llama" and cfg.num_hidden_layers == 1


def test_load_config_missing_folder(tmp_path: Path) -> None:
    msg = _one_line_config_error(load_config, tmp_path / "nope")
    assert "does not exist" in msg


def test_load_config_folder_without_config(tmp_path: Path) -> None:
    msg = _one_line_config_error(load_config, tmp_path)
    assert "no config.json" in msg


def test_load_config_on_a_file_instead_of_a_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    _one_line_config_error(load_config, tmp_path / "config.json")


@pytest.mark.parametrize(
    "text",
    ["{not json", "", "[]", '"llama"', "{}", '{"model_type": "no_such_architecture"}'],
    ids=["bad json", "empty", "list", "string", "no model_type", "unknown model_type"],
)
def test_load_config_broken_config(tmp_path: Path, text: str) -> None:
    (tmp_path / "config.json").write_text(text)
    msg = _one_line_config_error(load_config, tmp_path)
    assert "config.json is not usable" in msg


def test_load_config_config_with_a_value_of_the_wrong_type(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": "wide"}))
    _one_line_config_error(load_config, tmp_path)


def test_tensor_index_lists_every_tensor(tiny_folder: Path) -> None:
    index = tensor_index(tiny_folder)
    assert "model.embed_tokens.weight" in index and "lm_head.weight" in index
    entry = index["model.embed_tokens.weight"]
    assert entry.shape == (260, 32) and entry.dtype == "F32"
    assert entry.end - entry.start == 260 * 32 * 4
    assert entry.end <= entry.file.stat().st_size


def test_tensor_index_without_safetensors(tmp_path: Path, tiny_folder: Path) -> None:
    folder = _copy(tiny_folder, tmp_path)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    msg = _one_line_config_error(tensor_index, folder)
    assert "no *.safetensors" in msg


def _header(obj: Any) -> bytes:
    raw = json.dumps(obj).encode()
    return struct.pack("<Q", len(raw)) + raw


CORRUPT = {
    "empty file": b"",
    "too short": b"abc",
    "huge header length": b"\xff" * 64,
    "header not json": struct.pack("<Q", 10) + b"not json!!",
    "header cut short": _header({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})[:30],
    "header not utf-8": struct.pack("<Q", 4) + b"\xff\xfe\xfd\xfc",
}


@pytest.mark.parametrize("content", list(CORRUPT.values()), ids=list(CORRUPT))
def test_tensor_index_corrupt_file(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ConfigError) as e:
        tensor_index(tmp_path)
    assert "\n" not in str(e.value) and "model.safetensors" in str(e.value)


CORRUPT_KNOWN_BUG = {
    "header is a list": _header([]),
    "entry is not an object": _header({"w": 1}),
    "entry without offsets": _header({"w": {"dtype": "F32", "shape": [1]}}),
}


@pytest.mark.parametrize("content", list(CORRUPT_KNOWN_BUG.values()), ids=list(CORRUPT_KNOWN_BUG))
def test_tensor_index_header_of_the_wrong_shape(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "model.safetensors").write_bytes(content)
    with pytest.raises(ConfigError):
        tensor_index(tmp_path)


def test_tensor_index_truncated_file(tmp_path: Path, tiny_folder: Path) -> None:
    folder = _copy(tiny_folder, tmp_path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError):
        tensor_index(folder)


# ---------------------------------------------------------------- fingerprint


def test_fingerprint_is_stable(tiny_folder: Path) -> None:
    first = fingerprint(tiny_folder)
    assert len(first) == 16 and first == fingerprint(tiny_folder)


def test_fingerprint_equal_for_a_copy(tiny_folder: Path, tmp_path: Path) -> None:
    assert fingerprint(_copy(tiny_folder, tmp_path)) == fingerprint(tiny_folder)


def test_fingerprint_equal_for_the_same_seed_saved_twice(tiny_folder: Path, tmp_path: Path) -> None:
    assert fingerprint(save_tiny_model("llama", tmp_path / "again", layers=1)) == fingerprint(tiny_folder)


def test_fingerprint_differs_for_another_seed(tiny_folder: Path, tmp_path: Path) -> None:
    assert fingerprint(save_tiny_model("llama", tmp_path / "seed1", seed=1, layers=1)) != fingerprint(
        tiny_folder
    )


@pytest.mark.parametrize(
    "tensor", ["model.embed_tokens.weight", "model.layers.0.self_attn.v_proj.weight", "lm_head.weight"]
)
@pytest.mark.parametrize("offset", [0, 37])
def test_fingerprint_changes_with_one_weight_byte(
    tiny_folder: Path, tmp_path: Path, tensor: str, offset: int
) -> None:
    # The fingerprint samples the first bytes of every tensor (never whole weights), so flip one there.
    folder = _copy(tiny_folder, tmp_path)
    entry = tensor_index(folder)[tensor]
    raw = bytearray(entry.file.read_bytes())
    raw[entry.start + offset] ^= 0x01  # the lowest mantissa bit of one float32
    entry.file.write_bytes(bytes(raw))
    assert fingerprint(folder) != fingerprint(tiny_folder)


@pytest.mark.parametrize(
    "key,value,changes",
    [
        ("rms_norm_eps", 1e-3, True),
        ("hidden_act", "gelu", True),
        ("num_attention_heads", 8, True),
        ("transformers_version", "0.0.1", False),  # does not change the computation
        ("use_cache", False, False),
        ("dtype", "bfloat16", False),  # the tensors' own dtypes enter through the index
    ],
)
def test_fingerprint_and_config_changes(
    tiny_folder: Path, tmp_path: Path, key: str, value: Any, changes: bool
) -> None:
    folder = _copy(tiny_folder, tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    assert key in raw and raw[key] != value
    raw[key] = value
    (folder / "config.json").write_text(json.dumps(raw, indent=2))
    assert (fingerprint(folder) != fingerprint(tiny_folder)) is changes


def test_fingerprint_of_a_broken_folder(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        fingerprint(tmp_path / "nope")
