"""SophiaG: Sophia with a diagonal Gauss-Newton-Bartlett Hessian estimate (Liu et al., ICLR 2024)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

# Parameters stored in these dtypes get an fp32 rounding remainder in the state (see SophiaG).
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
# State entries kept in their own dtype on load (torch would cast them to the parameter dtype).
FP32_STATE_KEYS = ("exp_avg", "hessian", "residual")
EPS = 1e-15  # added to the clipping denominator, as in the reference


class SophiaG(Optimizer):
    r"""SophiaG as in the reference code (Liuhong99/Sophia ``sophia.py``), plus fp32 state and masks.

    Per coordinate, with ``g`` the gradient (negated when ``maximize``), ``h`` the Hessian EMA:

    .. code-block:: text

        θ ← θ · (1 − lr · weight_decay)                      decoupled weight decay
        m ← β₁ · m + (1 − β₁) · g                            momentum, no bias correction
        θ ← θ − lr · sign(m) · min(|m| / (rho · bs · h + 1e-15), 1)

    ``update_hessian()`` folds the current ``.grad`` squared into ``h ← β₂ · h + (1 − β₂) · grad²``.
    For Sophia-G call it right after back-propagating the mean cross-entropy of labels sampled from
    the model (every k = 10 steps in the paper); ``bs`` is the number of those labels: the stored
    EMA lacks that factor and it is applied at step time, as in the reference, unless it is given
    to ``update_hessian(bs=...)``, which folds each batch's own factor in (then step with
    ``bs=1``; batches of different sizes are weighted correctly). Until the first
    Hessian estimate, h = 0 and every coordinate takes a sign step of size ``lr``.

    Options, all per parameter group: ``lr``, ``betas``, ``rho``, ``weight_decay``, ``bs`` (also
    ``step(bs=...)`` for one call), ``maximize``, ``auto_hessian``, ``soul_compat``.

    Hessian modes:

    - ``auto_hessian=False`` (default): the Hessian changes only through ``update_hessian()``.
    - ``auto_hessian=True`` (SOUL's "grad2" mode): every ``step()`` first folds the gradient of the
      loss being optimised, squared, into the EMA and then updates with it; no extra pass.
    - ``soul_compat=True`` reproduces OPTML-Group/SOUL ``src/optim/sophia.py`` exactly (state in
      fp32 aside): it implies ``auto_hessian`` and folds the same gradient into the momentum twice
      per step, first the raw ``.grad`` and then the (``maximize``-negated) gradient, so the
      effective momentum is ``m ← β₁² · m + (1 − β₁²) · g`` (with ``maximize``:
      ``β₁² · m − (1 − β₁)² · grad``). SOUL's ``bs`` is 5120 because the HF trainer never passes
      it, which is also the constructor default here.

    Precision: ``step``, ``exp_avg`` and ``hessian`` are fp32 whatever the parameter dtype, and the
    update is computed in fp32. A bf16/fp16 parameter also gets ``residual``, an fp32 tensor holding
    the rounding remainder ``θ − float(round(θ))`` of its last update. ``p.float() + residual`` is
    exactly the fp32 value an fp32 run would hold (a master copy in the same memory), so updates
    smaller than half the parameter's rounding step accumulate instead of being lost. When the
    parameter is changed in place outside the optimizer (its version counter moves: ``copy_``,
    ``load_state_dict``), the remainder is dropped wherever it no longer rounds back to the new
    value; changes made through ``.data`` are not seen and keep the old remainder (off by less than
    half a rounding step of the old value). fp64 parameters are updated in fp64.

    Masks (SIMU's "triple masking"): ``set_mask(param, mask)`` restricts every update to the entries
    where ``mask`` is True. Masked-out entries keep value, momentum and Hessian bit-identical, weight
    decay and ``update_hessian()`` included. Masks live in the optimizer state, so they are saved
    and restored with ``state_dict()``/``load_state_dict()``; a restored run continues bit-identically.

    ``win_rate()``: the fraction of (unmasked) coordinates updated in the last step that were not
    clipped, ``|m| < rho · bs · h``. Sophia's authors tune ``rho`` to keep it in 0.1–0.5.
    """

    # CPU parameters are updated in slices of about this many entries (see `_parts`).
    # DeepSpeed ZeRO steps one flat partition group per step() call: the caller that knows
    # where an optimizer step starts sets this and calls `reset_win_counts()` there.
    accumulate_win_counts = False
    cpu_chunk_elements = 1 << 18

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
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            bs=bs,
            maximize=maximize,
            auto_hessian=auto_hessian,
            soul_compat=soul_compat,
        )
        super().__init__(params, defaults)
        self._init_bookkeeping()

    def _init_bookkeeping(self) -> None:
        # Not part of the saved state: both are rebuilt from the first step after a load.
        self._written_version = {}  # param -> its version counter right after our last write
        self._win_counts = None  # {device: [unclipped, active]} of the last step

    def __setstate__(self, state):
        super().__setstate__(state)
        if "_written_version" not in self.__dict__:
            self._init_bookkeeping()

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_options(merged, len(self.param_groups))
        param_group = dict(param_group)
        param_group["betas"] = tuple(float(b) for b in merged["betas"])
        param_group["auto_hessian"] = bool(merged["auto_hessian"] or merged["soul_compat"])
        super().add_param_group(param_group)

    # -- state ---------------------------------------------------------------------------------
    def _state_for(self, p: torch.Tensor) -> dict:
        state = self.state[p]
        if "exp_avg" not in state:
            if p.is_complex():
                raise TypeError("SophiaG does not support complex parameters")
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
            state["hessian"] = torch.zeros_like(p, dtype=torch.float32)
        if p.dtype in LOW_PRECISION_DTYPES and "residual" not in state:
            state["residual"] = torch.zeros_like(p, dtype=torch.float32)
        return state

    def init_state(self) -> None:
        """Create every parameter's state now instead of at its first update.

        DeepSpeed ZeRO-1/2 links its per-parameter views of the optimizer state once, right
        after stepping the first parameter group: state created later (other groups) would
        stay invisible to its accessors (`safe_get_full_optimizer_state`, checkpoints).
        """
        for group in self.param_groups:
            for p in group["params"]:
                self._state_for(p)

    def _managed(self, param: torch.Tensor) -> bool:
        return any(param is p for group in self.param_groups for p in group["params"])

    def set_mask(self, param: torch.Tensor, mask: torch.Tensor | None) -> None:
        """Update only the entries of `param` where `mask` is True; `None` removes the mask.

        `mask` is a torch.bool tensor that broadcasts to the parameter's shape, e.g. shape
        ``(1, d_ff)`` selects columns of a ``(d_model, d_ff)`` weight. It is copied to the
        parameter's device and stored in the optimizer state (saved with ``state_dict()``).
        """
        if not self._managed(param):
            raise ValueError(
                f"set_mask: the parameter of shape {tuple(param.shape)} is not in any of this "
                "optimizer's parameter groups; pass one of the tensors given to SophiaG"
            )
        state = self._state_for(param)
        if mask is None:
            state.pop("mask", None)
            return
        if not torch.is_tensor(mask) or mask.dtype != torch.bool:
            kind = mask.dtype if torch.is_tensor(mask) else type(mask).__name__
            raise TypeError(
                f"set_mask: the mask must be a torch.bool tensor (got {kind}) for the parameter "
                f"of shape {tuple(param.shape)}; convert it with `mask.bool()` or `mask != 0`"
            )
        try:
            shape = torch.broadcast_shapes(mask.shape, param.shape)
        except RuntimeError:
            shape = None
        if shape != param.shape:
            raise ValueError(
                f"set_mask: a mask of shape {tuple(mask.shape)} does not broadcast to the "
                f"parameter's shape {tuple(param.shape)}; give it that shape or one with size-1 "
                "dimensions where the whole dimension shares a value"
            )
        state["mask"] = mask.to(device=param.device, copy=True)

    def mask_of(self, param: torch.Tensor) -> torch.Tensor | None:
        """The mask set on `param`, or None."""
        return self.state[param].get("mask") if param in self.state else None

    # -- Hessian -------------------------------------------------------------------------------
    @torch.no_grad()
    def update_hessian(self, bs: float | None = None) -> None:
        """h ← β₂·h + (1 − β₂)·grad² for every parameter with a gradient (masks respected).

        With `bs` (the number of sampled labels behind this gradient) the estimate folded in is
        bs·grad², Sophia-G's ĥ = B·ĝ⊙ĝ of this batch, so estimates from batches of different
        sizes keep their own factor; then step with ``bs=1``. Without it the factor is left to
        step time (``bs`` of the group), as in the reference code.
        """
        if bs is not None and not bs > 0:
            raise ValueError(f"update_hessian(bs={bs}): bs must be > 0 (sampled label tokens)")
        for group in self.param_groups:
            beta2 = group["betas"][1]
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                state = self._state_for(p)
                mask = _aligned_mask(state.get("mask"), p)
                for part in self._parts(p):
                    _fold_hessian(
                        part(state["hessian"]),
                        _fp32(part(p.grad)),
                        beta2,
                        _mask_part(mask, part),
                        scale=1.0 if bs is None else float(bs),
                    )

    # -- step ----------------------------------------------------------------------------------
    def _parts(self, p: torch.Tensor):
        """Functions taking a tensor shaped like `p` to one slice along dim 0; together they cover it.

        On CPU the slices hold about `cpu_chunk_elements` entries, so the update's temporaries stay
        cache-sized and are reused instead of freshly allocated (and page-faulted) per parameter.
        Elsewhere one part covers the whole tensor: fewer kernel launches.
        """
        chunk = self.cpu_chunk_elements
        if p.dim() == 0 or p.device.type != "cpu" or p.numel() <= chunk:
            return [lambda t: t]
        rows = max(1, chunk // (p.numel() // p.shape[0]))
        return [lambda t, i=i: t[i : i + rows] for i in range(0, p.shape[0], rows)]

    @torch.no_grad()
    def step(self, closure=None, bs=None):
        """One Sophia update of every parameter with a gradient; `bs` overrides the groups' bs."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if bs is not None and not bs > 0:
            raise ValueError(f"step(bs={bs}): bs must be > 0 (tokens behind the Hessian estimate)")
        win_counts = {}
        for group in self.param_groups:
            options = dict(group, hessian_scale=group["rho"] * (group["bs"] if bs is None else bs))
            for p in group["params"]:
                if p.grad is None:
                    continue
                _check_grad(p)
                state = self._state_for(p)
                state["step"] += 1
                mask = _aligned_mask(state.get("mask"), p)
                # A low-precision parameter changed outside the optimizer (or seen for the first
                # time) gets its stored rounding remainders checked against its current value.
                check_residual = self._written_version.get(p) != p._version
                counts = win_counts.setdefault(p.device, [0, 0])
                for part in self._parts(p):
                    unclipped, active = _update_part(
                        part(p),
                        part(p.grad),
                        part(state["exp_avg"]),
                        part(state["hessian"]),
                        part(state["residual"]) if p.dtype in LOW_PRECISION_DTYPES else None,
                        _mask_part(mask, part),
                        options,
                        check_residual,
                    )
                    counts[0] = unclipped + counts[0]
                    counts[1] = active + counts[1]
                if p.dtype in LOW_PRECISION_DTYPES:
                    self._written_version[p] = p._version
        if self.accumulate_win_counts and self._win_counts:  # one step in several calls
            for device, (unclipped, active) in win_counts.items():
                counts = self._win_counts.setdefault(device, [0, 0])
                counts[0], counts[1] = counts[0] + unclipped, counts[1] + active
        else:
            self._win_counts = win_counts or None
        return loss

    def win_rate(self) -> float | None:
        """Fraction of unmasked coordinates not clipped in the last step (|m| < rho·bs·h).

        None before the first step or when the last step updated nothing. 0 means every
        coordinate took a full sign step of size lr (e.g. before the first Hessian estimate).
        """
        counts = self.win_counts()
        return counts[0] / counts[1] if counts and counts[1] else None

    def reset_win_counts(self) -> None:
        self._win_counts = None

    def win_counts(self) -> tuple[float, float] | None:
        """(unclipped, updated) coordinates of the last step; None before the first."""
        if not self._win_counts:
            return None
        unclipped = sum(float(counts[0]) for counts in self._win_counts.values())
        active = sum(float(counts[1]) for counts in self._win_counts.values())
        return unclipped, active

    # -- checkpoints ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state saved by `state_dict()`; fp32 state stays fp32, masks stay boolean."""
        # torch casts every floating tensor (and the masks) to the parameter's dtype: take our
        # entries out, let torch restore the rest, then put them back in their own dtypes.
        state_dict = dict(state_dict)
        kept, rest = {}, {}
        for index, values in state_dict["state"].items():
            values = dict(values)
            kept[index] = {
                key: values.pop(key) for key in (*FP32_STATE_KEYS, "step", "mask") if key in values
            }
            rest[index] = values
        state_dict["state"] = rest
        super().load_state_dict(state_dict)
        by_index = {
            index: p
            for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=True)
            for index, p in zip(saved["params"], group["params"], strict=True)
        }
        for index, values in kept.items():
            p = by_index[index]
            state = self.state[p]
            for key, value in values.items():
                if key == "mask":
                    state[key] = value.to(device=p.device, dtype=torch.bool)
                elif key == "step":  # a copy: the loaded dict's tensor is not stepped in place
                    state[key] = value.detach().to(dtype=torch.float32, copy=True)
                else:
                    state[key] = value.to(device=p.device, dtype=torch.float32)
        self._init_bookkeeping()


def _validate_options(options: dict, index: int) -> None:
    where = f"SophiaG (parameter group {index})"
    lr, rho, decay, bs = options["lr"], options["rho"], options["weight_decay"], options["bs"]
    if not lr >= 0.0:
        raise ValueError(f"{where}: lr={lr}; the learning rate must be >= 0")
    if not rho > 0.0:
        raise ValueError(
            f"{where}: rho={rho}; rho must be > 0 (it scales the Hessian in the clipping "
            "denominator; the reference default is 0.04)"
        )
    betas = options["betas"]
    try:
        betas = tuple(float(b) for b in betas)
    except (TypeError, ValueError):
        betas = ()
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ValueError(
            f"{where}: betas={options['betas']}; give two numbers in [0, 1), e.g. (0.965, 0.99)"
        )
    if not decay >= 0.0:
        raise ValueError(f"{where}: weight_decay={decay}; it must be >= 0")
    if not bs > 0:
        raise ValueError(f"{where}: bs={bs}; it must be > 0 (tokens behind the Hessian estimate)")


def _check_grad(p: torch.Tensor) -> None:
    if p.grad.is_sparse:
        raise RuntimeError("SophiaG does not support sparse gradients")


def _fp32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _aligned_mask(mask: torch.Tensor | None, p: torch.Tensor) -> torch.Tensor | None:
    """The mask with leading size-1 dimensions added up to p.dim(), so it slices along dim 0."""
    if mask is None or mask.dim() == p.dim():
        return mask
    return mask.reshape((1,) * (p.dim() - mask.dim()) + tuple(mask.shape))


def _mask_part(mask: torch.Tensor | None, part) -> torch.Tensor | None:
    if mask is None or mask.dim() == 0 or mask.shape[0] == 1:
        return mask
    return part(mask)


def _fold_hessian(hessian, grad, beta2: float, mask, scale: float = 1.0) -> None:
    value = (1 - beta2) * scale
    if mask is None:
        hessian.mul_(beta2).addcmul_(grad, grad, value=value)
    else:
        folded = hessian.mul(beta2).addcmul_(grad, grad, value=value)
        torch.where(mask, folded, hessian, out=hessian)


def _update_part(p, grad, exp_avg, hessian, residual, mask, options, check_residual):
    """The Sophia update of one slice of a parameter, in place; returns (unclipped, active) counts.

    Without a mask the stored tensors are updated in place; with one the update is computed on
    copies and written back only where the mask is True.
    """
    beta1, beta2 = options["betas"]
    lr, decay = options["lr"], options["weight_decay"]
    grad = _fp32(grad)
    if options["auto_hessian"]:
        _fold_hessian(hessian, grad, beta2, mask)
    if residual is not None:  # low precision: work on the exact fp32 value p + remainder
        theta = p.float()
        if check_residual:  # keep a remainder only where it still rounds back to p
            residual.masked_fill_(theta.add(residual).to(p.dtype) != p, 0.0)
        theta.add_(residual)
    else:
        theta = p if mask is None else p.clone()
    momentum = exp_avg if mask is None else exp_avg.clone()

    if decay != 0:
        theta.mul_(1 - lr * decay)
    if options["soul_compat"]:  # SOUL's update_exp_avg(): the raw gradient, once more
        momentum.mul_(beta1).add_(grad, alpha=1 - beta1)
    grad_sign = -1.0 if options["maximize"] else 1.0
    momentum.mul_(beta1).add_(grad, alpha=grad_sign * (1 - beta1))
    denominator = hessian.mul(options["hessian_scale"])
    ratio = momentum.abs()
    unclipped = ratio < denominator  # |m| < rho·bs·h
    ratio.div_(denominator.add_(EPS)).clamp_(max=1).copysign_(momentum)
    theta.add_(ratio, alpha=-lr)  # θ − lr·sign(m)·min(|m| / (rho·bs·h + ε), 1)

    if mask is None:
        active = theta.numel()
    else:
        unclipped.logical_and_(mask)
        active = torch.count_nonzero(mask) * (theta.numel() // mask.numel())
        torch.where(mask, momentum, exp_avg, out=exp_avg)
        if residual is None:
            torch.where(mask, theta, p, out=p)
    if residual is not None:
        if mask is None:
            p.copy_(theta)
            torch.sub(theta, p, out=residual)
        else:
            rounded = theta.to(p.dtype)
            torch.where(mask, theta.sub_(rounded), residual, out=residual)
            torch.where(mask, rounded, p, out=p)
    return torch.count_nonzero(unclipped), active
