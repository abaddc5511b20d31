"""ASU — Attention Smoothing Unlearning (Zare Zade et al., ICLR 2026).

The student (the model being trained, always at τ = 1) is distilled on forget data towards a
"forget-teacher": the frozen original model with its attention softmax temperature raised to
τ > 1 on the selected layers. Smoothed attention blurs the lexical associations that let the
model recall a fact, so matching it removes the fact while keeping the output fluent.

Where the original model comes from (`teacher_source`):

- "student": with `teacher_cache` (and, for the KL retain loss, `reference_cache`) nothing reads
  the original after the caches are filled, and before its first update the student *is* the
  original: the caches are filled from the student itself (temperature attached for the
  duration, eval mode, no grad) and no copy is ever built.
- "adapters": on a LoRA model the original is the student's own base weights with the adapters
  disabled, the temperature attached only for the duration of the teacher's forward.
- "copy": otherwise one frozen copy of the original does both jobs: tempered on forget batches,
  paused (exactly the original) for the KL / embedding retain losses.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from transformers import TrainerCallback

from asu_simu_plugin import losses, zero
from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, unwrap_model
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.lora import is_lora_model, plain_model
from asu_simu_plugin.methods.asu import collapse
from asu_simu_plugin.methods.asu import temperature as auto
from asu_simu_plugin.methods.asu.teacher_cache import TeacherCache, cached_kl_loss
from asu_simu_plugin.methods.base import UnlearnMethodMixin, freeze_all_but, model_inputs

logger = logging.getLogger(__name__)


def _capture_layer_output(model, layer_id: int, inputs: dict) -> torch.Tensor:
    """Run `model` and return the hidden states leaving decoder layer `layer_id`."""
    captured = []

    def keep(_module, _args, output):
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = decoder_layers(plain_model(model))[layer_id].register_forward_hook(keep)
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured[0]


class _FirstUpdate(TrainerCallback):
    """Marks the student as updated once an optimizer step is done: from then on it is no
    longer the original model the caches may be filled from."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.student_updated = True


def _retain_rows(dataset) -> list[int] | None:
    """The retain rows a training run can draw: our standalone dataset pairs each forget row with
    a fixed retain row (`retain_index`); the harness's draws any (None: all of them)."""
    index = getattr(dataset, "retain_index", None)
    return None if index is None else sorted({int(i) for i in index})


