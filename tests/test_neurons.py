"""SIMU neuron attribution (integrated gradients, per answer token and per sequence) and the
critical-neuron selection (mask files: test_masks.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import GATED_MLP_ARCHITECTURES, tiny_causal_lm

from asu_simu_plugin.arch import decoder_layers, down_projection
from asu_simu_plugin.arguments import MethodArgumentError
from asu_simu_plugin.methods.simu import SIMUArguments
from asu_simu_plugin.methods.simu.attribution import critical_neuron_masks, neuron_attributions


def make_batch(seed=0, vocab=600, left_pad=False):
    """Two sequences of 9 tokens: prompt of 4, answer after; the second one padded by one."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    mask = torch.ones_like(ids)
    pad = 0 if left_pad else 8
    mask[1, pad] = 0
    labels[1, pad] = -100
    ids[1, pad] = 3
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sharpened(arch="llama", dtype=torch.float32, **kwargs):
    model = tiny_causal_lm(arch, **kwargs).to(dtype)
    with torch.no_grad():  # random init leaves the MLP nearly silent; make it matter
        for layer in decoder_layers(model):
            down_projection(layer).weight.mul_(10)
    return model


def answer_log_likelihood(logits, labels):
    return -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
    )


def log_likelihood(model, batch, zero_layer=None, position=None):
    """Answer log-likelihood; with `zero_layer`, that layer's MLP activation zeroed at
    `position` (of every row) or everywhere."""
    handle = None
    if zero_layer is not None:
        proj = down_projection(decoder_layers(model)[zero_layer])

        def zero(_module, args):
            activation = args[0].clone()
            if position is None:
                activation.zero_()
            else:
                activation[:, position] = 0
            return (activation,)

        handle = proj.register_forward_pre_hook(zero)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if handle is not None:
        handle.remove()
    if position is None:
        return answer_log_likelihood(logits, batch["labels"])
    # Only the token predicted at `position`.
    labels = torch.full_like(batch["labels"], -100)
    labels[:, position + 1] = batch["labels"][:, position + 1]
    return answer_log_likelihood(logits, labels)


