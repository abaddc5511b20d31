"""SophiaG's update kernels: a per-parameter reference and a multi-tensor (``torch._foreach_*``) path.

`SophiaG.step()` collects each parameter group's tensors and calls `sophia_update`, which runs
`_single_tensor_update` (a loop over parameters, the reference) or `_multi_tensor_update` (one
foreach call per operation over many tensors), as torch.optim's Adam does. Masks are explicit
arguments, so a caller holding flat partitions (DeepSpeed ZeRO) passes masks aligned with them.

Both paths run the same operations in the same order on the same pieces of memory, so they give
bit-identical results on CPU. The pieces: on CPU a tensor is cut along dim 0 into slices of about
`chunk` entries, so an update's temporaries stay cache-sized; the multi-tensor path also packs
slices and small tensors into blocks of about `block` entries per foreach call. Elsewhere a piece
is a whole tensor (the multi-tensor path: at most `block` entries, which bounds its temporaries).
On CPU torch's foreach ops are C++ loops over the same per-tensor kernels (some slower than the
direct calls), so there the loop is as fast or faster and `SophiaG` uses it by default.

The step ``sign(m) · min(|m| / d, 1)`` with ``d = rho·bs·h + ε`` is computed as
``m / max(d, |m|)``: the same value bit for bit wherever ``m`` is finite (both are ±1 when
``|m| ≥ d``, and ``m / d`` otherwise), in two passes instead of three.
"""

from __future__ import annotations

import torch

# Parameters stored in these dtypes get an fp32 rounding remainder in the state (see SophiaG).
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)
EPS = 1e-15  # added to the clipping denominator, as in the reference


def sophia_update(
    params,
    grads,
    exp_avgs,
    hessians,
    residuals,
    masks,
    check_residual,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    weight_decay: float,
    hessian_scale: float,
    maximize: bool,
    fold_hessian: bool,
    soul_compat: bool,
    count_wins: bool,
    foreach: bool,
    chunk: int,
    block: int,
) -> dict:
    """One Sophia update of `params` in place; returns {device: [unclipped, updated]} counts.

    Per parameter: its gradient, fp32 `exp_avg` and `hessian`, the fp32 rounding remainder of a
    low-precision parameter (else None), its mask (broadcastable bool, else None) and whether its
    remainder must be checked against the parameter (changed outside the optimizer). Counts are
    0-dim tensors or ints (not synchronised); empty when `count_wins` is False.
    """
    options = dict(
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        weight_decay=weight_decay,
        hessian_scale=hessian_scale,
        maximize=maximize,
        fold_hessian=fold_hessian,
        soul_compat=soul_compat,
        count_wins=count_wins,
    )
    rows = list(
        zip(params, grads, exp_avgs, hessians, residuals, masks, check_residual, strict=True)
    )
    counts: dict = {}
    if foreach:
        rows = _multi_tensor_update(rows, options, counts, chunk, block)
    _single_tensor_update(rows, options, counts, chunk)  # the rest: non-contiguous tensors
    return counts


def fold_hessians(params, hessians, masks, *, beta2, scale, foreach, chunk, block) -> None:
    """h ← β₂·h + (1 − β₂)·scale·grad² for each parameter (its `.grad`), masks respected."""
    value = (1 - beta2) * scale
    rows = [
        (p, p.grad, None, h, None, m, False)
        for p, h, m in zip(params, hessians, masks, strict=True)
    ]
    if foreach:
        flat, rows = _split_flat(rows)
        for group in _by_device_and_dtype(flat):
            for pieces in _blocks(group, chunk, block):
                _, grads, _, hessian, _, mask, _ = (
                    list(column) for column in zip(*pieces, strict=True)
                )
                _fold_block(hessian, [_fp32(g) for g in grads], beta2, value, mask)
    for p, grad, _, hessian, _, mask, _ in rows:
        mask = _aligned_mask(mask, p)
        for part in _parts(p, chunk):
            _fold_part(part(hessian), _fp32(part(grad)), beta2, value, _mask_part(mask, part))


# -- the reference: one parameter, one slice at a time ---------------------------------------------
def _single_tensor_update(rows, options, counts, chunk) -> None:
    for p, grad, exp_avg, hessian, residual, mask, check in rows:
        mask = _aligned_mask(mask, p)
        for part in _parts(p, chunk):
            unclipped, active = _update_part(
                part(p),
                part(grad),
                part(exp_avg),
                part(hessian),
                None if residual is None else part(residual),
                _mask_part(mask, part),
                options,
                check,
            )
            _add_counts(counts, p.device, unclipped, active)


