"""Shared fixtures: tiny models of every supported architecture and a BPE tokenizer, all offline."""

from __future__ import annotations

import json
import os

import pytest
import torch
import transformers
from packaging import version
from transformers import LlamaForCausalLM

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
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}, "4.45.1"),
    # OLMo v1 clamping q, k, v after their projections (OLMo-7B-0424 sets 8.0; 1.0 clamps here)
    "olmo_clip": ("OlmoConfig", "OlmoForCausalLM", {"clip_qkv": 1.0}, "4.45.1"),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, "4.47.0"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}, "4.51.0"),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 8,
            "attn_logit_softcapping": 5.0,
            "query_pre_attn_scalar": 12,
            "sliding_window": 64,
        },
        "4.50.0",
    ),
    "granite": (
        "GraniteConfig",
        "GraniteForCausalLM",
        {"attention_multiplier": 0.3, "embedding_multiplier": 2.0, "logits_scaling": 2.0},
        "4.45.1",
    ),
    "cohere": (
        "CohereConfig",
        "CohereForCausalLM",
        {"use_qk_norm": True, "logit_scale": 1.0},
        "4.45.1",
    ),
    "starcoder2": ("Starcoder2Config", "Starcoder2ForCausalLM", {"sliding_window": 64}, "4.45.1"),
    "phi": ("PhiConfig", "PhiForCausalLM", {"partial_rotary_factor": 0.5}, "4.45.1"),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", {"partial_rotary_factor": 0.5}, "4.45.1"),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {"rotary_pct": 0.5}, "4.45.1"),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_positions": 128}, "4.45.1"),
    "falcon": ("FalconConfig", "FalconForCausalLM", {}, "4.45.1"),  # multi-query, fused qkv
    "falcon_new": (
        "FalconConfig",
        "FalconForCausalLM",
        {"new_decoder_architecture": True, "num_kv_heads": 2},  # grouped per-kv-head qkv layout
        "4.45.1",
    ),
}
# Those with a gated MLP ending in `down_proj` (what SIMU's neuron attribution needs).
GATED_MLP_ARCHITECTURES = (
    "llama", "mistral", "qwen2", "phi3", "gemma", "gemma2", "olmo", "olmo_clip", "olmo2", "qwen3",
    "gemma3", "granite", "cohere", "stablelm",
)  # fmt: skip


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


@pytest.fixture(scope="module")
def single_thread():
    """Models this small gain nothing from intra-op threads and lose a lot on a busy machine
    (modules opt in with `pytestmark = pytest.mark.usefixtures("single_thread")`)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def files(tmp_path, toy_authors, toy_tokenizer):
    """(model folder, forget.jsonl, retain.jsonl): a saved tiny Llama and toy QA files for the
    command-line tests."""
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    LlamaForCausalLM(toy.tiny_llama_config(len(toy_tokenizer))).save_pretrained(model_dir)
    toy_tokenizer.save_pretrained(model_dir)
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.jsonl"
    forget.write_text("\n".join(json.dumps(qa) for qa in toy_authors[0].qa_pairs()))
    retain.write_text("\n".join(json.dumps(qa) for a in toy_authors[1:3] for qa in a.qa_pairs()))
    return model_dir, forget, retain


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a command loads model weights (the checks must come first)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
