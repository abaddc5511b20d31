"""Second-order (Sophia) unlearning: any GradDiff-family loss, optimised with SophiaG.

`SophiaMixin` replaces the trainer's optimizer with `SophiaG` and keeps its diagonal Hessian
estimate fresh, in one of two modes (`hessian_mode`):

- ``"gnb"`` — Sophia-G as published: every `hessian_interval` optimizer steps, labels are sampled
  from the model's own softmax at the batch's answer positions, the mean cross-entropy of those
  labels is back-propagated, and `update_hessian()` folds that squared gradient into the EMA;
  `bs` = number of sampled label tokens. The training gradient is stashed and restored around
  this pass, so it never leaks into the update.
- ``"grad2"`` — SOUL: the EMA of the squared gradient of the actual unlearning loss, every step.
  With `soul_compat=True` SOUL's published quirks are reproduced too (see `SophiaG`).

Trainers: `SOGradDiff` and `SONPO` (the GradDiff / NPO losses unchanged, Sophia optimiser), and
SIMU (which adds neuron masks on top).
"""

from __future__ import annotations

import torch

from asu_simu_plugin.arch import is_no_decay_parameter, unwrap_model
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.base import model_inputs
from asu_simu_plugin.sophia import SophiaG

HESSIAN_MODES = ("gnb", "grad2")


def deepspeed_zero_stage(trainer) -> int:
    if not getattr(trainer, "is_deepspeed_enabled", False):
        return 0
    plugin = trainer.accelerator.state.deepspeed_plugin
    return int(plugin.zero_stage or 0)