def brute_force_token_ig(model, batch, layer, steps):
    """Per-answer-token IG by its definition: one full forward/backward per (row, position,
    step), scaling the activation at that position only, attributing that token's log p."""
    proj = down_projection(decoder_layers(model)[layer])
    captured = {}
    handle = proj.register_forward_pre_hook(lambda m, a: captured.setdefault("beta", a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    beta = captured["beta"]
    total = torch.zeros(beta.shape[-1], dtype=beta.dtype)
    rows, length = batch["input_ids"].shape
    for b in range(rows):
        for p in range(length - 1):
            target = int(batch["labels"][b, p + 1])
            if target == -100:
                continue
            for j in range(1, steps + 1):
                point = (j / steps * beta[b, p]).requires_grad_(True)

                def scale(_module, args, b=b, p=p, point=point):
                    activation = args[0].clone()
                    activation[b, p] = point
                    return (activation,)

                handle = proj.register_forward_pre_hook(scale)
                with torch.enable_grad():
                    logits = model(
                        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
                    ).logits
                    log_p = logits[b, p].log_softmax(-1)[target]
                    (grad,) = torch.autograd.grad(log_p, point)
                handle.remove()
                total += beta[b, p] * grad / steps
    return total


def brute_force_ig(model, batch, layer, steps):
    """Single-layer IG with an explicit loop over α = j/steps (no batching of copies)."""
    proj = down_projection(decoder_layers(model)[layer])
    captured = {}
    handle = proj.register_forward_pre_hook(lambda m, a: captured.setdefault("beta", a[0]))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    handle.remove()
    beta = captured["beta"]
    total = torch.zeros(beta.shape[-1])
    for j in range(1, steps + 1):
        point = (j / steps * beta).requires_grad_(True)
        handle = proj.register_forward_pre_hook(lambda m, a, point=point: (point,))
        with torch.enable_grad():
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
            ).logits
            (grad,) = torch.autograd.grad(answer_log_likelihood(logits, batch["labels"]), point)
        handle.remove()
        total += (beta * grad).sum(dim=(0, 1)) / steps
    return total


def answer_positions(batch):
    """Positions p whose logits predict an answer token (labels[:, p + 1] != -100)."""
    return sorted({p for _, p in (batch["labels"][:, 1:] != -100).nonzero().tolist()})


@pytest.mark.parametrize("attribution", ["per_token", "sequence"])
def test_completeness_error_shrinks_with_steps(attribution):
    model = sharpened(dtype=torch.float64)
    batch = make_batch()
    layer = 1
    if attribution == "sequence":  # L(observed) − L(layer zeroed everywhere)
        exact = log_likelihood(model, batch) - log_likelihood(model, batch, zero_layer=layer)
    else:  # Σ_p [L_p(observed) − L_p(layer zeroed at p only)]
        exact = sum(
            log_likelihood(model, batch, position=p)
            - log_likelihood(model, batch, zero_layer=layer, position=p)
            for p in answer_positions(batch)
        )
    exact = float(exact)
    assert abs(exact) > 0.05  # the layer matters, so the check below is not 0 ≈ 0
    errors = {}
    for steps in (4, 64):
        att = neuron_attributions(
            model, [batch], steps=steps, layers=[layer], attribution=attribution, progress=False
        )
        assert list(att) == [layer]
        errors[steps] = abs(float(att[layer].double().sum()) - exact)
    assert errors[64] < errors[4] / 8  # a Riemann sum's error falls like 1/m
    assert errors[64] < 0.01 * abs(exact)


@pytest.mark.parametrize("arch", GATED_MLP_ARCHITECTURES)
def test_per_token_equals_the_per_position_definition_in_float64(arch):
    """The cached-prefix queries give exactly what one full forward per (row, answer position,
    Riemann step) gives, scaling that position only (≤ 1e-6 relative, float64)."""
    # Eager float64 turns the left-padded row's masked softmax into NaN in the brute force
    # itself, so left padding is checked with SDPA.
    impl = "eager" if arch == "gemma2" else "sdpa"
    model = sharpened(arch, dtype=torch.float64, attn_implementation=impl)
    batches = [make_batch(seed=1, left_pad=impl == "sdpa")]
    att = neuron_attributions(model, batches, steps=2, progress=False)
    width = down_projection(decoder_layers(model)[0]).in_features
    assert sorted(att) == [0, 1, 2]
    assert all(a.shape == (width,) and a.dtype == torch.float32 for a in att.values())
    assert all(a.device.type == "cpu" for a in att.values())
    for layer in (0, 2):
        expected = sum(brute_force_token_ig(model, b, layer, 2) for b in batches)
        scale = float(expected.abs().max())
        assert scale > 1e-3
        torch.testing.assert_close(att[layer].double(), expected, rtol=1e-6, atol=1e-6 * scale)


def test_per_token_whatever_the_chunking_and_the_eager_backend():
    model = sharpened(dtype=torch.float64)  # eager; right padding only (see above)
    model.train()  # attribution must switch to eval and back
    frozen = down_projection(decoder_layers(model)[0]).weight
    frozen.requires_grad_(False)
    batches = [make_batch(seed=3)]
    default = neuron_attributions(model, batches, steps=3, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    model.eval()
    expected = sum(brute_force_token_ig(model, b, 1, 3) for b in batches)
    torch.testing.assert_close(
        default[1].double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max())
    )
    # Copies of different layers stacked in one pass (2 does not divide 3, 9 = everything).
    for chunk in (2, 9):
        chunked = neuron_attributions(model, batches, steps=3, progress=False, chunk_size=chunk)
        for layer in default:
            torch.testing.assert_close(chunked[layer], default[layer], rtol=1e-6, atol=1e-9)


def test_the_two_definitions_differ():
    model = sharpened()
    batch = make_batch()
    token = neuron_attributions(model, [batch], steps=4, progress=False)
    sequence = neuron_attributions(model, [batch], steps=4, attribution="sequence", progress=False)
    for layer in (0, 1):
        assert (token[layer] - sequence[layer]).abs().max() > 0.05 * sequence[layer].abs().max()
    # In the last layer a position's MLP output reaches no other position, so the sequence
    # path's score splits exactly into the per-token ones.
    torch.testing.assert_close(token[2], sequence[2], rtol=1e-4, atol=1e-7)


def test_sequence_equals_a_brute_force_single_layer_loop_whatever_the_chunking():
    model = sharpened()
    batches = [make_batch(seed=3), make_batch(seed=4, left_pad=True)]
    steps = 4
    default = neuron_attributions(
        model, batches, steps=steps, attribution="sequence", progress=False
    )
    for layer in (0, 1, 2):
        expected = sum(brute_force_ig(model, b, layer, steps) for b in batches)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(default[layer], expected, rtol=1e-4, atol=1e-6)
    for chunk in (3, 12):
        chunked = neuron_attributions(
            model, batches, steps=steps, attribution="sequence", progress=False, chunk_size=chunk
        )
        for layer in default:
            torch.testing.assert_close(chunked[layer], default[layer], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [2, 5])
def test_per_token_work_is_answer_tokens_times_layers_times_steps(steps):
    """Tokens each decoder layer runs: the observed pass (B·T), then per pass for layer l one
    single-token query per (copy, row, answer slot) through layers ≥ l only — so the total is
    linear in answer tokens × layers × m, whatever the prompt length."""
    model = tiny_causal_lm("llama")
    tokens = {i: [] for i in range(3)}
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: tokens[i].append(kwargs["hidden_states"].shape[:2]),
            with_kwargs=True,
        )
    batch = make_batch()  # 9 tokens; answers: row 0 predicts 5, row 1 (padded) 4
    slots = 5  # queries per row: the most answer tokens of any row
    neuron_attributions(model, [batch], steps=steps, progress=False)
    rows = steps * 2  # one copy of the batch per Riemann step
    assert tokens == {
        0: [(2, 9), (rows, slots)],
        1: [(2, 9), (rows, slots), (rows, slots)],
        2: [(2, 9), (rows, slots), (rows, slots), (rows, slots)],
    }
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_sequence_layers_below_the_scaled_ones_are_replayed_not_run(chunk_size):
    model = tiny_causal_lm("llama")
    rows_per_layer = {i: [] for i in range(3)}
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: rows_per_layer[i].append(kwargs["hidden_states"].shape[0]),
            with_kwargs=True,
        )
    neuron_attributions(
        model,
        [make_batch()],
        steps=4,
        attribution="sequence",
        progress=False,
        chunk_size=chunk_size,
    )
    if chunk_size is None:  # observed pass (2 rows), then one pass per layer (8 rows)
        assert rows_per_layer == {0: [2, 8], 1: [2, 8, 8], 2: [2, 8, 8, 8]}
    else:  # passes of layers {0, 1} (16 rows) and {2} (8 rows)
        assert rows_per_layer == {0: [2, 16], 1: [2, 16], 2: [2, 16, 8]}
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))