class ASUMixin(UnlearnMethodMixin):
    """ASU on a GradDiff-like base: loss = gamma·forget_loss + alpha·retain_loss.

    Its input is `self.method_args`, an `ASUArguments` (`asu_simu_plugin.methods.asu.arguments`,
    where every argument is documented and checked):
      temperature / layers: τ for the teacher's attention and the 0-based decoder layers it
        smooths (None = all, the paper's default), or "auto": chosen before training on the
        forget set (`temperature.auto_temperature` states the rule; the sweep's CSV, PNG and
        choice are saved in `args.output_dir`), with `tau_sweep` its settings.
      teacher_eos: "keep" (the paper) or "suppress": the teacher's end-of-answer tokens get
        probability 0 (the rest renormalised) where the answer goes on
        (`losses.suppress_end_of_answer`).
      collapse_guard: before training, warn when the teacher would answer with silence
        (`collapse.CollapseGuardConfig`); None = defaults, false = off.
      forget_loss_type: "KL" — token-level KL(teacher ‖ student) on answer tokens (ASU);
        "EMBED_MSE" — the paper's WMDP variant: MSE between the student's and the smoothed
        teacher's hidden states leaving `embed_layer` (RMU with the teacher as control vector).
      retain_loss_type: "NLL" (ASU_GD), "KL" (ASU_KL, answer tokens), "KL_ALL" (every position;
        the official code's TOFU ASU_KL), "EMBED_MSE" (hidden states at `embed_layer`).
      trainable_params_regex: regexes of parameter names to train (full match, as the harness's
        RMU); None trains everything. The WMDP variant trains mlp.down_proj of 5-7.
      teacher_cache / teacher_cache_dtype: compute the teacher's answer-position distributions
        once and reuse them every epoch (`teacher_cache`).
      reference_cache: the same for the original's distributions on the retain answer tokens
        (the KL retain loss's reference); with both caches no frozen copy is built.
      module_regex, steering_coeff: RMU keys that the harness's WMDP experiment sets; ASU's
        control signal is the smoothed teacher, so they are accepted and unused.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.method_args
        # `auto` is resolved on the forget set before the teacher exists (rank 0, broadcast).
        temperature, layers = auto.resolve_for_trainer(
            self, settings.temperature, settings.layers, settings.tau_sweep
        )
        self.temperature = float(temperature)
        self.teacher_eos = settings.teacher_eos
        self.end_token_ids = auto.end_tokens_for_trainer(self)
        # The embedding variant matches hidden states, not the teacher's answer distribution:
        # the teacher's end-of-answer mass cannot teach silence there, so nothing to guard.
        self.collapse_stats = collapse.guard_for_trainer(
            self,
            self.temperature,
            layers,
            settings.collapse_guard if settings.forget_loss_type == "KL" else False,
            settings.teacher_eos,
            self.end_token_ids,
        )
        self.forget_loss_type = settings.forget_loss_type
        if settings.uses_embeddings:
            resolve_layer_ids([settings.embed_layer], len(decoder_layers(plain_model(self.model))))
        self.embed_layer = int(settings.embed_layer)
        self.student_updated = False
        self.add_callback(_FirstUpdate(self))
        # The teacher shares the student's modules unless it is the copy: tempered only inside
        # `teacher()`.
        self.teacher_temperature = None
        self.layers = resolve_layer_ids(layers, len(decoder_layers(plain_model(self.model))))
        if is_lora_model(self.model):
            self.teacher_source = "adapters"
            self.original_model()  # a `FrozenReference`: the adapters switched off, no copy
        elif self.frozen_copy_reasons():
            self.use_frozen_copy("; ".join(self.frozen_copy_reasons()))
        else:
            self.teacher_source = "student"
            logger.info("ASU: no frozen copy; the caches are filled from the model before training")
        if settings.trainable_params_regex:
            freeze_all_but(self.model, settings.trainable_params_regex)
        dtype = settings.teacher_cache_dtype
        self.teacher_cache = (
            TeacherCache(self.teacher_fingerprint(), dtype) if settings.teacher_cache else None
        )
        self.reference_cache = (
            TeacherCache(None, dtype, kind="retain", option="reference_cache")
            if settings.reference_cache
            else None
        )
        for cache in self.caches():
            # a ZeRO-3 forward gathers weights from every rank: misses are run by all of them
            cache.collective = zero.zero_stage(self) == 3

    # -- where the original model comes from ---------------------------------------------------
    def frozen_copy_reasons(self) -> list[str]:
        """Why this run needs a frozen copy of the original model (empty: it needs none)."""
        settings, data = self.method_args, self.train_dataset
        reasons = []
        if not settings.teacher_cache:
            reasons.append("teacher_cache=false: the teacher runs at every step")
        elif getattr(data, "forget", None) is None:
            reasons.append("the training dataset has no `forget` set to fill the teacher cache")
        kind = settings.retain_loss_type
        if kind == "EMBED_MSE":
            reasons.append("retain_loss_type=EMBED_MSE reads the original at every step")
        elif kind in ("KL", "KL_ALL") and not settings.reference_cache:
            reasons.append(f"retain_loss_type={kind} without reference_cache")
        elif settings.reference_cache and getattr(data, "retain", None) is None:
            reasons.append("the training dataset has no `retain` set to fill the reference cache")
        return reasons

    def _prepare_ref_model(self, model):
        # The base builds the KL reference in its constructor; not when the caches replace it.
        if getattr(self, "teacher_source", None) != "copy" and not is_lora_model(model):
            if not self.frozen_copy_reasons():
                return None
        return super()._prepare_ref_model(model)

    def use_frozen_copy(self, reason: str) -> None:
        """Build the frozen copy of the model (as it is now) and make it the tempered teacher."""
        logger.info("ASU keeps a frozen copy of the model: %s", reason)
        self.teacher_source = "copy"
        self.teacher_temperature = attention_temperature(
            unwrap_model(self.original_model()), self.temperature, self.layers
        )

    @contextlib.contextmanager
    def student_as_original(self):
        """The student as the original model: before its first update, eval mode, no grad."""
        if self.student_updated:
            raise RuntimeError(
                "ASU fills its caches from the model before its first update, and this model "
                "has been updated (were τ or the layers changed after training started?); build "
                "the trainer again from the original model"
            )
        model = unwrap_model(self.model)
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            with torch.no_grad():
                yield model
        finally:
            for module, training in modes:
                module.training = training

    def original_available(self) -> bool:
        return self.teacher_source != "student" or not self.student_updated

    # -- the original in its two roles --------------------------------------------------------
    @contextlib.contextmanager
    def teacher(self):
        """The tempered original (the copy, LoRA's adapter-disabled base, or the student)."""
        if self.teacher_source == "copy":
            yield self.original_model()
            return
        with self.reference() as original:
            with attention_temperature(original, self.temperature, self.layers):
                yield original

    @contextlib.contextmanager
    def reference(self):
        """The untempered original (for the KL / embedding retain losses)."""
        if self.teacher_source == "student":
            with self.student_as_original() as original:
                yield original
        elif self.teacher_temperature is None:
            yield self.original_model()
        else:
            with self.teacher_temperature.paused():
                yield self.original_model()

    @torch.no_grad()
    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        with self.teacher() as teacher:
            return teacher(**inputs).logits

    def reference_logits(self, inputs: dict) -> torch.Tensor:
        with self.reference() as original:
            return original(**inputs).logits

    @torch.no_grad()
    def _reference_logits_no_grad(self, inputs: dict) -> torch.Tensor:
        return self.reference_logits(inputs)

    # -- the output caches ---------------------------------------------------------------------
    def teacher_fingerprint(self) -> tuple:
        """What the teacher's output depends on besides the input: the model, τ, the layers."""
        config = getattr(plain_model(self.model), "config", None)
        return (
            getattr(config, "_name_or_path", None),
            sum(p.numel() for p in self.model.parameters()),
            self.temperature,
            tuple(self.layers),
        )

    def caches(self) -> list[TeacherCache]:
        return [c for c in (self.teacher_cache, self.reference_cache) if c is not None]

    def ensure_caches(self) -> None:
        """Fill the caches that are not filled yet (at `train()` or the first training batch)."""
        if self.teacher_cache is not None:
            self.teacher_cache.check(self.teacher_fingerprint())
            if not self.teacher_cache.built:
                self.build_teacher_cache()
        if self.reference_cache is not None and not self.reference_cache.built:
            self.build_reference_cache()

    def build_teacher_cache(self) -> None:
        """One pass of the teacher over the whole forget set (progress bar on the main process)."""
        forget = getattr(self.train_dataset, "forget", None)
        self._fill(self.teacher_cache, forget, self.teacher_logits)

    def build_reference_cache(self) -> None:
        """One pass of the original over the retain rows training can draw."""
        retain = getattr(self.train_dataset, "retain", None)
        rows = _retain_rows(self.train_dataset)
        self._fill(self.reference_cache, retain, self._reference_logits_no_grad, rows)

    def _fill(self, cache: TeacherCache, dataset, compute, indices=None) -> None:
        if dataset is None:  # another dataset layout: rows are filled as they come (from a copy)
            cache.built = True
            return
        cache.build(
            dataset,
            self.data_collator,
            compute,
            batch_size=self.args.per_device_train_batch_size,
            device=self.args.device,
            show_progress=not self.args.disable_tqdm,
            indices=indices,
        )

    def forget_teacher_logits(self, forget: dict) -> torch.Tensor:
        """The teacher's logits on a forget batch: from the cache when it is on."""
        if self.teacher_cache is None:
            return self.teacher_logits(model_inputs(forget, with_labels=False))
        self.ensure_caches()
        return self.teacher_cache.teacher_logits(
            model_inputs(forget), self._compute(self.teacher_logits)
        )

    def _compute(self, compute):
        """What computes a cache miss: `compute`, or None once the original is gone."""
        return compute if self.original_available() else None

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if self.teacher_source == "student" and not all(c.built for c in self.caches()):
            if not (self.is_deepspeed_enabled or getattr(self, "is_fsdp_enabled", False)):
                self.ensure_caches()  # now, before a resume loads a checkpoint into the student
            elif resume_from_checkpoint:
                # the engine loads the checkpoint before the first batch, and cannot run the
                # model before it is set up: the copy, made now, is the original
                self.use_frozen_copy("a resumed DeepSpeed/FSDP run fills its caches from it")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    # -- losses --------------------------------------------------------------------------------
    def forget_objective(self, model, forget: dict):
        if self.forget_loss_type == "KL":
            outputs = model(**model_inputs(forget, with_labels=False))
            if self.teacher_cache is not None and self.teacher_eos == "keep":
                # the answer rows only, never a [B, T, V] teacher tensor
                positions, rows = self.teacher_cache.lookup(
                    model_inputs(forget), self._compute(self.teacher_logits)
                )
                loss = cached_kl_loss(outputs.logits, positions, rows, forget["labels"])
                return loss, outputs
            teacher_logits = self.forget_teacher_logits(forget)
            if self.teacher_eos == "suppress":
                teacher_logits = losses.suppress_end_of_answer(
                    teacher_logits, forget["labels"], self.end_token_ids
                )
            loss = losses.asu_distillation_loss(outputs.logits, teacher_logits, forget["labels"])
            return loss, outputs
        inputs = model_inputs(forget, with_labels=False)
        student_hidden = _capture_layer_output(model, self.embed_layer, inputs)
        with torch.no_grad(), self.teacher() as teacher:
            teacher_hidden = _capture_layer_output(teacher, self.embed_layer, inputs)
        loss = losses.masked_hidden_mse(student_hidden, teacher_hidden, inputs["attention_mask"])
        return loss, None

    def retain_objective(self, model, retain_inputs: dict) -> torch.Tensor:
        if self.reference_cache is not None:  # retain_loss_type KL
            positions, reference = self.reference_cache.lookup(
                retain_inputs, self._compute(self._reference_logits_no_grad)
            )
            logits = model(**model_inputs(retain_inputs, with_labels=False)).logits
            return cached_kl_loss(logits, positions, reference, retain_inputs["labels"])
        if self.retain_loss_type != "EMBED_MSE":
            return super().retain_objective(model, retain_inputs)
        inputs = model_inputs(retain_inputs, with_labels=False)
        hidden = _capture_layer_output(model, self.embed_layer, inputs)
        with torch.no_grad(), self.reference() as reference:
            original = _capture_layer_output(reference, self.embed_layer, inputs)
        return losses.masked_hidden_mse(hidden, original, inputs["attention_mask"])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:  # evaluation batches keep the plain LM loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self.ensure_caches()  # before the student's forward holds its activations
        forget_loss, forget_outputs = self.forget_objective(model, inputs["forget"])
        retain_loss = self.retain_objective(model, model_inputs(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        self.track("asu/forget_loss", forget_loss)
        self.track("asu/retain_loss", retain_loss)
        return (loss, forget_outputs) if return_outputs else loss
