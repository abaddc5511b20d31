"""ASU — Attention Smoothing Unlearning (Zare Zade et al., ICLR 2026).

The student (the model being trained, always at τ = 1) is distilled on forget data towards a
"forget-teacher": the frozen original model with its attention softmax temperature raised to
τ > 1 on the selected layers. Smoothed attention blurs the lexical associations that let the
model recall a fact, so matching it removes the fact while keeping the output fluent.

One frozen copy of the original does both jobs: tempered on forget batches, paused (exactly the
original) for the KL / embedding retain losses. On a LoRA model there is no copy at all: the
teacher is the student's own base weights with the adapters disabled, the temperature attached
only for the duration of the teacher's forward.
"""

from __future__ import annotations

import contextlib

import torch

from asu_simu_plugin import losses
from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, unwrap_model
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.lora import is_lora_model, plain_model
from asu_simu_plugin.methods.asu import collapse
from asu_simu_plugin.methods.asu import temperature as auto
from asu_simu_plugin.methods.asu.teacher_cache import TeacherCache
from asu_simu_plugin.methods.base import UnlearnMethodMixin, freeze_all_but, model_inputs


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
        if is_lora_model(self.model):
            # The teacher shares the student's modules: tempered only inside `teacher()`.
            self.teacher_temperature = None
            self.original_model()  # a `FrozenReference`: the adapters switched off, no copy
            self.layers = resolve_layer_ids(layers, len(decoder_layers(plain_model(self.model))))
        else:
            # The teacher: the single frozen copy of the original, tempered from now on.
            self.teacher_temperature = attention_temperature(
                unwrap_model(self.original_model()), self.temperature, layers
            )
            self.layers = self.teacher_temperature.layers
        if settings.trainable_params_regex:
            freeze_all_but(self.model, settings.trainable_params_regex)
        self.teacher_cache = (
            TeacherCache(self.teacher_fingerprint(), settings.teacher_cache_dtype)
            if settings.teacher_cache
            else None
        )

    # -- the frozen original in its two roles ---------------------------------------------------
    @contextlib.contextmanager
    def teacher(self):
        """The tempered original (the copy, or on LoRA the adapter-disabled student)."""
        original = self.original_model()
        if self.teacher_temperature is None:
            with attention_temperature(original, self.temperature, self.layers):
                yield original
        else:
            yield original

    @contextlib.contextmanager
    def reference(self):
        """The untempered original (for the KL / embedding retain losses)."""
        original = self.original_model()
        if self.teacher_temperature is None:
            yield original
        else:
            with self.teacher_temperature.paused():
                yield original

    @torch.no_grad()
    def teacher_logits(self, inputs: dict) -> torch.Tensor:
        with self.teacher() as teacher:
            return teacher(**inputs).logits

    def reference_logits(self, inputs: dict) -> torch.Tensor:
        with self.reference() as original:
            return original(**inputs).logits

    # -- the teacher-output cache --------------------------------------------------------------
    def teacher_fingerprint(self) -> tuple:
        """What the teacher's output depends on besides the input: the model, τ, the layers."""
        config = getattr(plain_model(self.model), "config", None)
        return (
            getattr(config, "_name_or_path", None),
            sum(p.numel() for p in self.model.parameters()),
            self.temperature,
            tuple(self.layers),
        )

    def forget_teacher_logits(self, forget: dict) -> torch.Tensor:
        """The teacher's logits on a forget batch: from the cache when it is on."""
        if self.teacher_cache is None:
            return self.teacher_logits(model_inputs(forget, with_labels=False))
        self.teacher_cache.check(self.teacher_fingerprint())
        if not self.teacher_cache.built:
            self.build_teacher_cache()
        return self.teacher_cache.teacher_logits(model_inputs(forget), self.teacher_logits)

    def build_teacher_cache(self) -> None:
        """One pass of the teacher over the whole forget set (progress bar on the main process)."""
        forget = getattr(self.train_dataset, "forget", None)
        if forget is None:  # another dataset layout: rows are filled as they come
            self.teacher_cache.built = True
            return
        self.teacher_cache.build(
            forget,
            self.data_collator,
            self.teacher_logits,
            batch_size=self.args.per_device_train_batch_size,
            device=self.args.device,
            show_progress=not self.args.disable_tqdm,
        )

    # -- losses --------------------------------------------------------------------------------
    def forget_objective(self, model, forget: dict):
        if self.forget_loss_type == "KL":
            outputs = model(**model_inputs(forget, with_labels=False))
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
        forget_loss, forget_outputs = self.forget_objective(model, inputs["forget"])
        retain_loss = self.retain_objective(model, model_inputs(inputs["retain"]))
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        self.track("asu/forget_loss", forget_loss)
        self.track("asu/retain_loss", retain_loss)
        return (loss, forget_outputs) if return_outputs else loss