@pytest.mark.parametrize("attribution", ["per_token", "sequence"])
def test_batches_without_answers_are_skipped(attribution):
    model = sharpened()
    batch = make_batch()
    silent = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    kwargs = {"steps": 3, "attribution": attribution, "progress": False}
    alone = neuron_attributions(model, [batch], **kwargs)
    mixed = neuron_attributions(model, [silent, batch, silent], **kwargs)
    for layer in alone:
        torch.testing.assert_close(mixed[layer], alone[layer])


def test_thresholds_and_modes_on_a_hand_example():
    forget = {0: torch.tensor([1.0, 0.5, 0.29, -2.0]), 1: torch.tensor([-1.0, -0.5, 0.0, -0.1])}
    retain = {0: torch.tensor([0.0, 1.0, 0.2, 0.0]), 1: torch.tensor([1.0, 1.0, 1.0, 1.0])}
    # t = 0.3, layer 0: max 1.0, so critical iff > 0.3 → units 0, 1 (0.29 is just below).
    dual = critical_neuron_masks(forget, 0.3, retain, mode="dual")
    assert dual[0].tolist() == [True, True, False, False]
    assert dual[1].tolist() == [False] * 4  # layer max ≤ 0: nothing critical
    assert all(m.dtype == torch.bool for m in dual.values())
    # dual ignores the retain set entirely.
    assert {k: v.tolist() for k, v in critical_neuron_masks(forget, 0.3).items()} == {
        k: v.tolist() for k, v in dual.items()
    }
    # retain layer 0: max 1.0, retain-critical = {1}; unit 1 is dual, so forget_only drops it.
    only = critical_neuron_masks(forget, 0.3, retain, mode="forget_only")
    assert only[0].tolist() == [True, False, False, False]
    assert only[1].tolist() == [False] * 4
    # strict ">": at t = 0.5 the unit at exactly 0.5 · max is not critical.
    assert critical_neuron_masks(forget, 0.5)[0].tolist() == [True, False, False, False]
    assert critical_neuron_masks(forget, 0.2)[0].tolist() == [True, True, True, False]
    # The max is per layer: 0.4 is critical in a layer whose max is 0.5.
    assert critical_neuron_masks({2: torch.tensor([0.5, 0.4, 0.1])}, 0.5)[2].tolist() == [
        True,
        True,
        False,
    ]


