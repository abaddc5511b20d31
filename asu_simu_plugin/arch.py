"""Where things live inside a causal LM: the one place that knows module paths.

Every part of the plugin that touches model internals (attention temperature, neuron
attribution, SIMU parameter selection) goes through these helpers, so supporting a new
architecture means changing this file only.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

# Attribute paths from a *ForCausalLM to its list of decoder layers, tried in order.
_LAYER_PATHS = (
    ("model", "layers"),  # Llama, Mistral, Qwen2/3, Phi-3, Gemma/Gemma-2, OLMo v1/OLMo-2
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


def resolve_layer_ids(layers, num_layers: int) -> list[int]:
    """Validate 0-based layer ids; `None` means every layer. Returns a sorted, unique list.

    Only integers are accepted (a list of them, or one): a string such as ``"15"`` would
    otherwise be read character by character as layers 1 and 5, and ``2.5`` truncated to 2.
    """
    if layers is None:
        return list(range(num_layers))
    items = [layers] if _is_integer(layers) else layers
    if isinstance(layers, str | bytes) or not isinstance(items, Iterable):
        raise ValueError(
            f"layers must be null/None (all layers), an integer or a list of integers "
            f"(got {layers!r}); e.g. layers=[0,1,2]"
        )
    items = list(items)
    bad_type = [i for i in items if not _is_integer(i)]
    if bad_type:
        raise ValueError(
            f"layer ids must be integers (got {bad_type!r} in {layers!r}); "
            "write them as numbers, e.g. layers=[0,1,2]"
        )
    ids = sorted({int(i) for i in items})
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"unknown layer id(s) {bad}: this model has {num_layers} decoder layers, "
            f"valid ids are 0..{num_layers - 1} (0-based; use null/None for all layers)"
        )
    return ids


def _is_integer(value) -> bool:
    """int or an integer-valued numpy/torch scalar; never bool, float or str."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    dtype = getattr(value, "dtype", None)
    shape = getattr(value, "shape", None)
    if dtype is None or shape not in ((), torch.Size([])):
        return False
    return not getattr(dtype, "is_floating_point", False) and "int" in str(dtype)


def self_attention(layer: nn.Module) -> nn.Module:
    """The self-attention module of one decoder layer."""
    for name in ("self_attn", "attn", "attention", "self_attention"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(layer).__name__}: no self-attention module found")


QUERY_SITES = (
    "`q_norm`/`q_layernorm` after the query projection (OLMo-2, Qwen3, Cohere), `q_proj`, a "
    "contiguous fused q|k|v (`qkv_proj` of Phi-3, `c_attn` of GPT-2), or a per-head fused "
    "`query_key_value` (GPT-NeoX, Falcon)"
)


def query_site(attn: nn.Module, model: nn.Module) -> tuple[nn.Module, torch.Tensor | None]:
    """The module whose output is the attention's final query, and which outputs are query.

    Returns `(module, mask)`: `mask` is None when the whole output is the query, else a bool
    vector over the output's last dimension marking the query entries of a fused q/k/v output.
    Raises TypeError (naming the model) where scaling the query would not temper exactly.
    """
    name = type(model).__name__
    config = vars(attn).get("config")
    config = getattr(model, "config", None) if config is None else config
    if getattr(config, "alibi", False) or getattr(attn, "sinks", None) is not None:
        raise TypeError(
            f"{name}: its attention adds ALiBi biases or attention sinks to the logits, which a "
            "scaled query does not divide, so the attention temperature cannot be exact there"
        )
    if getattr(config, "clip_qkv", None) is not None and clipped_projections(attn) is None:
        raise TypeError(
            f"{name}: clip_qkv clamps the query after its projection, so scaling the query is not "
            "exact; use transformers >= 4.48, whose attention `scaling` is tempered instead"
        )
    for norm in ("q_norm", "q_layernorm"):  # renormalised queries: scale after the norm
        if isinstance(getattr(attn, norm, None), nn.Module):
            return getattr(attn, norm), None
    if isinstance(getattr(attn, "q_proj", None), nn.Module):
        return attn.q_proj, None
    heads = getattr(attn, "num_heads", None) or getattr(attn, "num_attention_heads", None)
    heads = heads or getattr(config, "num_attention_heads", None)
    head_dim = getattr(attn, "head_dim", None) or getattr(attn, "head_size", None)
    for fused in ("qkv_proj", "c_attn", "query_key_value"):
        module = getattr(attn, fused, None)
        if not isinstance(module, nn.Module) or getattr(attn, "is_cross_attention", False):
            continue
        # Out width of Linear, of GPT-2's Conv1D (`nf`), or of a wrapper that keeps either.
        width = getattr(module, "out_features", None) or getattr(module, "nf", None)
        if not (heads and head_dim and width):
            break
        mask = _fused_query_mask(attn, config, fused, heads, head_dim, width)
        if mask is not None:
            return module, mask
        break
    raise TypeError(
        f"{name}: cannot find the query of {type(attn).__name__}, so the attention temperature "
        f"cannot be applied exactly. Supported: attention modules with their own `scaling` "
        f"(transformers >= 4.48), or a query at {QUERY_SITES}."
    )


