"""Second-order (Sophia) unlearning: any GradDiff-family loss, optimised with SophiaG.

`SophiaMixin` replaces the trainer's optimizer with `SophiaG` and keeps its diagonal Hessian
estimate fresh, in one of two modes (`hessian_mode`):

- ``"gnb"`` — Sophia-G as published: every `hessian_interval` optimizer steps, labels are sampled
  from the model's own softmax at the batch's answer positions, the mean cross-entropy of those
  labels is back-propagated, and `update_hessian(bs=B)` folds B·ĝ² into the EMA,
  B = the number of sampled label tokens of that batch on all ranks. The pass runs before the
  step's first micro-batch; under DDP it is always all-reduced (also inside accumulation's
  `no_sync`) and scaled so that W processes estimate what one process would on the same global
  batch.
- ``"grad2"`` — SOUL: the EMA of the squared gradient of the actual unlearning loss, every step.
  With `soul_compat=True` SOUL's published quirks are reproduced too (see `SophiaG`).

Trainers: the GradDiff and NPO losses unchanged with the Sophia optimiser (registered in this
package's `__init__`), and SIMU (which adds neuron masks on top).
"""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from asu_simu_plugin import zero
from asu_simu_plugin.arch import is_no_decay_parameter, unwrap_model
from asu_simu_plugin.guards import NonFiniteTrainingError, nonfinite_gradients
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.base import model_inputs
from asu_simu_plugin.methods.sophia.optimizer import SophiaG


