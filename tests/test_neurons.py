"""SIMU neuron attribution (integrated gradients, per answer token and per sequence) and
critical-neuron masks (files recording the model they were made for)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import GATED_MLP_ARCHITECTURES, tiny_causal_lm

from asu_simu_plugin.arch import decoder_layers, down_projection
from asu_simu_plugin.methods.simu.attribution import (
    check_masks,
    critical_neuron_masks,
    load_masks,
    mask_record,
    mask_summary,
    model_record,
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


def test_a_mask_file_records_its_model_and_refuses_any_other(tmp_path):
    model = tiny_causal_lm("llama")
    masks = {i: torch.tensor([True] + [False] * 47) for i in range(3)}
    settings = {"steps": 5, "threshold": 0.3, "attribution": "per_token"}
    tensors, meta = save_masks(masks, tmp_path / "simu_masks", settings, model=model)
    record = model_record(model)
    assert record["num_layers"] == 3 and record["mlp_width"] == 48
    assert len(record["fingerprint"]) == 16
    # The record travels inside the tensor file and is mirrored in the JSON.
    assert mask_record(tensors) == {**settings, "model": record}
    assert json.loads(meta.read_text())["model"] == record
    for loaded in (load_masks(tensors, model=model), load_masks(tmp_path, model=model)):
        assert all(torch.equal(loaded[i], masks[i]) for i in masks)
    # The same weights in bfloat16 have the same fingerprint (samples are rounded to bf16).
    assert model_record(tiny_causal_lm("llama").to(torch.bfloat16)) == record

    def refused(other, match, path=tensors):
        with pytest.raises(ValueError, match=match) as info:
            load_masks(path, model=other)
        assert "\n" not in str(info.value) and "attribute" in str(info.value)

    refused(tiny_causal_lm("llama", seed=1), "other weights")
    refused(tiny_causal_lm("llama", num_hidden_layers=4), "3 decoder layers, this one has 4")
    with pytest.raises(ValueError, match="MLP width 48, this model's is 64"):
        load_masks(tensors, model=tiny_causal_lm("llama", intermediate_size=64))
    # Extra / missing layers, a wrong width in one layer, no critical neuron at all.
    for name, bad, match in (
        ("extra", {**masks, 3: masks[0]}, r"layer\(s\) \[3\] this model lacks"),
        ("missing", {0: masks[0], 1: masks[1]}, r"none for layer\(s\) \[2\]"),
        ("narrow", {**masks, 1: masks[1][:40]}, r"layers \[1\] differ"),
        (
            "empty",
            {i: torch.zeros(48, dtype=torch.bool) for i in range(3)},
            "no neuron is critical",
        ),
    ):
        path, _ = save_masks(bad, tmp_path / name, settings, model=model)
        refused(model, match, path=path)
    # A file that records no model (older files, hand-made ones) is refused for training.
    bare, _ = save_masks(masks, tmp_path / "bare", settings)
    refused(model, "does not record the model", path=bare)
    with pytest.raises(ValueError, match="does not record"):
        check_masks(masks, model, None, "masks")


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
