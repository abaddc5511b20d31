"""What every method mixin shares, whichever trainer base it runs on.

A method mixin sits in front of a GradDiff-like base (the harness's `GradDiff`, or our standalone
`StandaloneGradDiff`) that provides: `self.model`, `self.gamma` (forget weight), `self.alpha`
(retain weight), `self.retain_loss_type`, `self.ref_model` (``None`` until needed) and
`self._prepare_ref_model(model)` (deep copy -> device -> eval -> DeepSpeed/accelerate prepare).
The method's arguments are `self.method_args` (its dataclass, `asu_simu_plugin.registry`).
"""

from __future__ import annotations

import contextlib
import inspect
import re
from collections import defaultdict

import torch
from transformers import Trainer

from asu_simu_plugin import losses
from asu_simu_plugin.guards import (
    NonFiniteGuardMixin,
    close_distributed_at_exit,
    weights_only_loading,
)

MODEL_INPUT_KEYS = ("input_ids", "attention_mask", "labels")


def model_inputs(batch: dict, with_labels: bool = True) -> dict:
    """The keys a causal LM forward takes; drops `index` and any metadata the collator kept."""
    keys = MODEL_INPUT_KEYS if with_labels else MODEL_INPUT_KEYS[:2]
    return {k: batch[k] for k in keys if k in batch}


def _trainer_accepts(name: str) -> bool:
    return name in inspect.signature(Trainer.__init__).parameters


class TrainerCompatMixin(NonFiniteGuardMixin):
    """Irons out the transformers API changes between 4.45.1 and 5.x for every trainer we build,
    and carries the safety rails of `asu_simu_plugin.guards` (stop on non-finite training).

    - `tokenizer=` became `processing_class=` (4.46) and was removed (5.0).
    - `compute_loss` gained `num_items_in_batch` (4.46); bases that predate it get it dropped,
      bases that name it or take `**kwargs` get it.
    - Distributed runs close their process group at exit once training succeeded (the harness's
      `src/train.py` never does; gloo then aborts a rank at random after the model was saved).
    - Resuming: transformers < 4.50 reads optimizer, scheduler and RNG state with `torch.load`'s
      default (a full unpickler on torch < 2.6); every checkpoint read here is weights-only,
      DeepSpeed's own checkpoint files included (`zero.weights_only_checkpoint_reads`).
    - Empty parameter groups (nothing to decay-exempt when only some weights train) are dropped
      when the optimizer is built: DeepSpeed drops them later, after the learning-rate schedule
      was built for every group, and its first step then fails.
    """

    def __init__(self, *args, **kwargs):
        if "tokenizer" in kwargs and not _trainer_accepts("tokenizer"):
            kwargs["processing_class"] = kwargs.pop("tokenizer")
        super().__init__(*args, **kwargs)

    # Every method of Trainer that reads checkpoint files (`_load_scaler` exists from 4.5x).
    def _load_from_checkpoint(self, *args, **kwargs):
        with weights_only_loading():
            return super()._load_from_checkpoint(*args, **kwargs)

    def _load_optimizer_and_scheduler(self, *args, **kwargs):
        with weights_only_loading():
            return super()._load_optimizer_and_scheduler(*args, **kwargs)

    def _load_rng_state(self, *args, **kwargs):
        with weights_only_loading():
            return super()._load_rng_state(*args, **kwargs)

    def _load_scaler(self, *args, **kwargs):
        with weights_only_loading():
            return super()._load_scaler(*args, **kwargs)

    def _load_best_model(self, *args, **kwargs):
        with weights_only_loading():
            return super()._load_best_model(*args, **kwargs)

    def create_optimizer(self):
        optimizer = super().create_optimizer()
        groups = optimizer.param_groups
        if any(group["params"] for group in groups):
            groups[:] = [group for group in groups if group["params"]]
        return optimizer

    def train(self, *args, **kwargs):
        reads = contextlib.nullcontext()
        if getattr(self, "is_deepspeed_enabled", False):
            from asu_simu_plugin import zero

            reads = zero.weights_only_checkpoint_reads()  # DeepSpeed resumes inside train()
        with reads:
            output = super().train(*args, **kwargs)
        # only after a training that succeeded on this rank (see guards.close_distributed)
        close_distributed_at_exit()
        return output

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        parent = super().compute_loss
        parameters = inspect.signature(parent).parameters
        # forwarded to bases that name it or take **kwargs (the harness's base after its
        # transformers-4.51 change: `compute_loss(model, inputs, **kwargs)`)
        if "num_items_in_batch" in parameters or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
        ):
            return parent(
                model,
                inputs,
                return_outputs=return_outputs,
                num_items_in_batch=num_items_in_batch,
                **kwargs,
            )
        return parent(model, inputs, return_outputs=return_outputs)


