"""SophiaG against the published update rule, written out plainly here."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from asu_simu_plugin.sophia import SophiaG


def reference_run(
    params,
    grads_at,
    hess_grads_at,
    steps,
    lr,
    betas,
    rho,
    wd,
    bs,
    hessian_every=10,
    mode="gnb",
    soul=False,
):
    """An independent implementation of the published rule: element loops in float32 scalars."""
    f32 = np.float32
    lr, rho, wd, bs = f32(lr), f32(rho), f32(wd), f32(bs)
    beta1, beta2 = f32(betas[0]), f32(betas[1])
    one, eps = f32(1.0), f32(1e-15)
    flat = [[f32(v) for v in p.detach().float().flatten().tolist()] for p in params]
    m = [[f32(0.0)] * len(f) for f in flat]
    h = [[f32(0.0)] * len(f) for f in flat]
    for step in range(steps):
        grads = [[f32(v) for v in g.float().flatten().tolist()] for g in grads_at(step, flat)]
        if mode == "grad2" or soul:
            h = [
                [hv * beta2 + (one - beta2) * gv * gv for hv, gv in zip(hs, gs, strict=True)]
                for hs, gs in zip(h, grads, strict=True)
            ]
        for i in range(len(flat)):
            for j in range(len(flat[i])):
                theta = flat[i][j] * (one - lr * wd)
                mm = m[i][j] * beta1 + (one - beta1) * grads[i][j]
                if soul:
                    mm = mm * beta1 + (one - beta1) * grads[i][j]
                ratio = min(abs(mm) / (rho * bs * h[i][j] + eps), one)
                sign = f32(int(mm > 0) - int(mm < 0))
                flat[i][j] = theta - lr * (sign * ratio)
                m[i][j] = mm
        if mode == "gnb" and step % hessian_every == hessian_every - 1:
            hg = [[f32(v) for v in g.float().flatten().tolist()] for g in hess_grads_at(step, flat)]
            h = [
                [hv * beta2 + (one - beta2) * gv * gv for hv, gv in zip(hs, gs, strict=True)]
                for hs, gs in zip(h, hg, strict=True)
            ]
    return [
        torch.tensor(f, dtype=torch.float32).view_as(p) for f, p in zip(flat, params, strict=True)
    ]


def problem(seed=0):
    """Least squares on two parameter tensors; gradients are functions of the current values."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(6, 4, generator=gen)
    target = torch.randn(6, generator=gen)
    w0 = torch.randn(4, generator=gen) * 0.5
    b0 = torch.randn(1, generator=gen) * 0.1

    def grads(w, b):
        w = torch.as_tensor(np.asarray(w, dtype=np.float32)).double().view(4)
        b = torch.as_tensor(np.asarray(b, dtype=np.float32)).double().view(1)
        resid = a.double() @ w + b - target.double()
        return [2 * a.double().T @ resid / 6, (2 * resid.mean()).view(1)]

    def hessian_grads(w, b, step):
        # a different "sampled-label" gradient: the residual against a perturbed target
        noise = torch.randn(6, generator=torch.Generator().manual_seed(1000 + step)).double()
        w = torch.as_tensor(np.asarray(w, dtype=np.float32)).double().view(4)
        b = torch.as_tensor(np.asarray(b, dtype=np.float32)).double().view(1)
        resid = a.double() @ w + b - (target.double() + noise)
        return [2 * a.double().T @ resid / 6, (2 * resid.mean()).view(1)]

    return w0, b0, grads, hessian_grads


@pytest.mark.parametrize("mode", ["gnb", "grad2", "soul"])
def test_fifty_steps_match_the_published_rule(mode):
    w0, b0, grads, hessian_grads = problem()
    lr, betas, rho, wd, bs = 1e-2, (0.9, 0.95), 0.04, 0.1, 8
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(b0.clone())
    opt = SophiaG(
        [w, b],
        lr=lr,
        betas=betas,
        rho=rho,
        weight_decay=wd,
        bs=bs,
        auto_hessian=mode == "grad2",
        soul_compat=mode == "soul",
    )
    for step in range(50):
        gw, gb = grads(w.detach(), b.detach())
        w.grad, b.grad = gw.float(), gb.float()
        opt.step()
        if mode == "gnb" and step % 10 == 9:
            hw, hb = hessian_grads(w.detach(), b.detach(), step)
            w.grad, b.grad = hw.float(), hb.float()
            opt.update_hessian()
    expected = reference_run(
        [w0, b0],
        lambda step, flat: grads(flat[0], flat[1]),
        lambda step, flat: hessian_grads(flat[0], flat[1], step),
        50,
        lr,
        betas,
        rho,
        wd,
        bs,
        mode="gnb" if mode == "gnb" else "grad2",
        soul=mode == "soul",
    )
    for got, want in zip((w, b), expected, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-8)
    assert not torch.equal(w.detach(), w0)


