"""Attention temperature: softmax(attention logits / τ) on chosen decoder layers (ASU's teacher).

Why scaling the query alone is exact. An attention layer's logits are s_ij = c · (R_i q_i)·(R_j k_j)
with c its scale (1/√d, or Gemma's `query_pre_attn_scalar`) and R the rotary embedding. R is a
linear map, so replacing q by q/τ gives s_ij/τ for every pair (i, j), whatever happens before
(bias, head split) or after (GQA key sharing, KV cache; masked keys get zero weight either way).
Keys and values are untouched, so keys already in a generation cache stay valid, and every
attention backend (eager, SDPA, flash-attention) sees an ordinary query: nothing in the modeling
code is copied or patched. The query is scaled at the module that produces it last: the `q_proj` output, the
`q_norm` output for models that renormalise queries (OLMo-2, Qwen3; scaling before the norm would
be undone), or the query slice of a fused `qkv_proj` (Phi-3 keeps q | k | v contiguous).

Soft-capped models (Gemma-2) compute cap · tanh(s / cap). With the query scaled, s becomes s/τ;
using cap/τ as the cap for that layer gives (cap/τ) · tanh((s/τ) / (cap/τ)) = cap · tanh(s/cap) / τ,
again exactly the original logits divided by τ. The cap is changed per layer: on the attention
module's own `attn_logit_softcapping` where it has one (transformers 5.x) or, where the module
reads the config shared by all layers (4.45), on a private copy of the config given to that
module only and taken back on removal.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, self_attention, unwrap_model

SUPPORTED = (
    "Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma, Gemma-2, OLMo-2 and other decoder-only models "
    "whose attention has a `q_proj` (optionally followed by `q_norm`) or a Phi-3-style "
    "contiguous `qkv_proj`"
)
_SOFTCAP = "attn_logit_softcapping"


def _check_temperature(temperature) -> float:
    message = (
        f"attention temperature τ must be a finite number > 0 (got {temperature!r}); "
        "τ > 1 smooths attention, τ = 1 leaves the model unchanged"
    )
    if isinstance(temperature, bool):
        raise ValueError(message)
    try:
        value = float(temperature)
    except (TypeError, ValueError):
        raise ValueError(message) from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(message)
    return value


def _query_site(attn: nn.Module, model: nn.Module) -> tuple[nn.Module, int | None]:
    """The module whose output is the final query, and the query width if that output is fused."""
    q_norm = getattr(attn, "q_norm", None)
    if isinstance(q_norm, nn.Module):
        return q_norm, None
    q_proj = getattr(attn, "q_proj", None)
    if isinstance(q_proj, nn.Module):
        return q_proj, None
    qkv = getattr(attn, "qkv_proj", None)
    if isinstance(qkv, nn.Module):  # any wrapper (LoRA, quantised) that keeps `out_features`
        config = getattr(attn, "config", None)
        config = model.config if config is None else config
        head_dim = getattr(attn, "head_dim", None)
        n_heads = getattr(attn, "num_heads", None) or getattr(config, "num_attention_heads", None)
        n_kv = (
            getattr(attn, "num_key_value_heads", None)
            or getattr(config, "num_key_value_heads", None)
            or n_heads
        )
        width = getattr(qkv, "out_features", None)
        if head_dim and n_heads and n_kv and width == (n_heads + 2 * n_kv) * head_dim:
            return qkv, n_heads * head_dim
    raise TypeError(
        f"{type(model).__name__}: cannot find the query projection of {type(attn).__name__} "
        f"(looked for q_norm, q_proj, qkv_proj), so the attention temperature cannot be applied. "
        f"Supported: {SUPPORTED}."
    )


class AttentionTemperature:
    """Handle on an attached attention temperature; see `attention_temperature`.

    Attributes:
      temperature: τ.
      layers: the tempered decoder layers (sorted 0-based ids).
      active: True while the temperature is in effect (False inside `paused()` and after
        `remove()`).
    """

    def __init__(self, model: nn.Module, temperature: float, layers: list[int]):
        self.temperature = temperature
        self.layers = layers
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (attention module, attribute name, original value, tempered value)
        self._softcaps: list[tuple[nn.Module, str, object, object]] = []
        self._pause_depth = 0
        self._removed = False
        if temperature != 1.0:  # τ = 1 attaches nothing, so the model stays bit-for-bit identical
            self._attach()

    # -- attaching ------------------------------------------------------------------------------
    def _attach(self) -> None:
        all_layers = decoder_layers(self._model)
        sites = []
        for layer_id in self.layers:
            try:
                attn = self_attention(all_layers[layer_id])
            except TypeError:
                raise TypeError(
                    f"{type(self._model).__name__}: decoder layer {layer_id} "
                    f"({type(all_layers[layer_id]).__name__}) has no self-attention module. "
                    f"Supported: {SUPPORTED}."
                ) from None
            sites.append((attn, *_query_site(attn, self._model)))
        # Everything is checked before anything is changed, so a failure leaves the model as it was.
        for attn, module, query_width in sites:
            self._handles.append(module.register_forward_hook(self._query_hook(query_width)))
            self._plan_softcap(attn)
        self._apply_softcaps(tempered=True)

    def _query_hook(self, query_width: int | None):
        def scale_query(module, args, output):
            if self._pause_depth:
                return None
            if query_width is None:
                return output / self.temperature
            return torch.cat(
                (output[..., :query_width] / self.temperature, output[..., query_width:]), dim=-1
            )

        return scale_query

    def _plan_softcap(self, attn: nn.Module) -> None:
        if vars(attn).get(_SOFTCAP) is not None:  # newer transformers: a per-module attribute
            cap = vars(attn)[_SOFTCAP]
            self._softcaps.append((attn, _SOFTCAP, cap, cap / self.temperature))
            return
        config = vars(attn).get("config")
        cap = getattr(config, _SOFTCAP, None) if config is not None else None
        if cap is not None:  # older ones read the config shared by all layers: give this one a copy
            tempered = copy.copy(config)
            setattr(tempered, _SOFTCAP, cap / self.temperature)
            self._softcaps.append((attn, "config", config, tempered))

    def _apply_softcaps(self, tempered: bool) -> None:
        for attn, name, original, new in self._softcaps:
            setattr(attn, name, new if tempered else original)

    # -- public API -----------------------------------------------------------------------------
    @property
    def active(self) -> bool:
        return not self._removed and self._pause_depth == 0

    def remove(self) -> None:
        """Detach everything; the model is exactly the original again. Safe to call twice."""
        if self._removed:
            return
        self._removed = True
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._apply_softcaps(tempered=False)
        self._softcaps.clear()

    @contextmanager
    def paused(self) -> Iterator[AttentionTemperature]:
        """Inside, the model runs exactly untempered (τ = 1); the temperature returns on exit."""
        self._pause_depth += 1
        if self._pause_depth == 1:
            self._apply_softcaps(tempered=False)
        try:
            yield self
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and not self._removed:
                self._apply_softcaps(tempered=True)

    def __enter__(self) -> AttentionTemperature:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "removed" if self._removed else ("paused" if self._pause_depth else "active")
        return (
            f"AttentionTemperature(temperature={self.temperature}, layers={self.layers}, {state})"
        )


def attention_temperature(
    model: nn.Module, temperature: float, layers: Iterable[int] | int | None = None
) -> AttentionTemperature:
    """Divide the attention logits of the chosen decoder layers by `temperature`, starting now.

    Every selected layer then computes softmax(logits / τ) with logits its own attention scores
    (QKᵀ scaled, soft-capped where the model soft-caps); projections, MLPs and norms are
    untouched. Works with any attention backend, with a KV cache and under `generate`.

    Args:
      model: a causal LM, possibly wrapped by DDP / DeepSpeed / accelerate.
      temperature: τ > 0; τ > 1 smooths attention (ASU uses 2.0-2.8), τ = 1 changes nothing.
      layers: 0-based decoder layer ids, one id, or None for every layer.

    Returns a handle: use it as a context manager (`with attention_temperature(m, 2.3): ...`),
    or keep it and call `.remove()`; `with handle.paused(): ...` runs the original model.
    """
    temperature = _check_temperature(temperature)
    model = unwrap_model(model)
    ids = resolve_layer_ids(layers, len(decoder_layers(model)))
    if not ids:
        warnings.warn(
            "attention_temperature: an empty layer list tempers no layer (use None for all layers)",
            stacklevel=2,
        )
    return AttentionTemperature(model, temperature, ids)
