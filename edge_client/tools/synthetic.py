"""Random-weight models built from configs, for benchmarks and tests: nothing is downloaded.

A byte-level tokenizer (256 byte tokens + <eos> + <pad>) makes the folder a complete Hugging Face
model folder that both sides of dlora accept.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with a 258-token vocabulary (no merges); ids 256 = <eos>, 257 = <pad>."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"], vocab["<pad>"] = 256, 257
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def llama_config(hidden: int, layers: int, heads: int, intermediate: int, vocab: int, kv_heads: int | None = None,
                 max_positions: int = 4096) -> LlamaConfig:
    """A LLaMA-shaped config (untied embeddings, SiLU MLP, RMSNorm, RoPE)."""
    return LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv_heads or heads, intermediate_size=intermediate, vocab_size=vocab,
                       max_position_embeddings=max_positions, tie_word_embeddings=False,
                       bos_token_id=256, eos_token_id=256, pad_token_id=257)


# The bench's default: LLaMA-shaped, ~34M parameters, a few seconds per step on 2 CPU cores.
BENCH_CONFIG = dict(hidden=512, layers=8, heads=8, intermediate=1376, vocab=8192)
# LLaMA-7B's shapes, for the GPU check.
LLAMA_7B_CONFIG = dict(hidden=4096, layers=32, heads=32, intermediate=11008, vocab=32000)


def write_random_model(config: PretrainedConfig, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                       device: str = "cpu") -> Path:
    """Write a seeded random-weight model folder (config, safetensors, byte tokenizer); reuse a complete one."""
    marker = path / ".dlora-synthetic.json"
    want = {"config": config.to_dict(), "seed": seed, "dtype": str(dtype)}
    if marker.is_file() and json.loads(marker.read_text()) == json.loads(json.dumps(want, default=str)):
        return path
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(str(path))
    byte_tokenizer().save_pretrained(str(path))
    marker.write_text(json.dumps(want, default=str))
    return path
