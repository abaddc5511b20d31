"""Where things live inside a causal LM: the one place that knows module paths.

Every part of the plugin that touches model internals (attention temperature, neuron
attribution, SIMU parameter selection) goes through these helpers, so supporting a new
architecture means changing this file only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from torch import nn

# Attribute paths from a *ForCausalLM to its list of decoder layers, tried in order.
_LAYER_PATHS = (
    ("model", "layers"),  # Llama, Mistral, Qwen2/3, Phi-3, Gemma/Gemma-2, OLMo/OLMo-2
    ("model", "language_model", "layers"),  # multimodal wrappers (transformers >= 4.52)
    ("transformer", "h"),  # GPT-2 / GPT-J style
    ("gpt_neox", "layers"),
    ("model", "decoder", "layers"),  # OPT
)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / DeepSpeed / accelerate wrappers (they all keep the real model in `.module`)."""
    while not hasattr(model, "config") and isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, in order (0-based ids index this list)."""
    model = unwrap_model(model)
    for path in _LAYER_PATHS:
        obj = model
        for name in path:
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.ModuleList) and len(obj) > 0:
            return obj
    raise TypeError(
        f"{type(model).__name__}: cannot find its decoder layers (looked for "
        + ", ".join(".".join(p) for p in _LAYER_PATHS)
        + "). Supported: Llama, Mistral, Qwen2, Phi-3, Gemma, Gemma-2, OLMo-2 and other "
        "decoder-only models that keep their layers in `model.layers`."
    )


def resolve_layer_ids(layers: Iterable[int] | None, num_layers: int) -> list[int]:
    """Validate 0-based layer ids; `None` means every layer. Returns a sorted, unique list."""
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, int):
        layers = [layers]
    ids = sorted({int(i) for i in layers})
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"unknown layer id(s) {bad}: this model has {num_layers} decoder layers, "
            f"valid ids are 0..{num_layers - 1} (0-based; use null/None for all layers)"
        )
    return ids


def self_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer."""
    for name in ("self_attn", "attn", "attention", "self_attention"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(layer).__name__}: no self-attention module found")


def mlp(layer: nn.Module) -> nn.Module:
    """The MLP (feed-forward) module of one decoder layer."""
    for name in ("mlp", "feed_forward", "ffn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(layer).__name__}: no MLP module found")


def down_projection(layer: nn.Module) -> nn.Linear:
    """The MLP output projection whose *input* is the intermediate activation (SIMU's neurons).

    Gated MLPs (Llama, Mistral, Qwen2, OLMo-2, Gemma) and fused gate/up (Phi-3) all name it
    `down_proj`; anything else is refused with the class name so the user knows what is missing.
    """
    block = mlp(layer)
    proj = getattr(block, "down_proj", None)
    if not isinstance(proj, nn.Linear):
        raise TypeError(
            f"{type(block).__name__}: SIMU needs a gated MLP with a `down_proj` linear layer "
            "(Llama, Mistral, Qwen2, Phi-3, Gemma, OLMo-2); this MLP has none"
        )
    return proj


def attention_projection_names(model: nn.Module) -> list[str]:
    """Fully qualified names of every attention projection parameter (q, k, v, o, fused qkv).

    Norms inside the attention block (OLMo-2 / Qwen3 q_norm, k_norm) are not projections.
    """
    model = unwrap_model(model)
    names: list[str] = []
    for layer in decoder_layers(model):
        attn = self_attention(layer)
        prefix = _qualified_name(model, attn)
        for module_name, module in attn.named_modules():
            if isinstance(module, nn.Linear):
                for pname, _ in module.named_parameters(recurse=False):
                    names.append(".".join(filter(None, (prefix, module_name, pname))))
    return names


def _qualified_name(root: nn.Module, target: nn.Module) -> str:
    for name, module in root.named_modules():
        if module is target:
            return name
    raise LookupError("module is not part of the model")


def is_no_decay_parameter(name: str, param: nn.Parameter) -> bool:
    """Norm weights and biases get no weight decay (the usual transformer convention)."""
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith(".bias") or "norm" in lowered


def parameter_names(model: nn.Module, params: Sequence[nn.Parameter]) -> list[str]:
    ids = {id(p): n for n, p in unwrap_model(model).named_parameters()}
    return [ids[id(p)] for p in params]