def _update_part(p, grad, exp_avg, hessian, residual, mask, options, check_residual):
    """The Sophia update of one slice of a parameter, in place; returns (unclipped, active) counts.

    Without a mask the stored tensors are updated in place; with one the update is computed on
    copies and written back only where the mask is True.
    """
    beta1, lr, decay = options["beta1"], options["lr"], options["weight_decay"]
    grad = _fp32(grad)
    if options["fold_hessian"]:
        _fold_part(hessian, grad, options["beta2"], 1 - options["beta2"], mask)
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
    unclipped = active = None
    if options["count_wins"]:
        unclipped, active = _wins(ratio, denominator, mask, theta.numel())
    torch.maximum(ratio, denominator.add_(EPS), out=ratio)
    # θ − lr·sign(m)·min(|m| / (rho·bs·h + ε), 1)
    theta.add_(torch.div(momentum, ratio, out=ratio), alpha=-lr)

    if mask is not None:
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
    return unclipped, active


# -- the multi-tensor path -----------------------------------------------------------------------
def _multi_tensor_update(rows, options, counts, chunk, block) -> list:
    """Updates every row whose tensors are contiguous; returns the others (for the reference)."""
    flat, rest = _split_flat(rows)
    for group in _by_device_and_dtype(flat):
        for pieces in _blocks(group, chunk, block):
            _update_block(*(list(column) for column in zip(*pieces, strict=True)), options, counts)
    return rest


def _update_block(params, grads, exp_avgs, hessians, residuals, masks, checks, options, counts):
    """`_update_part` on lists of pieces, one foreach call per operation; the same arithmetic."""
    beta1, lr, decay = options["beta1"], options["lr"], options["weight_decay"]
    masked = [i for i, mask in enumerate(masks) if mask is not None]
    grads = [_fp32(g) for g in grads]
    if options["fold_hessian"]:
        _fold_block(hessians, grads, options["beta2"], 1 - options["beta2"], masks)
    if residuals[0] is not None:  # a block shares its dtype: every piece has a remainder
        theta = [p.float() for p in params]
        for i in (i for i, check in enumerate(checks) if check):
            stale = theta[i].add(residuals[i]).to(params[i].dtype) != params[i]
            residuals[i].masked_fill_(stale, 0.0)
        torch._foreach_add_(theta, residuals)
    else:
        theta = list(params)
        for i in masked:
            theta[i] = params[i].clone()
    momentum = list(exp_avgs)
    for i in masked:
        momentum[i] = exp_avgs[i].clone()

    if decay != 0:
        torch._foreach_mul_(theta, 1 - lr * decay)
    if options["soul_compat"]:
        torch._foreach_mul_(momentum, beta1)
        torch._foreach_add_(momentum, grads, alpha=1 - beta1)
    grad_sign = -1.0 if options["maximize"] else 1.0
    torch._foreach_mul_(momentum, beta1)
    torch._foreach_add_(momentum, grads, alpha=grad_sign * (1 - beta1))
    denominators = torch._foreach_mul(hessians, options["hessian_scale"])
    ratios = torch._foreach_abs(momentum)
    if options["count_wins"]:
        for ratio, denominator, mask, t in zip(ratios, denominators, masks, theta, strict=True):
            _add_counts(counts, t.device, *_wins(ratio, denominator, mask, t.numel()))
    torch._foreach_add_(denominators, EPS)
    torch._foreach_maximum_(ratios, denominators)
    del denominators
    torch._foreach_add_(theta, torch._foreach_div(momentum, ratios), alpha=-lr)

    for i in masked:
        torch.where(masks[i], momentum[i], exp_avgs[i], out=exp_avgs[i])
        if residuals[i] is None:
            torch.where(masks[i], theta[i], params[i], out=params[i])
    if residuals[0] is not None:
        plain = [i for i, mask in enumerate(masks) if mask is None]
        if plain:
            torch._foreach_copy_([params[i] for i in plain], [theta[i] for i in plain])
            torch._foreach_sub_([theta[i] for i in plain], [params[i] for i in plain])
            torch._foreach_copy_([residuals[i] for i in plain], [theta[i] for i in plain])
        for i in masked:
            rounded = theta[i].to(params[i].dtype)
            torch.where(masks[i], theta[i].sub_(rounded), residuals[i], out=residuals[i])
            torch.where(masks[i], rounded, params[i], out=params[i])


