"""LoRA: one set of base weights serves the student, the frozen reference and ASU's teacher.

With LoRA the base weights never change, so "the model before unlearning" is the same model with
its adapters switched off (peft's `disable_adapter()`); no second copy is needed. This module
holds that view (`FrozenReference`), the peft model class our `LoRACausalLM` handler returns
(its `save_pretrained` writes a plain merged model by default), and the helpers to tell a LoRA
model from a full one. peft is imported only when a LoRA model is actually built.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

import torch
from torch import nn

PEFT_INSTALL_HINT = "pip install asu-simu-plugin[peft]"
SAVE_MODES = ("merged", "adapter")
# The official ASU code's LoRA settings; "all-linear" = every linear layer but the output head.
DEFAULTS = {"r": 8, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}


def require_peft():
    try:
        # peft 0.21 reads `torch.distributed.tensor` without importing it; newer transformers
        # import it for us, 4.45 does not.
        import torch.distributed.tensor  # noqa: F401
    except ImportError:  # torch builds without distributed support
        pass
    try:
        import peft
    except ImportError as error:
        raise ImportError(
            f"LoRA needs the peft package, which is not installed ({error}); install it with "
            f"`{PEFT_INSTALL_HINT}`"
        ) from error
    return peft


def peft_model_of(model: nn.Module):
    """The peft model inside DDP / DeepSpeed / accelerate wrappers, or None for a full model."""
    peft = sys.modules.get("peft")  # a peft model cannot exist unless peft was imported
    if peft is None:
        return None
    while not isinstance(model, peft.PeftModel):
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module) or inner is model:
            return None
        model = inner
    return model


def is_lora_model(model: nn.Module) -> bool:
    return peft_model_of(model) is not None


@contextlib.contextmanager
def adapters_disabled(peft_model) -> Iterator[nn.Module]:
    """The base model as loaded: adapters off and every module in eval mode (as a frozen copy
    would be: no dropout, no gradient checkpointing); both are restored on exit."""
    modes = [(module, module.training) for module in peft_model.modules()]
    peft_model.eval()
    try:
        with peft_model.disable_adapter():
            yield peft_model
    finally:
        for module, training in modes:
            module.training = training


class FrozenReference(nn.Module):
    """The original model of a LoRA student, without a copy: calling it runs the student's own
    base weights with the adapters disabled, under `no_grad`.

    It owns no parameters (the peft model is not registered as a submodule), so `.to()`,
    `.eval()` and `requires_grad_(False)` on it leave the student alone. `.module` is the
    transformers model inside, so that `arch.unwrap_model` / `decoder_layers` reach the shared
    decoder layers (ASU tempers them only for the duration of a teacher forward).
    """

    def __init__(self, peft_model: nn.Module):
        super().__init__()
        object.__setattr__(self, "_shared", peft_model)

    @property
    def module(self) -> nn.Module:
        return self._shared.get_base_model()

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self._shared) as model:
            return model(*args, **kwargs)


class SharedReferenceMixin:
    """Trainer mixin: on a LoRA model the reference model is a `FrozenReference`, not a copy.

    It sits in front of the harness's `GradDiff` / `NPO`, whose `_prepare_ref_model` deep-copies
    the model (our standalone base does the same in its own `_prepare_ref_model`), so every
    trainer of ours builds its KL / NPO reference and ASU's teacher from the shared base weights.
    """

    def _prepare_ref_model(self, model):
        shared = peft_model_of(model)
        if shared is not None:
            return FrozenReference(shared)
        return super()._prepare_ref_model(model)


def lora_config(r=None, alpha=None, dropout=None, target_modules=None):
    """A peft `LoraConfig` for a causal LM with our defaults (the official ASU code's)."""
    peft = require_peft()
    values = {
        "r": DEFAULTS["r"] if r is None else r,
        "alpha": DEFAULTS["alpha"] if alpha is None else alpha,
        "dropout": DEFAULTS["dropout"] if dropout is None else dropout,
        "target_modules": DEFAULTS["target_modules"] if target_modules is None else target_modules,
    }
    if not isinstance(values["r"], int) or isinstance(values["r"], bool) or values["r"] < 1:
        raise ValueError(f"lora_r must be an integer >= 1 (got {values['r']!r})")
    if not float(values["alpha"]) > 0:  # the update is scaled by alpha / r: 0 trains nothing
        raise ValueError(
            f"lora_alpha must be > 0 (got {values['alpha']!r}): the adapters' update is scaled "
            "by lora_alpha / lora_r, so 0 would leave the model unchanged"
        )
    if not 0 <= float(values["dropout"]) < 1:
        raise ValueError(f"lora_dropout must be in [0, 1) (got {values['dropout']!r})")
    targets = values["target_modules"]
    if not isinstance(targets, str):  # Hydra hands lists over as ListConfig
        targets = [str(t) for t in targets]
    return peft.LoraConfig(
        r=values["r"],
        lora_alpha=float(values["alpha"]),
        lora_dropout=float(values["dropout"]),
        target_modules=targets,
        bias="none",
        task_type="CAUSAL_LM",
    )


def merged_state_dict(peft_model, state_dict: dict | None = None) -> dict[str, torch.Tensor]:
    """The plain model's state dict with every LoRA update folded in: W + scale · B A.

    Computed out of place in fp32 (the live model is untouched, so training can go on and the
    base weights stay exactly the original). `state_dict` is the peft model's full state dict
    when the caller already has one (DeepSpeed ZeRO-3 gathers it for saving); by default the
    model's own.
    """
    from peft.tuners.lora import LoraLayer
    from peft.utils import transpose

    full = peft_model.state_dict() if state_dict is None else state_dict
    prefix = "base_model.model."
    deltas: dict[str, torch.Tensor] = {}
    for name, layer in peft_model.get_base_model().named_modules():
        if not isinstance(layer, LoraLayer) or getattr(layer, "merged", False):
            continue
        for adapter in layer.active_adapters:
            if adapter not in layer.lora_A:
                continue
            a_key = f"{prefix}{name}.lora_A.{adapter}.weight"
            b_key = f"{prefix}{name}.lora_B.{adapter}.weight"
            if a_key in full and b_key in full and not getattr(layer, "use_dora", {}).get(adapter):
                delta = full[b_key].float() @ full[a_key].float() * layer.scaling[adapter]
                delta = transpose(delta, layer.fan_in_fan_out)
            else:  # other layer kinds (embeddings, DoRA): peft's own formula
                delta = layer.get_delta_weight(adapter).float()
            key = f"{name}.base_layer.weight"
            deltas[key] = deltas[key] + delta if key in deltas else delta
    merged = {}
    for key, tensor in full.items():
        key = key.removeprefix(prefix)
        if ".lora_" in key:
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key].to(tensor.device)).to(tensor.dtype)
        merged[key.replace(".base_layer.", ".")] = tensor
    return merged


