"""Tiny models of every supported family, built from configs with seeded weights; nothing downloaded."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    BloomConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PretrainedConfig,
    Qwen2Config,
)

from edge_client.tools.synthetic import byte_tokenizer

VOCAB = 260  # 256 byte tokens + <eos> + <pad>, rounded up
LAYERS = 3


def tiny_config(family: str, layers: int = LAYERS) -> PretrainedConfig:
    common = dict(vocab_size=VOCAB, bos_token_id=256, eos_token_id=256, pad_token_id=257)
    if family in ("llama", "mistral", "qwen2"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[family]
        return cls(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=family == "qwen2", **common)
    if family == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=48, num_hidden_layers=layers, num_attention_heads=4,
                         max_position_embeddings=128, word_embed_proj_dim=32, **common)
    if family == "bloom":
        return BloomConfig(hidden_size=32, n_layer=layers, n_head=4, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=32, n_layer=layers, n_head=4, n_positions=128, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=layers, num_attention_heads=4,
                             max_position_embeddings=128, tie_word_embeddings=False, **common)
    raise ValueError(family)


def save_tiny_model(family: str, path: Path, seed: int = 0, layers: int = LAYERS) -> Path:
    """Write a Hugging Face folder (config, safetensors, tokenizer) of a seeded tiny model."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, layers))
    with torch.no_grad():  # some families init norms/biases to constants; make every tensor informative
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias") or "ln_" in name:
                p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    return path


FAMILIES = ("llama", "mistral", "qwen2", "opt", "bloom", "gpt2", "gpt_neox")
