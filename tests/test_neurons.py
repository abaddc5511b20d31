"""SIMU neuron attribution (integrated gradients) and critical-neuron masks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import ARCHITECTURES, tiny_causal_lm

from asu_simu_plugin.arch import decoder_layers, down_projection
from asu_simu_plugin.neurons import (
    critical_neuron_masks,
    load_masks,
    mask_summary,
    neuron_attributions,
    plot_mask_counts,
    save_masks,
)


def make_batch(seed=0, vocab=600):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, vocab, (2, 9), generator=gen)
    labels = ids.clone()
    labels[:, :4] = -100
    labels[1, 7:] = -100
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def sharpened(arch="llama"):
    model = tiny_causal_lm(arch)
    with torch.no_grad():  # random init leaves the MLP nearly silent; make it matter
        for layer in decoder_layers(model):
            down_projection(layer).weight.mul_(10)
    return model


def log_likelihood(model, batch, zero_layer=None, scale_layer=None, alpha=1.0):
    hooks = []
    if zero_layer is not None:
        proj = down_projection(decoder_layers(model)[zero_layer])
        hooks.append(proj.register_forward_pre_hook(lambda m, a: (a[0] * 0,)))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for h in hooks:
        h.remove()
    return -F.cross_entropy(
        logits[:, :-1].transpose(1, 2), batch["labels"][:, 1:], ignore_index=-100, reduction="sum"
    )


def test_completeness_error_shrinks_with_steps():
    model = sharpened()
    batch = make_batch()
    layer = 1
    exact = float(log_likelihood(model, batch) - log_likelihood(model, batch, zero_layer=layer))
    errors = {}
    for steps in (4, 64):
        att = neuron_attributions(model, [batch], steps=steps, layers=[layer], progress=False)
        errors[steps] = abs(float(att[layer].sum()) - exact)
    assert errors[64] < errors[4]
    assert errors[64] < 0.01 * abs(exact) + 1e-4


def brute_force_ig(model, batch, layer, steps):
    """Single-layer IG with an explicit loop over α (no batching of copies)."""
    proj = down_projection(decoder_layers(model)[layer])
    captured = {}
    h = proj.register_forward_pre_hook(lambda m, a: captured.setdefault("beta", a[0].detach()))
    with torch.no_grad():
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    h.remove()
    beta = captured["beta"]
    total = torch.zeros(beta.shape[-1])
    for j in range(1, steps + 1):
        point = (j / steps * beta).clone().requires_grad_(True)
        h = proj.register_forward_pre_hook(lambda m, a, point=point: (point,))
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        h.remove()
        ll = -F.cross_entropy(
            logits[:, :-1].transpose(1, 2),
            batch["labels"][:, 1:],
            ignore_index=-100,
            reduction="sum",
        )
        (grad,) = torch.autograd.grad(ll, point)
        total += (beta * grad).sum(dim=(0, 1)) / steps
    return total


def test_batched_copies_equal_a_brute_force_loop_per_layer():
    model = sharpened()
    batch = make_batch(seed=3)
    att = neuron_attributions(model, [batch, make_batch(seed=4)], steps=6, progress=False)
    for layer in (0, 2):
        expected = brute_force_ig(model, batch, layer, 6) + brute_force_ig(
            model, make_batch(seed=4), layer, 6
        )
        torch.testing.assert_close(att[layer], expected, rtol=1e-4, atol=1e-6)
    chunked = neuron_attributions(
        model, [batch, make_batch(seed=4)], steps=6, progress=False, chunk_size=4
    )
    for layer in att:
        torch.testing.assert_close(chunked[layer], att[layer], rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_every_gated_architecture(arch):
    model = tiny_causal_lm(arch)
    att = neuron_attributions(model, [make_batch()], steps=3, progress=False)
    assert sorted(att) == [0, 1, 2]
    width = down_projection(decoder_layers(model)[0]).in_features
    assert all(a.shape == (width,) and a.dtype == torch.float32 for a in att.values())
    assert all(torch.isfinite(a).all() for a in att.values())


def test_thresholds_and_modes_on_a_hand_example():
    forget = {0: torch.tensor([1.0, 0.5, 0.29, -2.0]), 1: torch.tensor([-1.0, -0.5, 0.0, -0.1])}
    retain = {0: torch.tensor([0.0, 1.0, 0.2, 0.0]), 1: torch.tensor([1.0, 1.0, 1.0, 1.0])}
    dual = critical_neuron_masks(forget, 0.3, retain, mode="dual")
    assert dual[0].tolist() == [True, True, False, False]  # > 0.3 · 1.0
    assert dual[1].tolist() == [False] * 4  # layer max ≤ 0: nothing critical
    only = critical_neuron_masks(forget, 0.3, retain, mode="forget_only")
    assert only[0].tolist() == [True, False, False, False]  # unit 1 is retain-critical too
    assert critical_neuron_masks(forget, 1.0)[0].tolist() == [False] * 4  # strict ">"
    assert critical_neuron_masks(forget, 0.2)[0].tolist() == [True, True, True, False]


def test_masks_round_trip_with_counts_and_png(tmp_path):
    masks = {0: torch.tensor([True, False, True]), 3: torch.tensor([False, False, True])}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", {"threshold": 0.3, "steps": 20})
    loaded = load_masks(tensors)
    assert loaded.keys() == masks.keys()
    assert all(torch.equal(loaded[k], masks[k]) for k in masks)
    assert torch.equal(load_masks(tmp_path)[3], masks[3])  # the directory works too
    record = json.loads(meta.read_text())
    assert record["threshold"] == 0.3
    assert record["critical_per_layer"] == {"0": 2, "3": 1}
    assert record["critical_fraction"] == pytest.approx(3 / 6)
    assert mask_summary(masks)["critical_total"] == 3
    png = plot_mask_counts({0.1: masks, 0.5: masks}, tmp_path / "sweep.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_errors_name_the_fix():
    att = {0: torch.tensor([1.0, 0.0])}
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        critical_neuron_masks(att, 0.0)
    with pytest.raises(ValueError, match="retain_attributions"):
        critical_neuron_masks(att, 0.3, mode="forget_only")
    with pytest.raises(ValueError, match="empty"):
        neuron_attributions(tiny_causal_lm("llama"), [], steps=2, progress=False)
    with pytest.raises(ValueError, match="valid ids"):
        neuron_attributions(tiny_causal_lm("llama"), [make_batch()], layers=[7], progress=False)
