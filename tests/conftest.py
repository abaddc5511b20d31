"""Shared fixtures: tiny models of every supported architecture and a BPE tokenizer, all offline."""

from __future__ import annotations

import os

import pytest
import torch
import transformers
from packaging import version

from asu_simu_plugin import toy

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

TRANSFORMERS_VERSION = version.parse(transformers.__version__)
VOCAB = 600

_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)

# arch -> (config class, model class, extra config kwargs, first transformers version having it)
ARCHITECTURES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, "4.45.1"),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 64}, "4.45.1"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, "4.45.1"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {"pad_token_id": 3}, "4.45.1"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {"head_dim": 8}, "4.45.1"),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {
            "head_dim": 8,
            "attn_logit_softcapping": 5.0,
            "final_logit_softcapping": 30.0,
            "query_pre_attn_scalar": 12,
            "sliding_window": 64,
        },
        "4.45.1",
    ),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "4.47.0"),
}


def architecture_available(arch: str) -> bool:
    return TRANSFORMERS_VERSION >= version.parse(ARCHITECTURES[arch][3])


def tiny_causal_lm(arch: str = "llama", attn_implementation: str = "eager", seed: int = 0, **cfg):
    """A randomly initialised, few-thousand-parameter model of `arch`, fp32, eval mode."""
    if not architecture_available(arch):
        pytest.skip(f"{arch} needs transformers >= {ARCHITECTURES[arch][3]}")
    config_name, model_name, extra, _ = ARCHITECTURES[arch]
    kwargs = {**_COMMON, **extra, **cfg}
    config = getattr(transformers, config_name)(**kwargs)
    config._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = getattr(transformers, model_name)(config)
    return model.eval()


@pytest.fixture(scope="session")
def toy_authors():
    return toy.make_authors(12, seed=0)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_authors):
    return toy.build_tokenizer(toy.corpus_texts(toy_authors), vocab_size=VOCAB)


@pytest.fixture
def tiny_llama():
    return tiny_causal_lm("llama")
