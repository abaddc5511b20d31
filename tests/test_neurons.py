"""SIMU neuron attribution (integrated gradients) and critical-neuron masks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import GATED_MLP_ARCHITECTURES, tiny_causal_lm

from asu_simu_plugin.arch import decoder_layers, down_projection
from asu_simu_plugin.neurons import (
    critical_neuron_masks,
    load_masks,
    mask_summary,
    neuron_attributions,
    plot_mask_counts,
    save_masks,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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


def sharpened(arch="llama"):
    model = tiny_causal_lm(arch)
    with torch.no_grad():  # random init leaves the MLP nearly silent; make it matter
        for layer in decoder_layers(model):
            down_projection(layer).weight.mul_(10)
    return model


def answer_log_likelihood(logits, labels):
    return -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), labels[:, 1:], ignore_index=-100, reduction="sum"
    )


def log_likelihood(model, batch, zero_layer=None):
    handle = None
    if zero_layer is not None:
        proj = down_projection(decoder_layers(model)[zero_layer])
        handle = proj.register_forward_pre_hook(lambda m, a: (a[0] * 0,))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if handle is not None:
        handle.remove()
    return answer_log_likelihood(logits, batch["labels"])


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


def test_completeness_error_shrinks_with_steps():
    model = sharpened()
    batch = make_batch()
    layer = 1
    exact = float(log_likelihood(model, batch) - log_likelihood(model, batch, zero_layer=layer))
    assert abs(exact) > 0.05  # the layer matters, so the check below is not 0 ≈ 0
    errors = {}
    for steps in (4, 64):
        att = neuron_attributions(
            model, [batch], steps=steps, layers=[layer], progress=False, chunk_size=64
        )
        assert list(att) == [layer]
        errors[steps] = abs(float(att[layer].sum()) - exact)
    assert errors[64] < errors[4] / 8  # a Riemann sum's error falls like 1/m
    assert errors[64] < 0.01 * abs(exact)


def test_each_layer_equals_a_brute_force_single_layer_loop_whatever_the_chunking():
    model = sharpened()
    model.train()  # attribution must switch to eval and back
    frozen = down_projection(decoder_layers(model)[0]).weight
    frozen.requires_grad_(False)
    batches = [make_batch(seed=3), make_batch(seed=4, left_pad=True)]
    steps = 4
    default = neuron_attributions(model, batches, steps=steps, progress=False)
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert not frozen.requires_grad
    assert all(p.requires_grad for p in model.parameters() if p is not frozen)
    model.eval()
    for layer in (0, 1, 2):
        expected = sum(brute_force_ig(model, b, layer, steps) for b in batches)
        assert expected.abs().max() > 1e-2
        torch.testing.assert_close(default[layer], expected, rtol=1e-4, atol=1e-6)
    # Copies of different layers stacked in one pass (3 does not divide 4, 12 = everything).
    for chunk in (3, 12):
        chunked = neuron_attributions(model, batches, steps=steps, progress=False, chunk_size=chunk)
        for layer in default:
            torch.testing.assert_close(chunked[layer], default[layer], rtol=1e-5, atol=1e-7)


def test_default_runs_one_pass_per_layer_of_steps_copies():
    model = tiny_causal_lm("llama")
    rows_per_pass = []
    handle = model.register_forward_pre_hook(
        lambda m, args, kwargs: rows_per_pass.append(kwargs["input_ids"].shape[0]),
        with_kwargs=True,
    )
    neuron_attributions(model, [make_batch(), make_batch(1)], steps=4, progress=False)
    handle.remove()
    # Per batch: one observed pass of 2 rows, then 3 layers × 4 copies × 2 rows.
    assert rows_per_pass == [2, 8, 8, 8] * 2


@pytest.mark.parametrize("chunk_size", [None, 8])
def test_layers_below_the_scaled_ones_are_replayed_not_run(chunk_size):
    model = tiny_causal_lm("llama")
    rows_per_layer = {i: [] for i in range(3)}
    for i, layer in enumerate(decoder_layers(model)):
        layer.self_attn.register_forward_pre_hook(
            lambda m, args, kwargs, i=i: rows_per_layer[i].append(kwargs["hidden_states"].shape[0]),
            with_kwargs=True,
        )
    neuron_attributions(model, [make_batch()], steps=4, progress=False, chunk_size=chunk_size)
    if chunk_size is None:  # observed pass (2 rows), then one pass per layer (8 rows)
        assert rows_per_layer == {0: [2, 8], 1: [2, 8, 8], 2: [2, 8, 8, 8]}
    else:  # passes of layers {0, 1} (16 rows) and {2} (8 rows)
        assert rows_per_layer == {0: [2, 16], 1: [2, 16], 2: [2, 16, 8]}
    assert not any("forward" in vars(layer) for layer in decoder_layers(model))


def test_batches_without_answers_are_skipped():
    model = sharpened()
    batch = make_batch()
    silent = {**batch, "labels": torch.full_like(batch["labels"], -100)}
    alone = neuron_attributions(model, [batch], steps=3, progress=False)
    mixed = neuron_attributions(model, [silent, batch, silent], steps=3, progress=False)
    for layer in alone:
        torch.testing.assert_close(mixed[layer], alone[layer])


@pytest.mark.parametrize("arch", GATED_MLP_ARCHITECTURES)
def test_every_gated_architecture_matches_the_brute_force_loop(arch):
    model = sharpened(arch)
    batch = make_batch()
    att = neuron_attributions(model, [batch], steps=3, progress=False)
    assert sorted(att) == [0, 1, 2]
    width = down_projection(decoder_layers(model)[0]).in_features
    assert all(a.shape == (width,) and a.dtype == torch.float32 for a in att.values())
    assert all(a.device.type == "cpu" for a in att.values())
    expected = brute_force_ig(model, batch, 1, 3)
    assert expected.abs().max() > 1e-3
    torch.testing.assert_close(att[1], expected, rtol=1e-4, atol=1e-6)


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
    assert critical_neuron_masks(forget, 1.0)[0].tolist() == [False] * 4  # strict ">"
    assert critical_neuron_masks(forget, 0.2)[0].tolist() == [True, True, True, False]
    # The max is per layer: 0.4 is critical in a layer whose max is 0.5.
    assert critical_neuron_masks({2: torch.tensor([0.5, 0.4, 0.1])}, 0.5)[2].tolist() == [
        True,
        True,
        False,
    ]


def test_masks_round_trip_with_counts_and_pngs(tmp_path):
    masks = {0: torch.tensor([True, False, True]), 3: torch.tensor([False, False, True])}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", {"threshold": 0.3, "steps": 20})
    assert (tensors.name, meta.name) == ("simu_masks.safetensors", "simu_masks.json")
    for source in (tensors, tmp_path / "simu_masks", tmp_path):  # file, stem, directory
        loaded = load_masks(source)
        assert list(loaded) == [0, 3]
        assert all(
            loaded[k].dtype == torch.bool and torch.equal(loaded[k], masks[k]) for k in masks
        )
    record = json.loads(meta.read_text())
    assert record["threshold"] == 0.3 and record["steps"] == 20
    assert record["critical_per_layer"] == {"0": 2, "3": 1}
    assert record["critical_total"] == 3 and record["neurons_total"] == 6
    assert record["critical_fraction"] == pytest.approx(0.5)
    assert mask_summary(masks)["critical_per_layer"] == {0: 2, 3: 1}
    # A stem with a dot keeps it.
    dotted, _ = save_masks(masks, tmp_path / "masks_t0.3", {})
    assert dotted.name == "masks_t0.3.safetensors"
    assert torch.equal(load_masks(dotted)[0], masks[0])
    # Files written with uint8 masks load as bool.
    from safetensors.torch import save_file

    save_file(
        {"layer.5": torch.tensor([1, 0], dtype=torch.uint8)}, str(tmp_path / "u8.safetensors")
    )
    assert load_masks(tmp_path / "u8.safetensors")[5].tolist() == [True, False]
    for name, data in (
        ("sweep.png", {0.1: masks, 0.5: masks}),
        ("one.png", masks),
        ("counts.png", {0.3: {0: 2, 3: 1}}),
    ):
        png = plot_mask_counts(data, tmp_path / "plots" / name)
        assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 1000


def test_errors_name_the_fix(tmp_path):
    att = {0: torch.tensor([1.0, 0.0])}
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"\(0, 1\]"):
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
    with pytest.raises(FileNotFoundError, match="simu_masks.safetensors"):
        load_masks(tmp_path)
    with pytest.raises(ValueError, match="nothing to plot"):
        plot_mask_counts({}, tmp_path / "x.png")