def test_state_is_fp32_and_bf16_updates_are_not_lost():
    # 1.0 in bf16 has a rounding step of 2^-7 ≈ 0.0078; each update is 1e-3 (lr · sign · 1).
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = SophiaG([p], lr=1e-3, weight_decay=0.0)
    for _ in range(40):
        p.grad = torch.ones_like(p)  # zero Hessian: every coordinate takes a full -lr step
        opt.step()
    state = opt.state[p]
    assert state["exp_avg"].dtype == state["hessian"].dtype == torch.float32
    assert state["master"].dtype == torch.float32
    torch.testing.assert_close(state["master"], torch.full((8,), 1 - 40e-3), rtol=0, atol=1e-6)
    assert p.dtype == torch.bfloat16
    assert p.float().sub(0.96).abs().max() < 2**-7  # moved the full 0.04, not stuck at 1.0
    naive = torch.ones(8, dtype=torch.bfloat16)
    for _ in range(40):
        naive = naive - torch.tensor(1e-3, dtype=torch.bfloat16)
    assert torch.equal(naive, torch.ones(8, dtype=torch.bfloat16))  # what plain bf16 would do


def test_masked_entries_stay_bit_identical_with_weight_decay():
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.randn(5, 6))
    original = weight.detach().clone()
    mask = torch.tensor([True, False, True, False, False, True]).view(1, 6)
    opt = SophiaG([weight], lr=1e-2, weight_decay=0.5, rho=0.04)
    opt.set_mask(weight, mask)
    for step in range(20):
        weight.grad = torch.randn(5, 6)
        opt.step()
        if step % 5 == 4:
            weight.grad = torch.randn(5, 6)
            opt.update_hessian()
    frozen = ~mask.expand(5, 6)
    assert torch.equal(weight.detach()[frozen], original[frozen])
    assert torch.equal(opt.state[weight]["exp_avg"][frozen], torch.zeros(int(frozen.sum())))
    assert torch.equal(opt.state[weight]["hessian"][frozen], torch.zeros(int(frozen.sum())))
    assert (weight.detach()[~frozen] != original[~frozen]).all()


def _run(opt, params, steps, start=0):
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
        opt.step()
        if step % 3 == 2:
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
            opt.update_hessian()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_from_state_dict_is_bit_identical(dtype):
    torch.manual_seed(1)
    params = [
        torch.nn.Parameter(torch.randn(4, 3).to(dtype)),
        torch.nn.Parameter(torch.randn(3).to(dtype)),
    ]
    saved_init = [p.detach().clone() for p in params]
    opt = SophiaG(params, lr=1e-2, weight_decay=0.1)
    opt.set_mask(params[0], torch.tensor([True, False, True]))
    _run(opt, params, 10)
    checkpoint = copy.deepcopy(opt.state_dict())
    values_at_10 = [p.detach().clone() for p in params]
    _run(opt, params, 20, start=10)
    uninterrupted = [p.detach().clone() for p in params]

    resumed_params = [torch.nn.Parameter(v.clone()) for v in values_at_10]
    resumed = SophiaG(resumed_params, lr=1e-2, weight_decay=0.1)
    resumed.load_state_dict(checkpoint)
    state = resumed.state[resumed_params[0]]
    assert state["exp_avg"].dtype == torch.float32 and state["mask"].dtype == torch.bool
    _run(resumed, resumed_params, 20, start=10)
    for got, want in zip(resumed_params, uninterrupted, strict=True):
        assert torch.equal(got.detach(), want)
    assert not torch.equal(uninterrupted[0], saved_init[0])


def test_win_rate_counts_unclipped_coordinates():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = SophiaG([p], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, bs=1.0)
    p.grad = torch.tensor([1.0, 1.0, 1.0, 1.0])
    opt.update_hessian()  # h = g² = 1 (β₂ = 0)
    p.grad = torch.tensor([0.5, 2.0, -0.25, 3.0])  # m = g; |m| < ρ·bs·h = 1 for two of four
    opt.step()
    assert opt.win_rate() == pytest.approx(0.5)
    torch.testing.assert_close(p.detach(), torch.tensor([-0.05, -0.1, 0.025, -0.1]))


def test_errors_name_the_fix():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="learning rate"):
        SophiaG([p], lr=-1)
    with pytest.raises(ValueError, match="rho"):
        SophiaG([p], rho=0)
    with pytest.raises(ValueError, match="betas"):
        SophiaG([p], betas=(0.9, 1.0))
    opt = SophiaG([p])
    with pytest.raises(TypeError, match="bool"):
        opt.set_mask(p, torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        opt.set_mask(p, torch.ones(4, dtype=torch.bool))