# -- shared pieces ------------------------------------------------------------------------------
def _fold_part(hessian, grad, beta2: float, value: float, mask) -> None:
    """h ← β₂·h + value·g²; where the mask is False, h keeps its value."""
    if mask is None:
        hessian.mul_(beta2).addcmul_(grad, grad, value=value)
    else:
        folded = hessian.mul(beta2).addcmul_(grad, grad, value=value)
        torch.where(mask, folded, hessian, out=hessian)


def _fold_block(hessians, grads, beta2: float, value: float, masks) -> None:
    """`_fold_part` on lists of pieces."""
    folded = [h if m is None else h.clone() for h, m in zip(hessians, masks, strict=True)]
    torch._foreach_mul_(folded, beta2)
    torch._foreach_addcmul_(folded, grads, grads, value=value)
    for h, new, m in zip(hessians, folded, masks, strict=True):
        if m is not None:
            torch.where(m, new, h, out=h)


def _wins(ratio, denominator, mask, numel):
    """(unclipped, updated) coordinates: |m| < rho·bs·h, among those the mask lets through.

    Counted as sign(rho·bs·h − |m|) clamped at 0 and summed: exact (x − y > 0 iff x > y, and
    sign(NaN) = 0 as NaN < x is False), and on CPU several times cheaper than comparing into
    a bool tensor and counting it. Sums of 0/1 in fp32 are exact up to 2^24 entries.
    """
    unclipped = torch.sub(denominator, ratio).sign_().clamp_(min=0)
    if mask is not None:
        unclipped.masked_fill_(mask.logical_not(), 0)
    dtype = torch.float64 if unclipped.numel() > 1 << 24 else torch.float32
    active = numel if mask is None else torch.count_nonzero(mask) * (numel // mask.numel())
    return unclipped.sum(dtype=dtype), active


def _add_counts(counts: dict, device, unclipped, active) -> None:
    if unclipped is None:
        return
    total = counts.setdefault(device, [0, 0])
    total[0] = unclipped + total[0]
    total[1] = active + total[1]


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


def _rows_per_part(p: torch.Tensor, chunk: int) -> int | None:
    """Rows (along dim 0) of each CPU slice of `p`, or None when `p` is one piece."""
    if p.dim() == 0 or p.device.type != "cpu" or p.numel() <= chunk:
        return None
    return max(1, chunk // (p.numel() // p.shape[0]))


def _parts(p: torch.Tensor, chunk: int):
    """Functions taking a tensor shaped like `p` to one slice along dim 0; together they cover it.

    On CPU the slices hold about `chunk` entries, so the update's temporaries stay cache-sized
    and are reused instead of freshly allocated (and page-faulted) per parameter. Elsewhere one
    part covers the whole tensor: fewer kernel launches.
    """
    rows = _rows_per_part(p, chunk)
    if rows is None:
        return [lambda t: t]
    return [lambda t, i=i: t[i : i + rows] for i in range(0, p.shape[0], rows)]


def _split_flat(rows):
    """(rows whose parameter, gradient and states are contiguous, the others)."""
    flat, rest = [], []
    for row in rows:
        contiguous = all(t.is_contiguous() for t in row[:5] if t is not None)
        (flat if contiguous else rest).append(row)
    return flat, rest


def _by_device_and_dtype(rows):
    groups: dict = {}
    for row in rows:
        groups.setdefault((row[0].device, row[0].dtype), []).append(row)
    return groups.values()


def _blocks(rows, chunk: int, block: int):
    """Lists of pieces (a tuple of flat views per piece) holding at most `block` entries each.

    Rows are (param, grad, exp_avg, hessian, residual, mask, check); a CPU tensor is cut where
    the reference's slices end, so that both paths compute on the same pieces; a piece on
    another device holds up to `block` entries.
    """
    pieces, size = [], 0
    for p, *tensors, mask, check in rows:
        numel = p.numel()
        if numel == 0:
            continue
        rows_per_part = _rows_per_part(p, chunk)
        if rows_per_part is not None:
            step = rows_per_part * (numel // p.shape[0])
        else:
            step = numel if p.device.type == "cpu" else block
        if mask is not None:  # broadcast to the parameter's shape, so that it cuts like it
            mask = _aligned_mask(mask, p).expand(p.shape)
        flats = [None if t is None else t.reshape(-1) for t in (p, *tensors, mask)]
        for start in range(0, numel, step):
            stop = min(start + step, numel)
            if pieces and size + stop - start > block:
                yield pieces
                pieces, size = [], 0
            pieces.append((*(None if t is None else t[start:stop] for t in flats), check))
            size += stop - start
    if pieces:
        yield pieces