def clipped_projections(attn: nn.Module) -> tuple[float, tuple[nn.Module, ...]] | None:
    """`(clip, (q_proj, k_proj, v_proj))` where the attention clamps its query, key and value to
    [-clip, clip] right after these projections, reading `clip` from its own `config.clip_qkv`
    (OLMo v1); None where nothing is clamped or the layout is another. A hook can then do the
    clamp itself (on a private config without it) and scale the clamped query exactly."""
    config = vars(attn).get("config")
    clip = getattr(config, "clip_qkv", None)
    projections = tuple(getattr(attn, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if clip is None or not all(isinstance(p, nn.Module) for p in projections):
        return None
    return float(clip), projections


def _fused_query_mask(attn, config, fused, heads, head_dim, width) -> torch.Tensor | None:
    """Which entries of a fused q/k/v projection output are the query (None: unknown layout)."""
    kv_heads = (
        getattr(attn, "num_key_value_heads", None)
        or getattr(attn, "num_kv_heads", None)
        or getattr(config, "num_key_value_heads", None)
        or heads
    )
    if fused == "query_key_value":
        if getattr(attn, "new_decoder_architecture", False):
            # Falcon-40B style: per kv group, its query heads, then one key, one value
            group = [True] * (heads // kv_heads) + [False, False]
            layout = group * kv_heads
        elif getattr(attn, "multi_query", False):
            layout = [True] * heads + [False, False]  # Falcon-7B: q heads | k | v
        else:
            layout = [True, False, False] * heads  # GPT-NeoX, Falcon: per head q | k | v
        if len(layout) * head_dim != width:
            return None
        return torch.tensor(layout).repeat_interleave(head_dim)
    # Contiguous q | k | v (Phi-3 `qkv_proj`, GPT-2 `c_attn`, GPT-BigCode's multi-query `c_attn`).
    query = heads * head_dim
    if width not in (query + 2 * kv_heads * head_dim, query + 2 * head_dim, 3 * query):
        return None
    mask = torch.zeros(width, dtype=torch.bool)
    mask[:query] = True
    return mask


def mlp(layer: nn.Module) -> nn.Module:
    """The MLP (feed-forward) module of one decoder layer."""
    for name in ("mlp", "feed_forward", "ffn"):
        module = getattr(layer, name, None)
        if isinstance(module, nn.Module):
            return module
    raise TypeError(f"{type(layer).__name__}: no MLP module found")


def down_projection(layer: nn.Module) -> nn.Linear:
    """The MLP output projection whose *input* is the intermediate activation (SIMU's neurons).

    Gated MLPs (Llama, Mistral, Qwen2, OLMo v1 and 2, Gemma) and fused gate/up (Phi-3) all name it
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


def sliding_window(model: nn.Module) -> int | None:
    """The model's sliding attention window in tokens, or None when attention is global."""
    config = unwrap_model(model).config
    if getattr(config, "use_sliding_window", True) is False:  # Qwen2 keeps a window it ignores
        return None
    window = getattr(config, "sliding_window", None)
    return int(window) if window else None


def key_value_cache(record: bool = False):
    """An empty transformers `DynamicCache` for one forward. With `record`, each layer's keys
    and values of that forward are also kept as `cache.recorded[layer_idx] = (keys, values)`
    (the layout the model's attention stores, whatever the transformers version)."""
    from transformers import DynamicCache

    if not record:
        return DynamicCache()

    class RecordingCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.recorded[layer_idx] = (key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    cache = RecordingCache()
    cache.recorded = {}
    return cache


def cache_argument(model: nn.Module, cache) -> dict:
    """Keyword arguments passing `cache` to the model's forward (transformers 5.x renamed
    `past_key_values` to `cache`)."""
    import inspect

    parameters = inspect.signature(unwrap_model(model).forward).parameters
    return {"cache" if "cache" in parameters else "past_key_values": cache, "use_cache": True}
