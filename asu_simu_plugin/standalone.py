"""Trainers for users without the harness (and for our harness-free test-suite).

`StandaloneGradDiff` mirrors the harness's `GradDiff` contract (constructor arguments, the
`{"forget": ..., "retain": ...}` batches, `ref_model` / `_prepare_ref_model`, plain HF loss on
evaluation batches) on a bare `transformers.Trainer`, so every method mixin runs unchanged on either.

Every registered method is served here as a trainer class built on these bases, e.g.
`from asu_simu_plugin.standalone import ASU, GradDiff`; each takes its argument dataclass as
`method_args=` or the same values as keywords (`asu_simu_plugin.registry`).
"""

from __future__ import annotations

import copy

import torch
from transformers import Trainer

from asu_simu_plugin import losses
from asu_simu_plugin.lora import FrozenReference, peft_model_of
from asu_simu_plugin.methods.base import RetainLossMixin, TrainerCompatMixin, model_inputs
from asu_simu_plugin.registry import lazy_trainer_classes, methods


class StandaloneGradDiff(RetainLossMixin, TrainerCompatMixin, Trainer):
    """Gradient difference: gamma·(−NLL on forget) + alpha·(retain loss).

    A base: its arguments come from the method's dataclass (`standalone.GradDiff` and the other
    built classes pass them), so it has no defaults of its own. `evaluators` and `template_args`
    are accepted (and kept) so harness-style configs construct it unchanged.
    """

    def __init__(
        self,
        *args,
        gamma: float,
        alpha: float,
        retain_loss_type: str,
        evaluators=None,
        template_args=None,
        **kwargs,
    ):
        self.evaluators = evaluators
        self.template_args = template_args
        super().__init__(*args, **kwargs)
        if self.args.remove_unused_columns:
            # Nested forget/retain batches would be dropped by the column filter.
            self.args.remove_unused_columns = False
        self.gamma = gamma
        self.alpha = alpha
        self.retain_loss_type = retain_loss_type
        self.ref_model = None
        if retain_loss_type in ("KL", "KL_ALL"):
            self.ref_model = self._prepare_ref_model(self.model)

    def _prepare_ref_model(self, model):
        shared = peft_model_of(model)
        if shared is not None:  # LoRA: the base weights with the adapters off, no copy
            return FrozenReference(shared)
        if self.is_deepspeed_enabled:
            raise NotImplementedError(
                "the standalone trainers do not wrap a frozen reference model in DeepSpeed; run "
                "through the open-unlearning harness (which does) or use plain DDP"
            )
        ref_model = copy.deepcopy(model).to(self.accelerator.device)
        ref_model.eval()
        for param in ref_model.parameters():
            param.requires_grad_(False)
        return self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:  # evaluation batches: the plain LM loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        forget_outputs = model(**model_inputs(inputs["forget"]))
        retain_loss = self.compute_retain_loss(model, model_inputs(inputs["retain"]))
        loss = self.gamma * -forget_outputs.loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


class StandaloneNPO(StandaloneGradDiff):
    """Negative preference optimisation (the harness's NPO): NPO on forget + retain loss."""

    def __init__(self, *args, beta: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        if self.ref_model is None:
            self.ref_model = self._prepare_ref_model(self.model)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        forget = model_inputs(inputs["forget"])
        forget_outputs = model(**forget)
        with torch.no_grad():
            ref_logits = self.ref_model(**model_inputs(forget, False)).logits
        forget_loss = losses.npo_loss(
            forget_outputs.logits, ref_logits, forget["labels"], self.beta
        )
        retain_loss = self.compute_retain_loss(model, model_inputs(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


def _bases() -> dict[str, type]:
    return {"GradDiff": StandaloneGradDiff, "NPO": StandaloneNPO}


# Every registered method on the standalone bases, e.g. `from asu_simu_plugin.standalone import ASU`.
__getattr__ = lazy_trainer_classes(__name__, _bases, names=lambda: list(methods()))