class _AfterOptimizerStep(TrainerCallback):
    """Runs the trainer's post-step work once the optimizer (or DeepSpeed's engine) has stepped
    and the gradients are cleared, whatever the backend."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_step_begin(self, args, state, control, **kwargs):
        if zero.zero_stage(self.trainer) and self.trainer.optimizer is not None:
            optimizer = self.trainer.optimizer_for_hessian()
            optimizer.accumulate_win_counts = True  # DeepSpeed steps group by group
            optimizer.reset_win_counts()

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.after_optimizer_step()


class SophiaMixin:
    """Sophia optimiser for a GradDiff-family trainer.

    Its settings are the `SophiaArguments` fields of `self.method_args` (`betas`, `rho`,
    `hessian_mode`, `hessian_interval`, `soul_compat`, `sophia_bs`; documented and checked in
    `asu_simu_plugin.methods.sophia.arguments`). Learning rate, weight decay and the schedule come
    from the usual `TrainingArguments`.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        settings = self.method_args
        self.sophia_betas = tuple(float(b) for b in settings.betas)
        self.sophia_rho = float(settings.rho)
        self.hessian_mode = settings.hessian_mode
        self.hessian_interval = int(settings.hessian_interval)
        self.soul_compat = bool(settings.soul_compat)
        self.sophia_bs = settings.sophia_bs
        self._hessian_updates = 0
        self._step_inputs = []
        self._zero_masks_installed = False
        self.add_callback(_AfterOptimizerStep(self))
        zero.honour_max_grad_norm(self)
        if zero.zero_stage(self) and zero.offloads_optimizer(self):
            raise NotImplementedError(
                "SophiaG runs as DeepSpeed's client optimizer on the accelerator; set "
                "zero_optimization.offload_optimizer.device to none in the DeepSpeed config"
            )

    # -- optimiser -----------------------------------------------------------------------------
    def parameter_masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: bool mask} applied in SophiaG (SIMU's neuron masks)."""
        return {}

    def _requested_optimizer(self):
        """(class, kwargs) a `trainer.optimizer` config asked for, or None.

        The harness's optimizer registry (patches/) replaces `get_optimizer_cls_and_kwargs` on
        the trainer; transformers >= 4.48 also takes `optimizer_cls_and_kwargs=` directly.
        """
        override = self.__dict__.get("get_optimizer_cls_and_kwargs")
        if override is not None:
            return override(self.args, self.model)
        return getattr(self, "optimizer_cls_and_kwargs", None)

    def _sophia_options(self) -> dict:
        """SophiaG's options: the method arguments, overridden by a `trainer.optimizer: SophiaG`."""
        options = dict(
            lr=self.args.learning_rate,
            betas=self.sophia_betas,
            rho=self.sophia_rho,
            weight_decay=self.args.weight_decay,
            bs=self.sophia_bs,
        )
        requested = self._requested_optimizer()
        if requested is None:
            return options
        cls, kwargs = requested
        name = getattr(cls, "__name__", repr(cls))
        if not (isinstance(cls, type) and issubclass(cls, SophiaG)):
            raise ValueError(
                f"{type(self).__name__} optimises with SophiaG, so trainer.optimizer={name} "
                "cannot be honoured: drop trainer.optimizer (set betas / rho / hessian_mode in "
                "method_args), or use trainer=GradDiff / NPO for a first-order optimizer"
            )
        kwargs = dict(kwargs)
        unknown = set(kwargs) - {*options, "hessian_mode"}
        if unknown:
            raise ValueError(
                f"trainer.optimizer.args {sorted(unknown)} are not SophiaG options for "
                f"{type(self).__name__}; use lr, betas, rho, weight_decay, bs"
            )
        if "hessian_mode" in kwargs:
            raise ValueError(
                f"{type(self).__name__} chooses the Hessian source with method_args.hessian_mode "
                "(gnb | grad2); drop hessian_mode from trainer.optimizer.args"
            )
        options.update(kwargs)
        if "weight_decay" in kwargs:
            self.args.weight_decay = kwargs["weight_decay"]
        return options

    def create_optimizer(self):
        if self.optimizer is not None:
            return self.optimizer
        options = self._sophia_options()
        model = unwrap_model(self.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        decay = [p for n, p in named if not is_no_decay_parameter(n, p)]
        no_decay = [p for n, p in named if is_no_decay_parameter(n, p)]
        groups = [
            {"params": decay, "weight_decay": options["weight_decay"]},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        bs = options.pop("bs")
        self._fixed_bs = bs is not None
        if bs is None:
            # gnb: each estimate carries its own batch's label count (update_hessian(bs=...));
            # grad2: SOUL's fixed 5120 (the reference default).
            bs = 1 if self.hessian_mode == "gnb" else 5120
        self.optimizer = SophiaG(
            [g for g in groups if g["params"]],
            **options,
            bs=bs,
            hessian_mode=self.hessian_mode,
            soul_compat=self.soul_compat,
        )
        if zero.zero_stage(self) == 0:
            # Under ZeRO, DeepSpeed re-lays the parameters out as flat partitions first: the
            # masks follow at the first training step (zero.install_masks).
            parameters = dict(named)
            for name, mask in self.parameter_masks().items():
                self.optimizer.set_mask(parameters[name], mask.to(parameters[name].device))
        return self.optimizer

    # -- the Gauss-Newton-Bartlett pass --------------------------------------------------------
    def training_step(self, model, inputs, *args, **kwargs):
        if zero.zero_stage(self) and not self._zero_masks_installed:
            # DeepSpeed has laid the parameters out as flat partitions by now
            with zero.all_partitions_in_groups(self) as optimizer:
                optimizer.init_state()
            masks = self.parameter_masks()
            if masks:
                zero.install_masks(self, unwrap_model(self.model), masks)
            self._zero_masks_installed = True
        if self.hessian_mode == "gnb":  # the step's micro-batches feed the Hessian pass
            self._step_inputs.append(inputs)
        return super().training_step(model, inputs, *args, **kwargs)

    def after_optimizer_step(self) -> None:
        """Sophia-G's loop: every `hessian_interval` steps, right after the optimizer step, a
        sampled-label pass on that step's batch (all its micro-batches) refreshes the Hessian."""
        step = self.state.global_step  # already counts the step just taken
        micro_batches, self._step_inputs = self._step_inputs, []
        if self.hessian_mode == "gnb" and step % self.hessian_interval == 0 and micro_batches:
            self.gauss_newton_bartlett_update(self.model_wrapped, micro_batches)

    def _sampled_label_loss(self, model, batch: dict) -> torch.Tensor:
        """Summed CE of labels drawn from the model's own softmax at the answer positions."""
        inputs = model_inputs(batch, with_labels=False)
        logits = model(**inputs).logits[:, :-1]
        positions = batch["labels"][:, 1:] != IGNORE_INDEX
        if not bool(positions.any()):
            return logits.sum() * 0.0  # still a backward, so that every rank reduces
        chosen = logits[positions].float()
        with torch.no_grad():
            if bool(torch.isfinite(chosen).all()):
                sampled = self.sample_labels(chosen)
            else:  # the loss is non-finite whatever the labels; any keep the ranks in step
                sampled = torch.zeros(len(chosen), dtype=torch.long, device=chosen.device)
        return torch.nn.functional.cross_entropy(chosen, sampled, reduction="sum")

    @staticmethod
    def sample_labels(logits: torch.Tensor) -> torch.Tensor:
        """One label per row of `logits`, drawn from its softmax (Sophia-G's ŷ ~ p_θ)."""
        return torch.multinomial(torch.softmax(logits, dim=-1), 1).squeeze(-1)

    def gauss_newton_bartlett_update(self, model, inputs) -> None:
        """Fold ĥ = B·ĝ² into the Hessian EMA, ĝ the gradient of the sampled-label mean CE over
        the B answer tokens of the batch on every rank (gradients held before are kept).

        `inputs`: a batch, or the list of an optimizer step's micro-batches. W processes
        estimate what one process would on the same global batch: DDP and DeepSpeed average
        gradients over ranks, so each rank's summed CE is divided by B / W. Under DDP every
        backward is all-reduced (also inside accumulation's `no_sync`); under ZeRO it goes
        through DeepSpeed's engine and the reduced gradient is read back partitioned.
        """
        micro_batches = inputs if isinstance(inputs, list) else [inputs]
        parts = [
            part
            for batch in micro_batches
            for part in ([batch[k] for k in ("forget", "retain") if k in batch] or [batch])
        ]
        world = self.accelerator.num_processes
        tokens = self._answer_tokens(parts)
        scale = world / tokens
        if zero.zero_stage(self):
            self._gnb_backward_deepspeed(parts, scale, tokens)
        else:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            stashed = [None if p.grad is None else p.grad.clone() for p in params]
            for p in params:
                p.grad = None
            sync = getattr(model, "require_backward_grad_sync", None)
            if sync is False:
                model.require_backward_grad_sync = True
            losses = []
            try:
                for part in parts:  # plain backward: accelerate's would divide by accumulation
                    loss = self._sampled_label_loss(model, part) * scale
                    loss.backward()
                    losses.append(loss.detach())
                self.stop_if_nonfinite_hessian_pass(losses, unwrap_model(model))
                if self.args.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
                self._fold_hessian(tokens)
            finally:
                if sync is False:
                    model.require_backward_grad_sync = sync
                for p, grad in zip(params, stashed, strict=True):
                    p.grad = grad
        self._hessian_updates += 1

    def stop_if_nonfinite_hessian_pass(self, losses, model=None, partitions=None) -> None:
        """Raise `NonFiniteTrainingError` naming the step when the Hessian pass's loss or
        gradients are non-finite, before anything is folded into the Hessian EMA (every rank
        takes the same decision). The gradients: those of `model` (the unwrapped model), or under
        ZeRO `partitions`, this rank's gradient partitions (DeepSpeed keeps `p.grad` empty)."""
        loss = float(torch.stack(losses).sum()) if losses else 0.0
        if not math.isfinite(loss):
            bad = []
        elif partitions is not None:
            count = sum(not bool(torch.isfinite(g).all()) for g in partitions)
            bad = [f"{count} gradient partition(s) of this process"] if count else []
        else:
            bad = nonfinite_gradients(model)
        if not self._any_rank(not math.isfinite(loss) or bool(bad)):
            return
        if not math.isfinite(loss):
            what = f"the sampled-label loss of the Hessian pass is {loss}"
        elif bad:
            more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
            what = f"the Hessian pass's gradients of {', '.join(bad[:3])}{more} are non-finite"
        else:
            what = "the Hessian pass is non-finite on another process"
        raise NonFiniteTrainingError(
            self._message(
                f"{what} (the Hessian estimate was left unchanged)", step=self.state.global_step
            )
        )

    def _answer_tokens(self, parts) -> int:
        """B: the answer tokens (label positions) of the batch, summed over the ranks."""
        tokens = sum(int((part["labels"][:, 1:] != IGNORE_INDEX).sum()) for part in parts)
        if self.accelerator.num_processes > 1:
            count = torch.tensor(float(tokens), device=self.accelerator.device)
            tokens = int(self.accelerator.reduce(count, reduction="sum").item())
        if tokens == 0:
            raise ValueError("the Hessian batch has no answer tokens (all labels are -100)")
        return tokens

    def _fold_hessian(self, tokens: int) -> None:
        optimizer = self.optimizer_for_hessian()
        if self._fixed_bs:
            optimizer.update_hessian()  # the user's fixed bs applies at step time
        else:
            optimizer.update_hessian(bs=tokens)
        self.hessian_tokens = tokens

    def _gnb_backward_deepspeed(self, parts, scale: float, tokens: int) -> None:
        """The pass through DeepSpeed's engine, right after its step (its gradients are clear):
        the backwards accumulate like micro-steps and the last one reduces; the gradient is read
        back in the optimizer's flat partitions, clipped by its global norm and folded in, and
        DeepSpeed's gradients are cleared again."""
        engine = zero.engine_of(self)
        boundary = getattr(engine, "_is_gradient_accumulation_boundary", None)
        losses = []
        try:
            for index, part in enumerate(parts):
                engine.set_gradient_accumulation_boundary(index == len(parts) - 1)
                loss = self._sampled_label_loss(engine, part) * scale
                engine.backward(loss, scale_wrt_gas=False)
                losses.append(loss.detach())
        finally:
            engine.set_gradient_accumulation_boundary(boundary)
        grads = zero.hessian_gradients(self, unwrap_model(self.model))
        zero.discard_gradients(engine)
        self.stop_if_nonfinite_hessian_pass(losses, partitions=list(grads.values()))
        flats = [p for group in zero.flat_partitions(self) for p in group]
        if self.args.max_grad_norm:
            squares = sum((g.float() ** 2).sum() for g in grads.values())
            squares = torch.as_tensor(squares, device=self.accelerator.device, dtype=torch.float32)
            torch.distributed.all_reduce(squares)
            clip = self.args.max_grad_norm / (float(squares.sqrt()) + 1e-6)
            if clip < 1:
                for g in grads.values():
                    g.mul_(clip)
        for flat in flats:
            flat.grad = grads.get(id(flat))
        try:
            with zero.all_partitions_in_groups(self):
                self._fold_hessian(tokens)
        finally:
            for flat in flats:
                flat.grad = None

    def optimizer_for_hessian(self) -> SophiaG:
        """The SophiaG instance behind accelerate's (and DeepSpeed's) wrappers."""
        return zero.innermost_optimizer(self.optimizer)

    # -- logging -------------------------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.optimizer is not None:
            counts = self.optimizer_for_hessian().win_counts()
            if zero.zero_stage(self):  # each rank counted its own partitions
                local = torch.tensor(counts or (0.0, 0.0), device=self.accelerator.device)
                counts = self.accelerator.reduce(local, reduction="sum").tolist()
            if counts and counts[1]:
                logs["sophia/win_rate"] = counts[0] / counts[1]
            logs["sophia/hessian_updates"] = self._hessian_updates
        return super().log(logs, *args, **kwargs)