def test_a_threshold_of_one_or_more_is_refused_as_it_can_select_no_neuron():
    """Critical means Att > t · (layer max), so t = 1 leaves every mask empty, which SIMU then
    refuses after the whole attribution: refused up front, in the library and in SIMU's
    arguments (both routes build them before any attribution)."""
    att = {0: torch.tensor([1.0, 0.5]), 1: torch.tensor([2.0, 2.0])}
    why = (
        " (a neuron is critical when its attribution exceeds threshold × its layer's maximum, "
        "so none would be): use e.g. 0.3"
    )
    for bad, shown in ((1.0, "1"), (1, "1"), (1.5, "1.5")):
        with pytest.raises(MethodArgumentError) as info:
            critical_neuron_masks(att, bad)
        assert str(info.value) == f"threshold must be in (0, 1), got {shown}{why}"
        with pytest.raises(MethodArgumentError) as info:
            SIMUArguments(threshold=bad)
        assert str(info.value) == f"threshold must be in (0, 1), got {shown}{why}"
    with pytest.raises(MethodArgumentError) as info:
        SIMUArguments(threshold=0)
    assert str(info.value) == "threshold must be in (0, 1), got 0: use e.g. 0.3"
    # Just below 1 is allowed: only each layer's maximum (and its ties) stays critical.
    assert SIMUArguments(threshold=0.999).threshold == 0.999
    masks = critical_neuron_masks(att, 0.999)
    assert masks[0].tolist() == [True, False] and masks[1].tolist() == [True, True]


def test_errors_name_the_fix():
    att = {0: torch.tensor([1.0, 0.0])}
    for bad in (0.0, -0.1, 1.5, float("nan"), "0.3", True):
        with pytest.raises(ValueError, match=r"^threshold must be in \(0, 1\), got "):
            critical_neuron_masks(att, bad)
    with pytest.raises(ValueError, match="dual, forget_only"):
        critical_neuron_masks(att, 0.3, mode="union")
    with pytest.raises(ValueError, match="retain_attributions"):
        critical_neuron_masks(att, 0.3, mode="forget_only")
    with pytest.raises(ValueError, match=r"lacks layer\(s\) \[0\]"):
        critical_neuron_masks(att, 0.3, {1: torch.zeros(2)}, mode="forget_only")
    with pytest.raises(ValueError, match="not finite"):
        critical_neuron_masks({0: torch.tensor([1.0, float("nan")])}, 0.3)
    model = tiny_causal_lm("llama")
    with pytest.raises(ValueError, match="empty forget set"):
        neuron_attributions(model, [], steps=2, progress=False)
    silent = {**make_batch(), "labels": torch.full((2, 9), -100)}
    with pytest.raises(ValueError, match="no answer tokens"):
        neuron_attributions(model, [silent], steps=2, progress=False)
    with pytest.raises(ValueError, match="valid ids are 0..2"):
        neuron_attributions(model, [make_batch()], layers=[7], progress=False)
    with pytest.raises(ValueError, match="steps"):
        neuron_attributions(model, [make_batch()], steps=0, progress=False)
    with pytest.raises(ValueError, match="chunk_size"):
        neuron_attributions(model, [make_batch()], steps=2, progress=False, chunk_size=0)


def _attribute_share(rank, world, port, out, cases):
    """One rank of the 2-process test: its share of each case's batches, scores summed."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        model = sharpened()
        passes = []
        model.register_forward_pre_hook(lambda *_: passes.append(1))
        result = []
        for batches in cases:
            passes.clear()
            share = batches[rank::world]
            att = neuron_attributions(model, share, steps=3, progress=False, distributed=True)
            result.append({"att": att, "observed_passes": len(passes)})
        torch.save(result, out / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_each_attribute_their_share_and_get_the_whole_sum(tmp_path):
    """2 gloo processes: rank r attributes batches r, r+2, … only (with 1 batch, rank 1 has
    none), the all-reduced scores equal one process's attribution of every batch, and so do
    the masks."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    cases = [[make_batch(seed=s, left_pad=s % 2 == 1) for s in range(3)], [make_batch(seed=5)]]
    mp.spawn(_attribute_share, args=(2, port, tmp_path, cases), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    model = sharpened()
    for case, batches in enumerate(cases):
        single = neuron_attributions(model, batches, steps=3, progress=False)
        # One observed pass plus one pass per layer (3) for each batch of the rank's share.
        passes = [ranks[r][case]["observed_passes"] for r in range(2)]
        assert passes == [4 * len(batches[r::2]) for r in range(2)]
        for rank in ranks:
            att = rank[case]["att"]
            assert att.keys() == single.keys()
            for layer in single:
                torch.testing.assert_close(att[layer], single[layer], rtol=1e-6, atol=1e-8)
            for t in (0.1, 0.3, 0.5):
                expected = critical_neuron_masks(single, t)
                assert all(
                    torch.equal(m, expected[i]) for i, m in critical_neuron_masks(att, t).items()
                )
