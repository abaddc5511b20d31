"""SophiaG: Sophia with a diagonal Gauss-Newton-Bartlett Hessian estimate (Liu et al., ICLR 2024)."""

from __future__ import annotations

import torch
from torch.optim import Optimizer

from asu_simu_plugin.methods.sophia.kernels import (
    LOW_PRECISION_DTYPES,
    fold_hessians,
    sophia_update,
)

# State entries kept in their own dtype on load (torch would cast them to the parameter dtype).
FP32_STATE_KEYS = ("exp_avg", "hessian", "residual")
HESSIAN_MODES = ("grad2", "gnb")


class SophiaG(Optimizer):
    r"""SophiaG as in the reference code (Liuhong99/Sophia ``sophia.py``), plus fp32 state and masks.

    Per coordinate, with ``g`` the gradient (negated when ``maximize``), ``h`` the Hessian EMA:

    .. code-block:: text

        θ ← θ · (1 − lr · weight_decay)                      decoupled weight decay
        m ← β₁ · m + (1 − β₁) · g                            momentum, no bias correction
        θ ← θ − lr · sign(m) · min(|m| / (rho · bs · h + 1e-15), 1)

    The Hessian EMA ``h ← β₂ · h + (1 − β₂) · ĝ²`` needs a source, chosen by ``hessian_mode``:

    - ``"grad2"`` (default; SOUL's): every ``step()`` first folds the gradient of the loss being
      optimised, squared, into the EMA and then updates with it. Nothing else to call, so a plain
      training loop (or any trainer given this optimizer) gets a real second-order estimate.
    - ``"gnb"`` (Sophia-G as published): the EMA changes only through ``update_hessian()``, which
      folds the current ``.grad`` squared in. Call it right after back-propagating the mean
      cross-entropy of labels sampled from the model (every k = 10 steps in the paper). Until the
      first estimate, h = 0 and every coordinate takes a sign step of size ``lr``, so choose this
      mode only with such a pass (the Sophia trainers with ``hessian_mode: gnb`` run it).

    ``bs`` is the number of labels behind the estimate: the stored EMA lacks that factor and it is
    applied at step time, as in the reference, unless it is given to ``update_hessian(bs=...)``,
    which folds each batch's own factor in (then step with ``bs=1``; batches of different sizes
    are weighted correctly).

    Options, all per parameter group: ``lr``, ``betas``, ``rho``, ``weight_decay``, ``bs`` (also
    ``step(bs=...)`` for one call), ``maximize``, ``hessian_mode``, ``soul_compat``, ``foreach``.

    - ``soul_compat=True`` reproduces OPTML-Group/SOUL ``src/optim/sophia.py`` exactly (state in
      fp32 aside), with the ``grad2`` Hessian. It folds the same gradient into the momentum twice
      per step, first the raw ``.grad`` and then the (``maximize``-negated) gradient, so the
      effective momentum is ``m ← β₁² · m + (1 − β₁²) · g`` (with ``maximize``:
      ``β₁² · m − (1 − β₁)² · grad``). SOUL's ``bs`` is 5120 because the HF trainer never passes
      it, which is also the constructor default here.
    - ``foreach``: True for the multi-tensor path (one ``torch._foreach_*`` call per operation
      over many tensors), False for the per-parameter loop (the reference); None (default) picks
      the multi-tensor path off CPU and the loop on CPU, where it is faster (torch's CPU foreach
      ops loop over the tensors one by one; `benchmarks/perf_sophia.py`). Both give the same
      values (bit-identical on CPU; see `kernels`). Non-contiguous tensors always take the loop.

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
    clipped, ``|m| < rho · bs · h``. Sophia's authors tune ``rho`` to keep it in 0.1–0.5. Counting
    costs a comparison per coordinate; ``track_win_rate=False`` skips it (``win_rate()`` is None).
    """

    # CPU parameters are updated in slices of about this many entries (see `kernels`), and the
    # multi-tensor path hands blocks of up to `cpu_block_elements` entries to each foreach call
    # (elsewhere `block_elements`, which bounds its temporaries).
    cpu_chunk_elements = 1 << 18
    cpu_block_elements = 1 << 18
    block_elements = 1 << 26
    # DeepSpeed ZeRO steps one flat partition group per step() call: the caller that knows
    # where an optimizer step starts sets this and calls `reset_win_counts()` there.
    accumulate_win_counts = False

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
        hessian_mode: str = "grad2",
        soul_compat: bool = False,
        foreach: bool | None = None,
        track_win_rate: bool = True,
    ):
        defaults = dict(
            lr=lr,
            betas=betas,
            rho=rho,
            weight_decay=weight_decay,
            bs=bs,
            maximize=maximize,
            hessian_mode=hessian_mode,
            soul_compat=soul_compat,
            foreach=foreach,
        )
        self.track_win_rate = bool(track_win_rate)
        super().__init__(params, defaults)
        self._init_bookkeeping()

    def _init_bookkeeping(self) -> None:
        # Not part of the saved state: both are rebuilt from the first step after a load.
        self._written_version = {}  # param -> its version counter right after our last write
        self._win_counts = None  # {device: [unclipped, active]} of the last step

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # groups saved before `hessian_mode` / `foreach` existed
            auto = group.pop("auto_hessian", True)
            group.setdefault("hessian_mode", "grad2" if auto else "gnb")
            group.setdefault("foreach", None)
        if "_written_version" not in self.__dict__:
            self.track_win_rate = True
            self._init_bookkeeping()

    def add_param_group(self, param_group: dict) -> None:
        merged = {**self.defaults, **{k: v for k, v in param_group.items() if k != "params"}}
        _validate_options(merged, len(self.param_groups))
        param_group = dict(param_group)
        param_group["betas"] = tuple(float(b) for b in merged["betas"])
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
            params = _with_grad(group)
            states = [self._state_for(p) for p in params]
            fold_hessians(
                params,
                [state["hessian"] for state in states],
                [state.get("mask") for state in states],
                beta2=group["betas"][1],
                scale=1.0 if bs is None else float(bs),
                foreach=_use_foreach(group, params),
                chunk=self.cpu_chunk_elements,
                block=self._block_elements(params),
            )

    # -- step ----------------------------------------------------------------------------------
    def _block_elements(self, params) -> int:
        return self.cpu_block_elements if _on_cpu(params) else self.block_elements

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
            params = _with_grad(group)
            if not params:
                continue
            states = [self._state_for(p) for p in params]
            torch._foreach_add_([state["step"] for state in states], 1)
            # A low-precision parameter changed outside the optimizer (or seen for the first
            # time) gets its stored rounding remainders checked against its current value.
            checks = [self._written_version.get(p) != p._version for p in params]
            counts = sophia_update(
                params,
                [p.grad for p in params],
                [state["exp_avg"] for state in states],
                [state["hessian"] for state in states],
                [state.get("residual") for state in states],
                [state.get("mask") for state in states],
                checks,
                lr=group["lr"],
                beta1=group["betas"][0],
                beta2=group["betas"][1],
                weight_decay=group["weight_decay"],
                hessian_scale=group["rho"] * (group["bs"] if bs is None else bs),
                maximize=group["maximize"],
                fold_hessian=group["hessian_mode"] == "grad2",
                soul_compat=group["soul_compat"],
                count_wins=self.track_win_rate,
                foreach=_use_foreach(group, params),
                chunk=self.cpu_chunk_elements,
                block=self._block_elements(params),
            )
            for device, (unclipped, active) in counts.items():
                total = win_counts.setdefault(device, [0, 0])
                total[0], total[1] = unclipped + total[0], active + total[1]
            for p in params:
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
    mode = options["hessian_mode"]
    if mode not in HESSIAN_MODES:
        raise ValueError(
            f"{where}: hessian_mode={mode!r}; use 'grad2' (the loss gradient squared, every step) "
            "or 'gnb' (only what update_hessian() folds in, e.g. Sophia-G's sampled labels)"
        )
    if options["soul_compat"] and mode != "grad2":
        raise ValueError(
            f"{where}: soul_compat=True reproduces SOUL, whose Hessian is 'grad2'; drop "
            f"hessian_mode={mode!r} or soul_compat"
        )
    if options["foreach"] not in (None, True, False):
        raise ValueError(f"{where}: foreach={options['foreach']!r}; use None, True or False")


def _on_cpu(params) -> bool:
    return all(p.device.type == "cpu" for p in params)


def _use_foreach(group: dict, params) -> bool:
    """The group's `foreach`; by default the multi-tensor path off CPU only, as torch.optim: on
    CPU, foreach ops loop over the tensors in C++ without fused kernels (measured slower)."""
    return not _on_cpu(params) if group["foreach"] is None else group["foreach"]


def _with_grad(group: dict) -> list:
    params = [p for p in group["params"] if p.grad is not None]
    for p in params:
        if p.grad.is_sparse:
            raise RuntimeError("SophiaG does not support sparse gradients")
    return params