class SophiaMixin:
    """Sophia optimiser for a GradDiff-family trainer.

    Method arguments: `betas` (0.965, 0.99), `rho` (0.04), `hessian_mode` ("gnb" | "grad2"),
    `hessian_interval` (10, gnb only), `soul_compat` (False), `sophia_bs` (None = the number of
    sampled label tokens in gnb mode, 5120 — the reference default — in grad2 mode). Learning rate,
    weight decay and the schedule come from the usual `TrainingArguments`.
    """

    def __init__(
        self,
        *args,
        betas=(0.965, 0.99),
        rho: float = 0.04,
        hessian_mode: str = "gnb",
        hessian_interval: int = 10,
        soul_compat: bool = False,
        sophia_bs=None,
        **kwargs,
    ):
        if hessian_mode not in HESSIAN_MODES:
            raise ValueError(
                f"hessian_mode={hessian_mode!r}; use one of {', '.join(HESSIAN_MODES)}"
            )
        if soul_compat and hessian_mode != "grad2":
            raise ValueError("soul_compat=True reproduces SOUL, which uses hessian_mode='grad2'")
        if int(hessian_interval) < 1:
            raise ValueError(f"hessian_interval must be >= 1 (got {hessian_interval})")
        super().__init__(*args, **kwargs)
        self.sophia_betas = tuple(float(b) for b in betas)
        self.sophia_rho = float(rho)
        self.hessian_mode = hessian_mode
        self.hessian_interval = int(hessian_interval)
        self.soul_compat = bool(soul_compat)
        self.sophia_bs = sophia_bs
        self._hessian_updates = 0
        self._last_hessian_step = -1
        if deepspeed_zero_stage(self) >= 1 and (hessian_mode == "gnb" or self.uses_masks()):
            raise NotImplementedError(
                f"DeepSpeed ZeRO stage {deepspeed_zero_stage(self)} partitions the optimizer "
                "state and gradients, but Sophia's GNB Hessian pass and SIMU's parameter masks "
                "need them whole. Run on one GPU or plain DDP (accelerate without DeepSpeed, or "
                "ZeRO stage 0), or use hessian_mode=grad2 without masks."
            )

    # -- optimiser -----------------------------------------------------------------------------
    def uses_masks(self) -> bool:
        """SIMU overrides this; masks need whole parameters."""
        return False

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        """{parameter name: bool mask} applied in SophiaG (SIMU's neuron masks)."""
        return {}

    def create_optimizer(self):
        if self.optimizer is not None:
            return self.optimizer
        model = unwrap_model(self.model)
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("no trainable parameters: every parameter has requires_grad=False")
        decay = [p for n, p in named if not is_no_decay_parameter(n, p)]
        no_decay = [p for n, p in named if is_no_decay_parameter(n, p)]
        groups = [
            {"params": decay, "weight_decay": self.args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        default_bs = 5120 if self.sophia_bs is None else self.sophia_bs
        self.optimizer = SophiaG(
            [g for g in groups if g["params"]],
            lr=self.args.learning_rate,
            betas=self.sophia_betas,
            rho=self.sophia_rho,
            weight_decay=self.args.weight_decay,
            bs=default_bs,
            auto_hessian=self.hessian_mode == "grad2",
            soul_compat=self.soul_compat,
        )
        parameters = dict(named)
        for name, mask in self.parameter_masks().items():
            self.optimizer.set_mask(parameters[name], mask.to(parameters[name].device))
        return self.optimizer

    # -- the Gauss-Newton-Bartlett pass --------------------------------------------------------
    def _hessian_due(self) -> bool:
        step = self.state.global_step
        return (
            self.hessian_mode == "gnb"
            and step % self.hessian_interval == self.hessian_interval - 1
            and step != self._last_hessian_step
        )

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self._hessian_due():
            self._last_hessian_step = self.state.global_step
            self.gauss_newton_bartlett_update(model, inputs)
        return loss

    def _sampled_label_loss(self, model, batch: dict) -> tuple[torch.Tensor, int]:
        """Summed CE of labels drawn from the model's own softmax at the answer positions."""
        inputs = model_inputs(batch, with_labels=False)
        logits = model(**inputs).logits[:, :-1]
        positions = batch["labels"][:, 1:] != IGNORE_INDEX
        if not bool(positions.any()):
            return logits.sum() * 0.0, 0
        chosen = logits[positions].float()
        with torch.no_grad():
            sampled = torch.multinomial(torch.softmax(chosen, dim=-1), 1).squeeze(-1)
        loss = torch.nn.functional.cross_entropy(chosen, sampled, reduction="sum")
        return loss, int(positions.sum())

    def gauss_newton_bartlett_update(self, model, inputs) -> None:
        """Refresh the Hessian EMA with ĥ = grad² of the sampled-label CE (training grads kept)."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        stashed = [None if p.grad is None else p.grad.clone() for p in params]
        for p in params:
            p.grad = None
        batches = [inputs[k] for k in ("forget", "retain") if k in inputs] or [inputs]
        total, tokens = None, 0
        for batch in batches:
            loss, count = self._sampled_label_loss(model, batch)
            total = loss if total is None else total + loss
            tokens += count
        if tokens == 0:
            raise ValueError("the Hessian batch has no answer tokens (all labels are -100)")
        if self.accelerator.num_processes > 1:
            # DDP averages the gradient over ranks, so ĥ stands for every rank's labels.
            count = torch.tensor(float(tokens), device=self.accelerator.device)
            tokens = int(self.accelerator.reduce(count, reduction="sum").item())
        # Plain backward: accelerate's would divide by the accumulation steps (ĥ is per batch).
        # Under DDP the backward through the wrapped model all-reduces (averages) it as usual.
        (total / tokens).backward()
        if self.args.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.args.max_grad_norm)
        self.optimizer_for_hessian().update_hessian()
        if self.sophia_bs is None:
            for group in self.optimizer_for_hessian().param_groups:
                group["bs"] = tokens
        for p, grad in zip(params, stashed, strict=True):
            p.grad = grad
        self._hessian_updates += 1

    def optimizer_for_hessian(self) -> SophiaG:
        """The SophiaG instance behind accelerate's wrapper."""
        optimizer = self.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    # -- logging -------------------------------------------------------------------------------
    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self.optimizer is not None:
            win_rate = self.optimizer_for_hessian().win_rate()
            if win_rate is not None:
                logs["sophia/win_rate"] = win_rate
            logs["sophia/hessian_updates"] = self._hessian_updates
        return super().log(logs, *args, **kwargs)
