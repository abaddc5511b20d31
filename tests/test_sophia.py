"""SophiaG against the published update rule, written out plainly here, plus masks and checkpoints."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

from asu_simu_plugin.methods.sophia import kernels
from asu_simu_plugin.methods.sophia.optimizer import SophiaG

F32 = np.float32


# -- an independent implementation of the published rule --------------------------------------
def reference_sophia(
    init, grads_at, hessian_grads_at, steps, settings, mode, maximize=False, every=10
):
    """Sophia as in the reference code, coordinate by coordinate in float32 scalars.

    `settings[i]` holds lr, betas, rho, weight_decay, bs of tensor i. `mode`: "gnb" (Hessian from
    `hessian_grads_at` after every `every`-th step), "grad2" (from the step's own gradient, before
    the update) or "soul" (grad2, and the momentum folded first with the raw gradient, then with
    the maximize-negated one). Returns the final tensors and the unclipped/total counts per step.
    """
    theta = [[F32(v) for v in t.flatten().tolist()] for t in init]
    m = [[F32(0.0)] * len(t) for t in theta]
    h = [[F32(0.0)] * len(t) for t in theta]
    one, eps = F32(1.0), F32(1e-15)

    def as_tensors():
        return [
            torch.tensor(np.array(t, dtype=np.float32)).view_as(x)
            for t, x in zip(theta, init, strict=True)
        ]

    def fold(grads):
        for i, g in enumerate(grads):
            beta2 = F32(settings[i]["betas"][1])
            for j, gv in enumerate(g.flatten().tolist()):
                h[i][j] = beta2 * h[i][j] + (one - beta2) * F32(gv) * F32(gv)

    counts = []
    for step in range(steps):
        grads = grads_at(step, as_tensors())
        if mode in ("grad2", "soul"):
            fold(grads)
        unclipped = total = 0
        for i, g in enumerate(grads):
            s = settings[i]
            lr, rho, wd, bs = F32(s["lr"]), F32(s["rho"]), F32(s["weight_decay"]), F32(s["bs"])
            beta1 = F32(s["betas"][0])
            for j, gv in enumerate(g.flatten().tolist()):
                raw = F32(gv)
                signed = -raw if maximize else raw
                if mode == "soul":
                    m[i][j] = beta1 * m[i][j] + (one - beta1) * raw
                m[i][j] = beta1 * m[i][j] + (one - beta1) * signed
                theta[i][j] = theta[i][j] * (one - lr * wd)
                limit = rho * bs * h[i][j]
                ratio = min(abs(m[i][j]) / (limit + eps), one)
                sign = F32(int(m[i][j] > 0) - int(m[i][j] < 0))
                theta[i][j] = theta[i][j] - lr * sign * ratio
                unclipped += bool(abs(m[i][j]) < limit)
                total += 1
        counts.append((unclipped, total))
        if mode == "gnb" and step % every == every - 1:
            fold(hessian_grads_at(step, as_tensors()))
    return as_tensors(), counts


# -- a tiny MLP regression -------------------------------------------------------------------
def mlp_problem(seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(16, 1, generator=gen, dtype=torch.float64)
    init = [
        torch.randn(5, 3, generator=gen) * 0.5,  # w1
        torch.randn(5, generator=gen) * 0.1,  # b1
        torch.randn(1, 5, generator=gen) * 0.5,  # w2
        torch.randn(1, generator=gen) * 0.1,  # b2
    ]

    def grads_for(tensors, target):
        w1, b1, w2, b2 = (t.detach().double().requires_grad_() for t in tensors)
        loss = ((torch.tanh(x @ w1.T + b1) @ w2.T + b2 - target) ** 2).mean()
        return [g.float() for g in torch.autograd.grad(loss, [w1, b1, w2, b2])]

    def grads_at(step, tensors):
        return grads_for(tensors, y)

    def hessian_grads_at(step, tensors):
        # a second gradient, like the sampled-label one: the loss against resampled targets
        noise = torch.randn(16, 1, generator=torch.Generator().manual_seed(100 + step))
        return grads_for(tensors, y + noise.double())

    return init, grads_at, hessian_grads_at


# Weights, then biases: different options per group. lr, 1 - beta, rho * bs and lr * weight_decay
# are powers of two, so that products with them are exact and the remaining fp32 rounding
# differences (torch fuses some multiply-adds) stay far below the tolerance.
GROUPS = [
    {"lr": 2**-6, "betas": (0.875, 0.9375), "rho": 2**-5, "weight_decay": 0.125, "bs": 64},
    {"lr": 2**-8, "betas": (0.75, 0.875), "rho": 0.5, "weight_decay": 0.0, "bs": 8},
]


@pytest.mark.parametrize(
    "mode,maximize",
    [("gnb", False), ("gnb", True), ("grad2", False), ("soul", False), ("soul", True)],
)
def test_fifty_steps_match_the_published_rule(mode, maximize):
    init, grads_at, hessian_grads_at = mlp_problem()
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = SophiaG(
        [{"params": [params[0], params[2]], **GROUPS[0]}, {"params": [params[1], params[3]]}],
        **GROUPS[1],
        maximize=maximize,
        hessian_mode="gnb" if mode == "gnb" else "grad2",
        soul_compat=mode == "soul",
    )
    seen, seen_for_hessian, win_rates = [], {}, []
    for step in range(50):
        seen.append(grads_at(step, [p.detach() for p in params]))
        for p, g in zip(params, seen[-1], strict=True):
            p.grad = g
        opt.step()
        win_rates.append(opt.win_rate())
        if mode == "gnb" and step % 10 == 9:
            seen_for_hessian[step] = hessian_grads_at(step, [p.detach() for p in params])
            for p, g in zip(params, seen_for_hessian[step], strict=True):
                p.grad = g
            opt.update_hessian()

    # The reference gets the gradients the optimizer saw: recomputing them at its own iterates
    # would let fp32 rounding differences grow chaotically through the loss.
    settings = [GROUPS[0], GROUPS[1], GROUPS[0], GROUPS[1]]
    expected, counts = reference_sophia(
        init,
        lambda step, _: seen[step],
        lambda step, _: seen_for_hessian[step],
        50,
        settings,
        mode,
        maximize=maximize,
    )
    for got, want, start in zip(params, expected, init, strict=True):
        torch.testing.assert_close(got.detach(), want, rtol=1e-6, atol=1e-7)
        assert (got.detach() - start).abs().max() > 1e-2  # far beyond the tolerance
    assert win_rates == [unclipped / total for unclipped, total in counts]
    # the run exercised both the clipped and the Hessian-scaled branch
    assert 0 < sum(u for u, _ in counts) < sum(t for _, t in counts)
    assert opt.state[params[0]]["step"].item() == 50


def test_step_bs_overrides_the_group_bs():
    init, grads_at, hessian_grads_at = mlp_problem(seed=1)
    runs = []
    for group_bs, step_bs in ((16, None), (5120, 16)):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = SophiaG(params, lr=1e-2, bs=group_bs)  # the default: grad2
        for step in range(10):
            for p, g in zip(params, grads_at(step, [p.detach() for p in params]), strict=True):
                p.grad = g
            opt.step(bs=step_bs)
        runs.append([p.detach().clone() for p in params])
        assert opt.param_groups[0]["bs"] == group_bs
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


# -- precision -------------------------------------------------------------------------------
def _random_run(opt, params, steps, start=0, hessian_every=3):
    """Seeded gradients, rounded to bf16 so that fp32 and bf16 runs see the same values."""
    for step in range(start, steps):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(p.dtype)
        opt.step()
        if step % hessian_every == hessian_every - 1:
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).bfloat16().to(p.dtype)
            opt.update_hessian()


def test_bf16_state_is_fp32_and_tracks_an_fp32_run_exactly():
    torch.manual_seed(0)
    start = torch.randn(6, 5).to(torch.bfloat16)
    half = torch.nn.Parameter(start.clone())
    full = torch.nn.Parameter(start.float())
    options = dict(lr=1e-4, weight_decay=0.1, rho=0.04, bs=8, hessian_mode="gnb")
    half_opt, full_opt = SophiaG([half], **options), SophiaG([full], **options)
    # the same bf16-representable gradients for both
    _random_run(half_opt, [half], 200)
    _random_run(full_opt, [full], 200)
    state = half_opt.state[half]
    assert half.dtype == torch.bfloat16
    assert {state[k].dtype for k in ("step", "exp_avg", "hessian", "residual")} == {torch.float32}
    # p + residual is exactly the fp32 run's value; p is that value rounded
    assert torch.equal(half.detach().float() + state["residual"], full.detach())
    assert torch.equal(half.detach(), full.detach().to(torch.bfloat16))
    assert torch.equal(state["exp_avg"], full_opt.state[full]["exp_avg"])
    # each step moves by at most lr = 1e-4, far below half a bf16 rounding step at |p| ~ 1
    assert (full.detach() - start.float()).abs().max() > 4e-3


def test_bf16_updates_below_the_rounding_step_add_up():
    # 1.0 in bf16 has a rounding step of 2^-7 ≈ 0.0078; each update is lr = 1e-3 (zero Hessian).
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = SophiaG([p], lr=1e-3, weight_decay=0.0, hessian_mode="gnb")
    for _ in range(40):
        p.grad = torch.ones_like(p)
        opt.step()
    total = p.detach().float() + opt.state[p]["residual"]
    torch.testing.assert_close(total, torch.full((8,), 1 - 40e-3), rtol=0, atol=1e-6)
    assert (p.detach().float() - 0.96).abs().max() <= 2**-8  # within half a rounding step
    naive = torch.ones(8, dtype=torch.bfloat16)
    for _ in range(40):
        naive = naive - torch.tensor(1e-3, dtype=torch.bfloat16)
    assert torch.equal(naive, torch.ones(8, dtype=torch.bfloat16))  # what plain bf16 would do


def test_bf16_parameter_changed_outside_the_optimizer_is_picked_up():
    p = torch.nn.Parameter(torch.ones(8, dtype=torch.bfloat16))
    opt = SophiaG([p], lr=1e-3, weight_decay=0.0, hessian_mode="gnb")
    for _ in range(3):
        p.grad = torch.ones_like(p)
        opt.step()
    # 0.997 is stored as 0.99609375 and a remainder of about 9e-4 is pending
    assert opt.state[p]["residual"].abs().min() > 5e-4
    new_values = torch.tensor([0.0, 1e-3, -2.0, 0.5, 1.0, 3.0, -1e-2, 7.0], dtype=torch.bfloat16)
    with torch.no_grad():
        p.copy_(new_values)
    opt.param_groups[0]["lr"] = 0.0
    p.grad = torch.ones_like(p)
    opt.step()
    # the stale remainder did not leak into the new values (it would move 0.0 to 9e-4 and 1e-3
    # to 1.9e-3); where it still rounds back to the new value (1.0 here) it may stay
    assert torch.equal(p.detach(), new_values)
    assert torch.equal(opt.state[p]["residual"][:2], torch.zeros(2))


def test_fp64_parameters_are_updated_in_fp64():
    p = torch.nn.Parameter(torch.full((3,), 1 + 1e-10, dtype=torch.float64))
    opt = SophiaG([p], lr=1e-3, weight_decay=0.0, hessian_mode="gnb")
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == torch.float64 and opt.state[p]["exp_avg"].dtype == torch.float32
    torch.testing.assert_close(p.detach(), torch.full((3,), 1 + 1e-10 - 1e-3, dtype=torch.float64))
    assert (p.detach() != torch.tensor(1 - 1e-3, dtype=torch.float32).double()).all()


MODES = {"gnb": {"hessian_mode": "gnb"}, "soul": {"soul_compat": True}}


# -- masks -----------------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["gnb", "soul"])
def test_masked_entries_stay_bit_identical_with_weight_decay(dtype, mode, foreach):
    torch.manual_seed(0)
    start = torch.randn(5, 6).to(dtype)
    masked = torch.nn.Parameter(start.clone())
    plain = torch.nn.Parameter(start.clone())
    options = dict(lr=1e-2, weight_decay=0.5, rho=0.04, bs=4, foreach=foreach, **MODES[mode])
    masked_opt, plain_opt = SophiaG([masked], **options), SophiaG([plain], **options)
    _random_run(masked_opt, [masked], 4)  # momentum and Hessian become nonzero first
    _random_run(plain_opt, [plain], 4)
    mask = torch.tensor([True, False, True, False, False, True]).view(1, 6)
    masked_opt.set_mask(masked, mask)
    state = masked_opt.state[masked]
    value, momentum, hessian = (
        t.clone() for t in (masked.detach(), state["exp_avg"], state["hessian"])
    )
    assert (momentum != 0).all() and (hessian != 0).all()

    _random_run(masked_opt, [masked], 20, start=4, hessian_every=5)
    _random_run(plain_opt, [plain], 20, start=4, hessian_every=5)
    frozen = ~mask.expand(5, 6)
    assert torch.equal(masked.detach()[frozen], value[frozen])
    assert torch.equal(state["exp_avg"][frozen], momentum[frozen])
    assert torch.equal(state["hessian"][frozen], hessian[frozen])
    # unmasked entries moved, exactly as without a mask (Sophia is coordinate-wise)
    assert (masked.detach()[~frozen] != value[~frozen]).all()
    assert torch.equal(masked.detach()[~frozen], plain.detach()[~frozen])
    assert torch.equal(state["exp_avg"][~frozen], plain_opt.state[plain]["exp_avg"][~frozen])
    assert torch.equal(state["hessian"][~frozen], plain_opt.state[plain]["hessian"][~frozen])

    masked_opt.set_mask(masked, None)
    _random_run(masked_opt, [masked], 21, start=20)
    assert (masked.detach()[frozen] != value[frozen]).all()


# -- checkpoints -----------------------------------------------------------------------------
@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["gnb", "soul"])
def test_resume_from_state_dict_is_bit_identical(dtype, mode, foreach):
    torch.manual_seed(1)
    init = [torch.randn(4, 3).to(dtype), torch.randn(3).to(dtype)]
    options = dict(lr=1e-2, weight_decay=0.1, bs=16, foreach=foreach, **MODES[mode])

    def fresh(values):
        params = [torch.nn.Parameter(v.clone()) for v in values]
        opt = SophiaG([{"params": params[:1]}, {"params": params[1:], "rho": 0.2}], **options)
        return params, opt

    params, opt = fresh(init)
    opt.set_mask(params[0], torch.tensor([True, False, True]))
    _random_run(opt, params, 10)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    values_at_10 = [p.detach().clone() for p in params]
    _random_run(opt, params, 20, start=10)

    resumed_params, resumed = fresh(values_at_10)
    buffer.seek(0)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    state = resumed.state[resumed_params[0]]
    assert state["mask"].dtype == torch.bool
    assert state["exp_avg"].dtype == state["hessian"].dtype == torch.float32
    assert resumed.param_groups[1]["rho"] == 0.2
    _random_run(resumed, resumed_params, 20, start=10)
    for got, want in zip(resumed_params, params, strict=True):
        assert torch.equal(got.detach(), want.detach())
    for key in opt.state[params[1]]:
        assert torch.equal(resumed.state[resumed_params[1]][key], opt.state[params[1]][key])
    assert resumed.win_rate() == opt.win_rate()
    assert not torch.equal(params[0].detach(), init[0])


# -- win rate and errors ---------------------------------------------------------------------
def test_win_rate_counts_unclipped_unmasked_coordinates():
    p = torch.nn.Parameter(torch.zeros(6))
    opt = SophiaG(
        [p], lr=0.1, betas=(0.0, 0.0), rho=0.5, weight_decay=0.0, bs=4.0, hessian_mode="gnb"
    )
    assert opt.win_rate() is None
    # β₂ = 0: h = g², so rho·bs·h = 2·g²  -> limits 2, 2, 2, 2, 0, 2
    p.grad = torch.tensor([1.0, 1.0, 1.0, -1.0, 0.0, 1.0])
    opt.update_hessian()
    opt.set_mask(p, torch.tensor([True, True, True, True, True, False]))
    # β₁ = 0: m = g. |m| < limit: 0.5 yes, 3 no, 2 no (not strictly), -1 yes, 0 no (limit 0);
    # the last coordinate is masked out and not counted.
    p.grad = torch.tensor([0.5, 3.0, 2.0, -1.0, 0.0, 0.1])
    opt.step()
    assert opt.win_rate() == pytest.approx(2 / 5)
    expected = torch.tensor([-0.1 * 0.25, -0.1, -0.1, 0.1 * 0.5, 0.0, 0.0])
    torch.testing.assert_close(p.detach(), expected)


def test_errors_name_the_fix():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="lr=-1.*must be >= 0"):
        SophiaG([p], lr=-1)
    for rho in (0.0, -0.5):
        with pytest.raises(ValueError, match="rho must be > 0"):
            SophiaG([p], rho=rho)
    for betas in ((0.9, 1.0), (-0.1, 0.9), (0.9,), "ab"):
        with pytest.raises(ValueError, match=r"betas=.*\[0, 1\)"):
            SophiaG([p], betas=betas)
    with pytest.raises(ValueError, match="weight_decay"):
        SophiaG([p], weight_decay=-0.1)
    with pytest.raises(ValueError, match="bs=0"):
        SophiaG([p], bs=0)
    with pytest.raises(ValueError, match=r"hessian_mode='none'; use 'grad2' .* or 'gnb'"):
        SophiaG([p], hessian_mode="none")
    with pytest.raises(ValueError, match=r"soul_compat=True reproduces SOUL.*'gnb'"):
        SophiaG([p], hessian_mode="gnb", soul_compat=True)
    with pytest.raises(ValueError, match="foreach='yes'"):
        SophiaG([p], foreach="yes")
    with pytest.raises(ValueError, match=r"parameter group 1\): rho=0"):
        SophiaG([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(2))], "rho": 0}])
    opt = SophiaG([p])
    p.grad = torch.ones(3)
    with pytest.raises(ValueError, match="bs must be > 0"):
        opt.step(bs=0)
    with pytest.raises(TypeError, match=r"torch.bool.*shape \(3,\).*mask.bool\(\)"):
        opt.set_mask(p, torch.ones(3))
    with pytest.raises(ValueError, match=r"shape \(4,\).*shape \(3,\)"):
        opt.set_mask(p, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"shape \(2, 3\).*shape \(3,\)"):
        opt.set_mask(p, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="not in any of this optimizer's parameter groups"):
        opt.set_mask(torch.nn.Parameter(torch.zeros(3)), torch.ones(3, dtype=torch.bool))


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_slices_give_the_whole_tensor_update(dtype, foreach):
    # CPU parameters are updated in slices along dim 0; slices of 2 rows / 7 entries here.
    torch.manual_seed(3)
    init = [torch.randn(9, 4).to(dtype), torch.randn(30).to(dtype), torch.randn(()).to(dtype)]
    masks = [torch.tensor([True, False, True, True]), torch.rand(30) < 0.5, None]
    runs = []
    for chunk in (8, 1 << 30):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        opt = SophiaG(params, lr=1e-2, weight_decay=0.1, bs=16, soul_compat=True, foreach=foreach)
        opt.cpu_chunk_elements = chunk
        assert len(kernels._parts(params[0], chunk)) == (5 if chunk == 8 else 1)
        for p, mask in zip(params, masks, strict=True):
            if mask is not None:
                opt.set_mask(p, mask)
        _random_run(opt, params, 12)
        runs.append((params, opt))
    (sliced, sliced_opt), (whole, whole_opt) = runs
    for a, b in zip(sliced, whole, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)
        for key, value in sliced_opt.state[a].items():
            torch.testing.assert_close(value, whole_opt.state[b][key], rtol=1e-6, atol=1e-7)
    frozen = ~masks[0].expand(9, 4)
    assert torch.equal(sliced[0].detach()[frozen], init[0][frozen])
    assert sliced_opt.win_rate() == whole_opt.win_rate()


# -- the multi-tensor path -------------------------------------------------------------------
def _mixed_problem(seed=0):
    """Parameters of every kind the update distinguishes, with their masks (or None)."""
    gen = torch.Generator().manual_seed(seed)

    def tensor(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    return [
        (tensor(100, 97), None),  # sliced on CPU, slices not a multiple of the vector width
        (tensor(37, 11), torch.rand(11, generator=gen) < 0.5),  # sliced, broadcast mask
        (tensor(9, 13), torch.rand(1, 13, generator=gen) < 0.5),  # column mask
        (tensor(63, 29, dtype=torch.bfloat16), None),  # sliced, fp32 remainder
        (tensor(6, 5, dtype=torch.bfloat16), torch.rand(6, 5, generator=gen) < 0.5),
        (tensor(7, 3, dtype=torch.float64), None),
        (tensor(3), None),  # small tensors share a block
        (tensor(()), None),
        (tensor(0, 3), None),
        (tensor(8, 6).t(), torch.rand(6, 1, generator=gen) < 0.5),  # non-contiguous: the loop
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"hessian_mode": "gnb"},
        {"hessian_mode": "grad2", "weight_decay": 0.0},
        {"soul_compat": True, "maximize": True},
    ],
    ids=["gnb", "grad2", "soul-maximize"],
)
def test_multi_tensor_path_is_bit_identical_to_the_reference(options):
    problem = _mixed_problem()
    runs = []
    for foreach in (False, True):
        params = [torch.nn.Parameter(t.clone()) for t, _ in problem]
        assert not params[-1].is_contiguous()
        opt = SophiaG(
            [{"params": params[:5]}, {"params": params[5:], "rho": 0.5, "lr": 2e-3}],
            lr=1e-2,
            bs=16,
            foreach=foreach,
            **{"weight_decay": 0.1, **options},
        )
        opt.cpu_chunk_elements, opt.cpu_block_elements = 1 << 10, 1 << 11
        for p, (_, mask) in zip(params, problem, strict=True):
            if mask is not None:
                opt.set_mask(p, mask)
        rates = []
        for step in range(12):
            _random_run(opt, params, step + 1, start=step)
            rates.append(opt.win_counts())
        runs.append((params, opt, rates))
    (loop, loop_opt, loop_rates), (multi, multi_opt, multi_rates) = runs
    assert loop_rates == multi_rates
    # both branches of the clipping ran
    assert 0 < sum(u for u, _ in multi_rates) < sum(a for _, a in multi_rates)
    for index, (a, b) in enumerate(zip(loop, multi, strict=True)):
        assert torch.equal(a.detach(), b.detach()), index
        assert loop_opt.state[a].keys() == multi_opt.state[b].keys()
        for key, value in loop_opt.state[a].items():
            assert torch.equal(value, multi_opt.state[b][key]), (index, key)
    moved = [not torch.equal(p.detach(), t) for p, (t, _) in zip(multi, problem, strict=True)]
    assert sum(moved) == len(problem) - 1  # all but the empty one


def test_multi_tensor_path_packs_blocks_and_cuts_tensors_like_the_reference():
    params = [torch.zeros(100, 97), torch.zeros(3), torch.zeros(()), torch.zeros(5, 2)]
    rows = [(p, p, p, p, None, None, False) for p in params]
    blocks = list(kernels._blocks(rows, chunk=1 << 10, block=1 << 11))
    sizes = [[piece[0].numel() for piece in block] for block in blocks]
    # 10 rows of 97 per slice (the reference's parts), two per block; the small tensors fill up
    assert sizes == [[970, 970]] * 4 + [[970, 970, 3, 1, 10]]
    assert [len(part(params[0])) for part in kernels._parts(params[0], 1 << 10)] == [10] * 10


@pytest.mark.parametrize("foreach,expected", [(None, 0), (False, 0), (True, 2)])
def test_the_multi_tensor_path_runs_on_cpu_only_when_asked(monkeypatch, foreach, expected):
    calls = []
    original = kernels._multi_tensor_update

    def counting(rows, *args):
        calls.append(len(rows))
        return original(rows, *args)

    monkeypatch.setattr(kernels, "_multi_tensor_update", counting)
    p = torch.nn.Parameter(torch.ones(4))
    opt = SophiaG([p], foreach=foreach)
    p.grad = torch.ones(4)
    opt.step()
    opt.step()
    assert len(calls) == expected


def test_win_rate_can_be_switched_off_without_changing_the_update():
    runs = []
    for track in (True, False):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(40, 3))
        opt = SophiaG([p], lr=1e-2, bs=16, track_win_rate=track)
        _random_run(opt, [p], 5)
        runs.append((p.detach().clone(), opt.win_rate()))
    assert torch.equal(runs[0][0], runs[1][0])
    assert 0 < runs[0][1] < 1 and runs[1][1] is None


# -- Hessian source --------------------------------------------------------------------------
def test_the_default_hessian_source_is_the_loss_gradient_squared():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    opt = SophiaG([p], lr=1e-2, betas=(0.9, 0.5))
    assert opt.param_groups[0]["hessian_mode"] == "grad2"
    p.grad = torch.randn(5)
    opt.step()  # no update_hessian() anywhere: the step itself folds grad² in
    torch.testing.assert_close(opt.state[p]["hessian"], 0.5 * p.grad**2, rtol=0, atol=0)
    assert opt.win_rate() > 0

    # Sophia-G's estimate, asked for explicitly: only update_hessian() changes h
    q = torch.nn.Parameter(torch.randn(5))
    opt = SophiaG([q], lr=1e-2, betas=(0.9, 0.5), hessian_mode="gnb")
    q.grad = torch.randn(5)
    opt.step()
    assert not opt.state[q]["hessian"].any() and opt.win_rate() == 0.0  # sign steps
    opt.update_hessian(bs=4)
    torch.testing.assert_close(opt.state[q]["hessian"], 2 * q.grad**2, rtol=0, atol=0)


def test_a_checkpoint_from_before_hessian_mode_loads():
    p = torch.nn.Parameter(torch.ones(3))
    saved = SophiaG([p], hessian_mode="gnb").state_dict()
    for group in saved["param_groups"]:  # the keys a group had before
        del group["hessian_mode"], group["foreach"]
        group["auto_hessian"] = False
    opt = SophiaG([p])
    opt.load_state_dict(saved)
    group = opt.param_groups[0]
    assert group["hessian_mode"] == "gnb" and group["foreach"] is None
    assert "auto_hessian" not in group
