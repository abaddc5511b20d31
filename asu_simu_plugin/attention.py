"""Attention temperature: softmax(attention logits / τ) on chosen decoder layers (ASU's teacher).

What "attention temperature" means here, exactly: every head of a tempered layer computes
softmax(s / τ + m), with s the logits the layer would feed its softmax (QKᵀ times the layer's own
scale — 1/√d, Gemma's `query_pre_attn_scalar`^-½, Granite's `attention_multiplier` — and then
soft-capped where the model soft-caps) and m the causal/padding mask. Dividing the logits after
the soft-cap keeps the definition of docs/algorithms.md §1.1 (α(τ) = softmax(logits / τ)) for
every model: τ = 1 is the original layer, τ → ∞ uniform attention over the visible keys, and a
soft-capped model tempered by τ is exactly as smooth as an uncapped one with the same logits.

Two routes, both exact, checked against an explicit computation on every architecture in the
test-suite:

1. **The module's own scale** (transformers >= 4.48 for most models, later for some: GPT-2 and
   StableLM modules carry it in 5.x but not in 4.51): attention modules that carry `scaling`
   pass it to whichever backend runs (eager multiplies by it, SDPA gets it as `scale`, flash
   attention as `softmax_scale`, flex as `scale`), so `scaling / τ` gives s/τ everywhere.
2. **The query** (transformers 4.45, and modules without `scaling`): logits are s_ij =
   c · (R_i q_i)·(R_j k_j) with R the rotary embedding, a linear map, so replacing q by q/τ gives
   s_ij/τ for every pair whatever happens before (bias, head split) or after (GQA key sharing,
   KV cache). Keys and values are untouched, so a generation cache stays valid. The query is
   scaled where it is produced last: the `q_proj` output, the `q_norm` output for models that
   renormalise queries (OLMo-2, Qwen3; scaling before the norm would be undone), or the query
   entries of a fused projection (`arch.query_site` knows the layouts).

Soft-capped models (Gemma-2/3) compute cap · tanh(s / cap). With s become s/τ, using cap/τ as the
cap for that layer gives (cap/τ) · tanh((s/τ) / (cap/τ)) = cap · tanh(s/cap) / τ: again exactly the
capped logits divided by τ. The cap is changed per layer: on the attention module's own
`attn_logit_softcapping` where it has one (transformers 5.x) or, where the module reads the
config shared by all layers (4.45), on a private copy of the config given to that module only.

OLMo v1 with `clip_qkv` clamps q, k and v right after their projections, so on the query route
q/τ would be clamped at a different bound. There the clamp itself moves into hooks: the module gets
a private copy of its config without `clip_qkv`, hooks on q_proj, k_proj, v_proj clamp their
outputs to the same bound, and the query is scaled after its clamp: exactly clamp(q)/τ.

Where neither route is exact (ALiBi biases or attention sinks added to the logits, an unknown
fused layout) a TypeError names the model class; nothing is changed then. Every changed attribute is restored by `remove()` and inside `paused()`.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import transformers
from packaging import version
from torch import nn

from asu_simu_plugin.arch import (
    QUERY_SITES,
    clipped_projections,
    decoder_layers,
    query_site,
    resolve_layer_ids,
    self_attention,
    unwrap_model,
)

SUPPORTED = (
    "decoder-only models whose attention modules carry their own `scaling` (transformers >= "
    "4.48: Llama, Mistral, Qwen2/3, Gemma 1-3, Phi-3, OLMo-2, Granite, Cohere, StarCoder2, "
    f"GPT-NeoX, ...; GPT-2 in 5.x), and otherwise those with a query at {QUERY_SITES}"
)
_SOFTCAP = "attn_logit_softcapping"
# transformers 4.48 moved every attention backend behind `attention_interface(..., scaling=)`.
SCALING_ROUTE = version.parse(transformers.__version__) >= version.parse("4.48.0")


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


def _own_scaling(attn: nn.Module, model: nn.Module) -> float | None:
    """The module's `scaling` if the scaling route applies to it, else None."""
    scaling = vars(attn).get("scaling")
    if not SCALING_ROUTE or isinstance(scaling, bool) or not isinstance(scaling, int | float):
        return None
    config = vars(attn).get("config", getattr(model, "config", None))
    if getattr(config, "alibi", False) or getattr(attn, "sinks", None) is not None:
        raise TypeError(
            f"{type(model).__name__}: its attention adds ALiBi biases or attention sinks to the "
            "logits, which a smaller scale does not divide, so the temperature cannot be exact"
        )
    return float(scaling)