class RetainLossMixin:
    """The retain losses of every trainer of ours, one meaning per name: `NLL`; `KL` =
    KL(original ‖ model) on the answer tokens; `KL_ALL` = the same over every position (the
    harness's GradDiff computes its `KL` this way). Replaces the base's `compute_retain_loss`."""

    def original_model(self) -> torch.nn.Module:
        """The one frozen copy of the model as it was before unlearning (built on first use)."""
        if getattr(self, "ref_model", None) is None:
            self.ref_model = self._prepare_ref_model(self.model)
        for param in self.ref_model.parameters():
            param.requires_grad_(False)
        return self.ref_model

    def compute_retain_loss(self, model, retain_inputs):
        return self.retain_objective(model, model_inputs(retain_inputs))

    def retain_objective(self, model, retain_inputs: dict) -> torch.Tensor:
        kind = self.retain_loss_type
        if kind == "NLL":
            return model(**retain_inputs).loss
        if kind in ("KL", "KL_ALL"):
            with torch.no_grad():
                reference_logits = self.reference_logits(model_inputs(retain_inputs, False))
            logits = model(**model_inputs(retain_inputs, False)).logits
            return losses.retain_kl_loss(
                logits, reference_logits, retain_inputs["labels"], answer_tokens_only=kind == "KL"
            )
        # the argument dataclasses refuse other values before training
        raise ValueError(f"retain_loss_type={kind!r} is not a retain loss of this trainer")

    def reference_logits(self, inputs: dict) -> torch.Tensor:
        """Logits of the untouched original (subclasses that temper the copy pause it here)."""
        return self.original_model()(**inputs).logits


class UnlearnMethodMixin(RetainLossMixin):
    """The frozen copy built the DeepSpeed way, and loss components in the training logs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loss_components: dict[str, list[float]] = defaultdict(list)
        if getattr(self, "is_deepspeed_enabled", False):
            from asu_simu_plugin import zero

            zero.honour_max_grad_norm(self)

    def _prepare_ref_model(self, model):
        # Under DeepSpeed a deep copy of a ZeRO-3 model computes with the live weights: the
        # frozen copy is built the DeepSpeed way (asu_simu_plugin.zero.frozen_copy).
        if getattr(self, "is_deepspeed_enabled", False):
            from asu_simu_plugin import zero

            return zero.frozen_copy(self, model)
        return super()._prepare_ref_model(model)

    # -- metrics -------------------------------------------------------------------------------
    def track(self, name: str, value) -> None:
        """Remember a loss component; its mean since the last log line is logged with it."""
        if torch.is_tensor(value):
            value = value.detach().float().mean().item()
        self._loss_components[name].append(float(value))

    def log(self, logs, *args, **kwargs):
        if "loss" in logs:  # training log lines only, not eval
            names = sorted(n for n, values in self._loss_components.items() if values)
            means = [sum(self._loss_components[n]) / len(self._loss_components[n]) for n in names]
            if names and self.accelerator.num_processes > 1:
                # every rank logs; the components, like `loss`, are means over the ranks
                local = torch.tensor(means, dtype=torch.float64, device=self.accelerator.device)
                means = self.accelerator.reduce(local, reduction="mean").tolist()
            logs.update(zip(names, means, strict=True))
            self._loss_components.clear()
        return super().log(logs, *args, **kwargs)


def freeze_all_but(model: torch.nn.Module, patterns) -> list[str]:
    """Train only the parameters whose names fully match one of `patterns`; returns them."""
    if isinstance(patterns, str):
        patterns = [patterns]
    compiled = [re.compile(p) for p in patterns]
    trainable = []
    for name, param in model.named_parameters():
        keep = any(p.fullmatch(name) for p in compiled)
        param.requires_grad_(keep)
        if keep:
            trainable.append(name)
    if not trainable:
        raise ValueError(
            f"no parameter name matches {list(patterns)}; names look like "
            f"{next(iter(dict(model.named_parameters())))!r}"
        )
    return trainable
