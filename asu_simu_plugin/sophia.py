"""SophiaG: Sophia with a diagonal Gauss-Newton-Bartlett Hessian estimate (Liu et al., ICLR 2024).

The update is the reference implementation's (Liuhong99/Sophia `sophia.py`), per coordinate:

    θ ← θ · (1 − lr · weight_decay)                     decoupled weight decay
    m ← β₁ · m + (1 − β₁) · g                           momentum (no bias correction)
    θ ← θ − lr · sign(m) · min(|m| / (ρ · bs · h + 1e-15), 1)

and `update_hessian()` folds the current gradient squared into h ← β₂ · h + (1 − β₂) · g². Call it
right after back-propagating a loss on labels sampled from the model (Sophia-G); `bs` is the
number of those labels (the reference stores the EMA without it and applies it at step time).

Beyond the reference:
- State (`exp_avg`, `hessian`) is fp32 whatever the parameter dtype and the update is computed in
  fp32. Low-precision (bf16/fp16) parameters also get an fp32 master copy in the state, so
  updates smaller than the parameter's rounding step accumulate instead of being lost.
- Masks (`set_mask`): masked-out entries keep value, momentum and Hessian bit-identical, weight
  decay included (SIMU's "triple masking"). Masks live in the state and survive checkpoints.
- `auto_hessian=True` (SOUL's "grad2" mode): every `step()` first folds the gradient of the
  actual loss, squared, into the Hessian EMA — no extra pass.
- `soul_compat=True` reproduces OPTML-Group/SOUL's `sophia.py` for baseline fidelity: grad² Hessian
  every step, the momentum folded twice with the same gradient (m ← β₁²·m + (1 − β₁²)·g), and
  `bs` = 5120 because the HF trainer never passes it.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer

STATE_FP32_KEYS = ("exp_avg", "hessian", "master")


class SophiaG(Optimizer):
    def __init__(
        self,
        params,
        lr: float = 1e-4,
        betas=(0.965, 0.99),
        rho: float = 0.04,
        weight_decay: float = 0.1,
        *,
        maximize: bool = False,
        bs: float = 5120,
        auto_hessian: bool = False,
        soul_compat: bool = False,
    ):
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate {lr}: it must be >= 0")
        if not rho > 0.0:
            raise ValueError(f"invalid rho {rho}: it must be > 0 (the reference default is 0.04)")
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid betas {betas}: both must be in [0, 1)")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay {weight_decay}: it must be >= 0")
        if not bs > 0:
            raise ValueError(
                f"invalid bs {bs}: it must be > 0 (tokens behind the Hessian estimate)"
            )
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            maximize=maximize,
            bs=bs,
            auto_hessian=bool(auto_hessian or soul_compat),
            soul_compat=bool(soul_compat),
        )
        super().__init__(params, defaults)
        self._unclipped = None  # (count tensor, total) of the last step, for win_rate()

    # -- state ---------------------------------------------------------------------------------
    def _state(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["hessian"] = torch.zeros_like(p, dtype=torch.float32)
        if p.dtype != torch.float32:
            master = state.get("master")
            # (Re)sync the master copy if the parameter was changed outside the optimizer.
            if master is None or not torch.equal(master.to(p.dtype), p.detach()):
                state["master"] = p.detach().float().clone()
        return state

    def set_mask(self, param: torch.Tensor, mask) -> None:
        """Restrict updates of `param` to the entries where `mask` is True (None: no mask)."""
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("set_mask: the parameter is not managed by this optimizer")
        state = self._state(param)
        if mask is None:
            state.pop("mask", None)
            return
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            raise TypeError("set_mask: the mask must be a torch.bool tensor")
        try:
            torch.broadcast_shapes(mask.shape, param.shape)
        except RuntimeError as error:
            raise ValueError(
                f"set_mask: a mask of shape {tuple(mask.shape)} does not broadcast to the "
                f"parameter's shape {tuple(param.shape)}"
            ) from error
        if torch.broadcast_shapes(mask.shape, param.shape) != param.shape:
            raise ValueError(
                f"set_mask: mask shape {tuple(mask.shape)} would enlarge the parameter's "
                f"shape {tuple(param.shape)}"
            )
        state["mask"] = mask.to(param.device)

    def mask_of(self, param: torch.Tensor):
        return self.state[param].get("mask") if param in self.state else None

    # -- Hessian -------------------------------------------------------------------------------
    @staticmethod
    def _fold_hessian(state: dict, grad: torch.Tensor, beta2: float) -> None:
        updated = state["hessian"] * beta2 + (1 - beta2) * grad * grad
        mask = state.get("mask")
        if mask is None:
            state["hessian"].copy_(updated)
        else:
            state["hessian"].copy_(torch.where(mask, updated, state["hessian"]))

    @torch.no_grad()
    def update_hessian(self) -> None:
        """h ← β₂·h + (1 − β₂)·grad² for every parameter that has a gradient."""
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._fold_hessian(self._state(p), p.grad.float(), beta2)

    # -- step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None, bs=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        unclipped, total = None, 0
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, rho, decay = group["lr"], group["rho"], group["weight_decay"]
            group_bs = group["bs"] if bs is None else bs
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("SophiaG does not support sparse gradients")
                state = self._state(p)
                grad = p.grad.float()
                if group["maximize"]:
                    grad = -grad
                state["step"] += 1
                if group["auto_hessian"]:
                    self._fold_hessian(state, grad, beta2)
                theta = state["master"] if "master" in state else p
                mask = state.get("mask")
                exp_avg, hessian = state["exp_avg"], state["hessian"]

                new_theta = theta * (1 - lr * decay)
                new_avg = exp_avg * beta1 + (1 - beta1) * grad
                if group["soul_compat"]:  # SOUL folds the same gradient in twice
                    new_avg = new_avg * beta1 + (1 - beta1) * grad
                ratio = (new_avg.abs() / (rho * group_bs * hessian + 1e-15)).clamp(max=1)
                new_theta = new_theta.addcmul(new_avg.sign(), ratio, value=-lr)

                below = ratio < 1
                if mask is None:
                    theta.copy_(new_theta)
                    exp_avg.copy_(new_avg)
                    counted, size = below.sum(), below.numel()
                else:
                    theta.copy_(torch.where(mask, new_theta, theta))
                    exp_avg.copy_(torch.where(mask, new_avg, exp_avg))
                    full_mask = mask.expand_as(below)
                    counted, size = (below & full_mask).sum(), int(full_mask.sum())
                if theta is not p:
                    p.copy_(theta)
                unclipped = counted if unclipped is None else unclipped + counted
                total += size
        self._unclipped = (unclipped, total) if total else None
        return loss

    def win_rate(self) -> float | None:
        """Fraction of (unmasked) coordinates not clipped in the last step: |m| < ρ·bs·h.

        Sophia's authors tune ρ to keep it in 0.1–0.5; 0 means every coordinate took a
        sign-step of size lr (e.g. before the first Hessian estimate).
        """
        if self._unclipped is None:
            return None
        count, total = self._unclipped
        return float(count) / total

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict) -> None:
        # torch casts floating state to the parameter dtype (and masks to it too): keep the
        # fp32 state fp32 and the masks boolean.
        saved = {index: dict(values) for index, values in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        by_index = {
            index: p
            for saved_group, group in zip(
                state_dict["param_groups"], self.param_groups, strict=True
            )
            for index, p in zip(saved_group["params"], group["params"], strict=True)
        }
        for index, values in saved.items():
            p = by_index[index]
            for key in STATE_FP32_KEYS:
                if key in values:
                    self.state[p][key] = values[key].to(device=p.device, dtype=torch.float32)
            if "mask" in values:
                self.state[p]["mask"] = values["mask"].to(device=p.device, dtype=torch.bool)
        self._unclipped = None