class AttentionTemperature:
    """Handle on an attached attention temperature; see `attention_temperature`.

    Attributes:
      temperature: τ.
      layers: the tempered decoder layers (sorted 0-based ids).
      routes: layer id -> "scaling" (the module's own scale was divided) or "query".
      active: True while the temperature is in effect (False inside `paused()` and after
        `remove()`).
    """

    def __init__(self, model: nn.Module, temperature: float, layers: list[int]):
        self.temperature = temperature
        self.layers = layers
        self._model = model
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # (attention module, attribute name, original value, tempered value): scale, soft-cap and
        # a private config (soft-cap, clip_qkv) for modules that read the shared one
        self._attributes: list[tuple[nn.Module, str, object, object]] = []
        self.routes: dict[int, str] = {}  # layer id -> "scaling" or "query"
        self._pause_depth = 0
        self._removed = False
        if temperature != 1.0:  # τ = 1 attaches nothing, so the model stays bit-for-bit identical
            self._attach()

    # -- attaching ------------------------------------------------------------------------------
    def _attach(self) -> None:
        all_layers = decoder_layers(self._model)
        plans = []
        for layer_id in self.layers:
            try:
                attn = self_attention(all_layers[layer_id])
            except TypeError:
                raise TypeError(
                    f"{type(self._model).__name__}: decoder layer {layer_id} "
                    f"({type(all_layers[layer_id]).__name__}) has no self-attention module. "
                    f"Supported: {SUPPORTED}."
                ) from None
            scaling = _own_scaling(attn, self._model)
            if scaling is not None:
                plans.append((layer_id, attn, None, None))
            else:
                plans.append((layer_id, attn, *query_site(attn, self._model)))
        # Everything is checked before anything is changed, so a failure leaves the model as it was.
        for layer_id, attn, module, query_mask in plans:
            if module is None:
                scaling = vars(attn)["scaling"]
                self._attributes.append((attn, "scaling", scaling, scaling / self.temperature))
                self.routes[layer_id] = "scaling"
            else:
                clipped = clipped_projections(attn)
                if clipped is not None:  # clamp in hooks first, so the scale follows the clamp
                    clip, projections = clipped
                    for projection in projections:
                        hook = self._clamp_hook(clip)
                        self._handles.append(projection.register_forward_hook(hook))
                    self._private_config(attn, clip_qkv=None)
                self._handles.append(module.register_forward_hook(self._query_hook(query_mask)))
                self.routes[layer_id] = "query"
            self._plan_softcap(attn)
        self._apply_attributes(tempered=True)

    def _query_hook(self, query_mask: torch.Tensor | None):
        def scale_query(module, args, output):
            if self._pause_depth:
                return None
            if query_mask is None:
                return output / self.temperature
            mask = query_mask.to(output.device)
            return torch.where(mask, output / self.temperature, output)

        return scale_query

    def _clamp_hook(self, clip: float):
        def clamp(module, args, output):
            return None if self._pause_depth else output.clamp(min=-clip, max=clip)

        return clamp

    def _private_config(self, attn: nn.Module, **changes) -> None:
        """Give `attn` its own copy of the config it reads, with `changes` (one copy per module)."""
        for entry in self._attributes:
            if entry[0] is attn and entry[1] == "config":
                tempered = entry[3]
                break
        else:
            tempered = copy.copy(vars(attn)["config"])
            self._attributes.append((attn, "config", vars(attn)["config"], tempered))
        for name, value in changes.items():
            setattr(tempered, name, value)

    def _plan_softcap(self, attn: nn.Module) -> None:
        if vars(attn).get(_SOFTCAP) is not None:  # newer transformers: a per-module attribute
            cap = vars(attn)[_SOFTCAP]
            self._attributes.append((attn, _SOFTCAP, cap, cap / self.temperature))
            return
        config = vars(attn).get("config")
        cap = getattr(config, _SOFTCAP, None) if config is not None else None
        if cap is not None:  # older ones read the config shared by all layers: give this one a copy
            self._private_config(attn, **{_SOFTCAP: cap / self.temperature})

    def _apply_attributes(self, tempered: bool) -> None:
        for attn, name, original, new in self._attributes:
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
        self._apply_attributes(tempered=False)
        self._attributes.clear()

    @contextmanager
    def paused(self) -> Iterator[AttentionTemperature]:
        """Inside, the model runs exactly untempered (τ = 1); the temperature returns on exit."""
        self._pause_depth += 1
        if self._pause_depth == 1:
            self._apply_attributes(tempered=False)
        try:
            yield self
        finally:
            self._pause_depth -= 1
            if self._pause_depth == 0 and not self._removed:
                self._apply_attributes(tempered=True)

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