_MODEL_CLASS = None


def lora_model_class():
    """`LoRAModelForCausalLM`: peft's causal-LM model whose `save_pretrained` writes a plain
    merged model (what the harness's `src/eval.py` loads) plus the adapter in `default/`, unless
    `lora_save="adapter"`; Trainer's `checkpoint-N` folders get the adapter (for resuming)."""
    global _MODEL_CLASS
    if _MODEL_CLASS is not None:
        return _MODEL_CLASS
    peft = require_peft()

    class LoRAModelForCausalLM(peft.PeftModelForCausalLM):
        lora_save = "merged"

        def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
            # Trainer's checkpoints keep peft's adapter format: it resumes a peft model only
            # from a folder without a full model file (it would load a merged one, key-mismatched,
            # with strict=False, and silently keep fresh adapters).
            is_checkpoint = re.fullmatch(r"checkpoint-\d+", os.path.basename(save_directory))
            if self.lora_save == "adapter" or is_checkpoint:
                return super().save_pretrained(
                    save_directory, *args, state_dict=state_dict, **kwargs
                )
            is_main = kwargs.get("is_main_process", True)
            # The adapter alone goes into a sub-folder named after it; the top level stays a
            # plain model (a top-level adapter_config.json makes `from_pretrained` load an adapter).
            adapter_dir = os.path.join(save_directory, self.active_adapter)
            peft.PeftModelForCausalLM.save_pretrained(
                self, adapter_dir, state_dict=state_dict, is_main_process=is_main
            )
            for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
                # peft nests a non-default adapter in a further folder of its name; flatten it
                nested = os.path.join(adapter_dir, self.active_adapter, name)
                if is_main and os.path.isfile(nested):
                    os.replace(nested, os.path.join(adapter_dir, name))
            merged = merged_state_dict(self, state_dict)
            self.get_base_model().save_pretrained(
                save_directory, state_dict=merged, is_main_process=is_main
            )

    LoRAModelForCausalLM.__module__ = __name__
    _MODEL_CLASS = LoRAModelForCausalLM
    return _MODEL_CLASS


def add_lora(model: nn.Module, config=None, save: str = "merged"):
    """Wrap a transformers causal LM in LoRA adapters (`LoRAModelForCausalLM`).

    Only the adapters train. Inputs to the first layer are made to require grad so that
    gradient checkpointing (reentrant, the transformers default) still back-propagates into the
    adapters of checkpointed layers.
    """
    if save not in SAVE_MODES:
        raise ValueError(f"lora_save={save!r}; use one of {', '.join(SAVE_MODES)}")
    config = lora_config() if config is None else config
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()
    peft_model = lora_model_class()(model, config)
    peft_model.lora_save = save
    return peft_model


def plain_model(model: nn.Module) -> nn.Module:
    """The transformers model under any wrappers (DDP, peft, `FrozenReference`), whose module
    tree `arch` knows; a LoRA model's decoder layers hold its adapters."""
    if isinstance(model, FrozenReference):
        return model.module
    shared = peft_model_of(model)
    return model if shared is None else shared.get_base_model()
