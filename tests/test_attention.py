"""Attention temperature: exact against an independent reference on every supported architecture.

The reference never scales queries: it runs an eager copy of the model whose attention softmax
input (logits after scaling, soft-capping and masking) is divided by τ while a selected layer's
attention runs. The temperature under test scales the query instead, so agreement checks that
doing so is exact (RoPE, GQA, bias, q-norm, fused qkv, soft-cap, padding, SDPA, KV cache).
"""

from __future__ import annotations

import filecmp
import math
from contextlib import contextmanager

import pytest
import torch
from conftest import ARCHITECTURES, tiny_causal_lm
from torch import nn

from asu_simu_plugin import attention
from asu_simu_plugin.arch import decoder_layers, self_attention
from asu_simu_plugin.attention import AttentionTemperature, attention_temperature

ARCHS = list(ARCHITECTURES)
TAU = 2.3
ATOL = 1e-5


def build(arch: str, impl: str = "eager") -> nn.Module:
    """A tiny model whose attention logits are O(1-10), so τ visibly changes the output."""
    if arch == "gemma2" and impl == "sdpa":
        pytest.skip(
            "transformers refuses SDPA for Gemma-2 (5.x raises; 4.45 from_pretrained falls back "
            "to eager because its SDPA class drops the attention soft-cap)"
        )
    model = tiny_causal_lm(arch, impl)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in decoder_layers(model):
            attn = self_attention(layer)
            for name in ("q_proj", "k_proj", "qkv_proj", "c_attn", "query_key_value"):
                if hasattr(attn, name):
                    weight = getattr(attn, name).weight
                    weight.copy_(torch.randn(weight.shape, generator=generator) * 0.35)
            for name in ("q_norm", "k_norm"):  # OLMo-2 renormalises q and k: sharpen via the gain
                if hasattr(attn, name):
                    getattr(attn, name).weight.mul_(3.0)
    return model


def eager_twin(model: nn.Module, arch: str) -> nn.Module:
    """The same weights under eager attention (the reference patches the eager softmax)."""
    twin = tiny_causal_lm(arch, "eager")
    twin.load_state_dict(model.state_dict())
    return twin


@contextmanager
def softmax_divided_by(model: nn.Module, tau: float, layer_ids, monkeypatch):
    """Reference: divide the eager attention softmax input by τ inside the chosen layers only."""
    state = {"inside": False, "calls": 0}
    real_softmax = torch.nn.functional.softmax

    def softmax(input, dim=None, *args, **kwargs):
        if state["inside"]:
            state["calls"] += 1
            input = input / tau
        return real_softmax(input, dim, *args, **kwargs)

    def flagged(forward):
        def run(*args, **kwargs):
            state["inside"] = True
            try:
                return forward(*args, **kwargs)
            finally:
                state["inside"] = False

        return run

    attns = [self_attention(decoder_layers(model)[i]) for i in layer_ids]
    with monkeypatch.context() as patch:
        patch.setattr(torch.nn.functional, "softmax", softmax)
        for attn in attns:
            attn.forward = flagged(attn.forward)
        try:
            yield state
        finally:
            for attn in attns:
                del attn.forward


def padded_batch():
    """Batch 2, right padding: the second row has 3 padding positions."""
    generator = torch.Generator().manual_seed(7)
    input_ids = torch.randint(4, 600, (2, 10), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    input_ids[1, 7:] = 3
    attention_mask[1, 7:] = 0
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(**batch, **kwargs).logits


def hook_state(model: nn.Module) -> dict:
    """Every hook registered on every module, plus the attributes the temperature may touch."""
    kinds = (
        "_forward_hooks",
        "_forward_pre_hooks",
        "_forward_hooks_with_kwargs",
        "_backward_hooks",
        "_backward_pre_hooks",
    )
    state = {}
    for name, module in model.named_modules():
        state[name] = tuple(tuple(getattr(module, kind, {}).items()) for kind in kinds)
        state[name] += (id(vars(module).get("config")), vars(module).get("attn_logit_softcapping"))
        state[name] += (vars(module).get("scaling"),)
        state[name] += ("forward" in vars(module),)
    return state


# Where transformers has the scaling route (>= 4.48), the query route is checked too: it is what
# modules without `scaling` use, and what every module uses on 4.45.
ROUTES = ["scaling", "query"] if attention.SCALING_ROUTE else ["query"]
# Without their own `scaling` (Falcon keeps the scale inline): the query route on every version.
QUERY_ONLY = {"falcon", "falcon_new"}


# -- exactness ------------------------------------------------------------------------------------
@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layers", [None, [1]], ids=["all", "layer1"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_matches_softmax_reference(arch, impl, layers, route, monkeypatch):
    if route == "scaling" and arch in QUERY_ONLY:
        pytest.skip(f"{arch} attention has no `scaling`: tempered through the query")
    monkeypatch.setattr(attention, "SCALING_ROUTE", route == "scaling")
    model = build(arch, impl)
    attn = self_attention(decoder_layers(model)[0])
    if route == "scaling" and "scaling" not in vars(attn):
        # GPT-2 and StableLM got `scaling` after 4.48 (4.51 still scales inline): the query route
        # then applies, and the "query" case of this test checks it.
        pytest.skip(f"{type(attn).__name__} has no `scaling` in this transformers version")
    reference_model = eager_twin(model, arch)
    batch = padded_batch()
    plain = logits(model, batch)

    selected = [0, 1, 2] if layers is None else layers
    with softmax_divided_by(reference_model, TAU, selected, monkeypatch) as state:
        expected = logits(reference_model, batch)
    assert state["calls"] == len(selected)  # the reference really ran through the patched softmax

    with attention_temperature(model, TAU, layers) as handle:
        assert handle.layers == selected
        assert handle.routes == dict.fromkeys(selected, route)
        tempered = logits(model, batch)

    assert (tempered - expected).abs().max() <= ATOL  # padded positions included
    valid = batch["attention_mask"].bool()
    assert (tempered - plain)[valid].abs().max() > 1e-2  # τ really changed the model


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_flex_attention_backend(arch, monkeypatch):
    """transformers >= 4.48's flex attention (compiled; ~1-2 min on CPU) gets the module's
    `scaling` as its `scale` and the soft-cap in its score function: exact as eager."""
    if not attention.SCALING_ROUTE:
        pytest.skip("flex attention through `scaling` needs transformers >= 4.48")
    model = build(arch, "flex_attention")
    reference_model = eager_twin(model, arch)
    batch = {"input_ids": padded_batch()["input_ids"]}  # no padding mask: flex's block mask
    try:
        plain = logits(model, batch)
    except Exception as error:
        # transformers < 4.52 always asks flex for the log-sum-exp, which torch's CPU inductor
        # kernel cannot return: the backend does not run here at all, tempered or not.
        if "`return_lse` is not supported" not in str(error):
            raise
        pytest.skip(f"flex attention cannot run on CPU with this transformers/torch: {error}")
    with softmax_divided_by(reference_model, TAU, [0, 1, 2], monkeypatch):
        expected = logits(reference_model, batch)
    with attention_temperature(model, TAU) as handle:
        assert set(handle.routes.values()) == {"scaling"}
        tempered = logits(model, batch)
    assert (tempered - expected).abs().max() <= ATOL
    assert (tempered - plain).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["gemma2", "gemma3"])
def test_softcap_is_scaled_per_layer(arch):
    """Gemma-2: the cap of tempered layers becomes cap/τ; other layers and the config keep cap."""
    model = build(arch)
    attns = [self_attention(layer) for layer in decoder_layers(model)]
    with attention_temperature(model, 4.0, [1]):
        caps = []
        for attn in attns:
            own = vars(attn).get("attn_logit_softcapping")
            caps.append(own if own is not None else attn.config.attn_logit_softcapping)
        assert caps == [5.0, 1.25, 5.0]
        assert model.config.attn_logit_softcapping == 5.0
    for attn in attns:
        assert getattr(attn, "attn_logit_softcapping", 5.0) == 5.0
        assert attn.config is model.config


# -- identity, selection, pausing, removal --------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_temperature_one_is_bit_identical(arch):
    model = build(arch)
    batch = padded_batch()
    before = hook_state(model)
    plain = logits(model, batch)
    with attention_temperature(model, 1, None) as handle:
        assert hook_state(model) == before  # nothing attached at all
        assert handle.active
        assert torch.equal(logits(model, batch), plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_only_selected_layers_change(arch):
    model = build(arch)
    batch = padded_batch()
    with torch.no_grad():
        plain = model(**batch, output_hidden_states=True).hidden_states
        with attention_temperature(model, TAU, [1]):
            tempered = model(**batch, output_hidden_states=True).hidden_states
    # hidden_states[i] is the input of layer i: the embeddings and layer 0's output are untouched.
    assert torch.equal(tempered[0], plain[0])
    assert torch.equal(tempered[1], plain[1])
    assert (tempered[2] - plain[2]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_paused_gives_untempered_logits(arch):
    model = build(arch)
    batch = padded_batch()
    plain = logits(model, batch)
    handle = attention_temperature(model, TAU)
    tempered = logits(model, batch)
    assert handle.active
    with handle.paused():
        assert not handle.active
        assert torch.equal(logits(model, batch), plain)
        with handle.paused():  # nesting keeps it paused until the outermost exit
            pass
        assert torch.equal(logits(model, batch), plain)
    assert handle.active
    assert torch.equal(logits(model, batch), tempered)
    handle.remove()
    assert not handle.active
    assert torch.equal(logits(model, batch), plain)


def test_remove_inside_paused_stays_removed():
    model = build("gemma2")
    batch = padded_batch()
    plain = logits(model, batch)
    before = hook_state(model)
    handle = attention_temperature(model, TAU)
    with handle.paused():
        handle.remove()
    assert hook_state(model) == before
    assert torch.equal(logits(model, batch), plain)


@pytest.mark.parametrize("arch", ARCHS)
def test_removal_leaves_nothing_behind(arch, tmp_path):
    model = build(arch)
    batch = padded_batch()
    plain = logits(model, batch)
    hooks_before = hook_state(model)
    state_before = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "before")  # (saving itself fills config.architectures)
    config_before = model.config.to_dict()

    handle = attention_temperature(model, TAU)
    assert hook_state(model) != hooks_before
    model.save_pretrained(tmp_path / "while")  # a checkpoint of the teacher carries no temperature
    handle.remove()
    handle.remove()  # idempotent
    model.save_pretrained(tmp_path / "after")

    assert hook_state(model) == hooks_before
    state_after = model.state_dict()
    assert state_after.keys() == state_before.keys()
    assert all(torch.equal(state_after[k], v) for k, v in state_before.items())
    assert model.config.to_dict() == config_before
    assert torch.equal(logits(model, batch), plain)
    names = sorted(p.name for p in (tmp_path / "before").iterdir())
    for saved in ("while", "after"):
        assert sorted(p.name for p in (tmp_path / saved).iterdir()) == names
        match, mismatch, errors = filecmp.cmpfiles(
            tmp_path / "before", tmp_path / saved, names, shallow=False
        )
        assert (mismatch, errors) == ([], [])


# -- generation and limits ------------------------------------------------------------------------
def greedy_vs_full_forwards(model, prompt, **generate_kwargs):
    """Greedy generation's new tokens, the largest gap between its per-step logits and a full
    forward of the sequence so far, and whether every token is that forward's argmax."""
    out = model.generate(
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        return_dict_in_generate=True,
        output_logits=True,
        pad_token_id=3,
        **generate_kwargs,
    )
    new_tokens = out.sequences[0, prompt.shape[1] :]
    sequence, gap, argmax = prompt, 0.0, True
    for step, token in enumerate(new_tokens):
        full = model(input_ids=sequence).logits[0, -1]
        gap = max(gap, (out.logits[step][0] - full).abs().max().item())
        argmax = argmax and bool(full.argmax() == token)
        sequence = torch.cat([sequence, token.view(1, 1)], dim=1)
    return new_tokens, gap, argmax


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_matches_repeated_full_forwards(arch):
    """The KV cache holds unscaled keys, so cached decoding equals recomputing everything."""
    model = build(arch)
    prompt = torch.randint(4, 600, (1, 6), generator=torch.Generator().manual_seed(3))
    cache = {}
    with torch.no_grad():
        if greedy_vs_full_forwards(model, prompt)[1] > ATOL:
            # Not the temperature: untempered, transformers 4.51's HybridCache (Gemma-2/3's
            # default) gives the last step other logits than a full forward; a DynamicCache not.
            cache = {"cache_implementation": "dynamic"}
            assert greedy_vs_full_forwards(model, prompt, **cache)[1] <= ATOL
        with attention_temperature(model, TAU):
            new_tokens, gap, argmax = greedy_vs_full_forwards(model, prompt, **cache)
    assert gap <= ATOL
    assert argmax
    assert len(new_tokens) > 1


@pytest.mark.parametrize("arch", ARCHS)
def test_large_temperature_gives_uniform_attention(arch):
    model = build(arch)
    input_ids = torch.randint(4, 600, (1, 8), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        plain = model(input_ids=input_ids, output_attentions=True).attentions
        with attention_temperature(model, 1e6, [0, 2]):
            smooth = model(input_ids=input_ids, output_attentions=True).attentions
    for i in (0, 2):
        visible = (plain[i][0] > 0).float()  # causal, and within the window of sliding layers
        uniform = visible / visible.sum(-1, keepdim=True)
        assert (smooth[i][0] - uniform).abs().max() < 1e-4
        assert (plain[i][0] - uniform).abs().max() > 0.05


# -- wrappers and errors --------------------------------------------------------------------------
class EngineLike(nn.Module):
    """Stands in for DDP / a DeepSpeed engine: the real model sits in `.module`."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, **kwargs):
        return self.module(**kwargs)


def test_unwraps_distributed_wrappers():
    model = build("llama")
    batch = padded_batch()
    with attention_temperature(model, TAU):
        expected = logits(model, batch)
    wrapped = EngineLike(EngineLike(model))
    with attention_temperature(wrapped, TAU) as handle:
        assert isinstance(handle, AttentionTemperature)
        assert torch.equal(logits(wrapped, batch), expected)


@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf, -math.inf, "hot", None, True])
def test_rejects_bad_temperature(bad):
    model = build("llama")
    before = hook_state(model)
    with pytest.raises(ValueError, match=r"finite number > 0.*τ > 1 smooths"):
        attention_temperature(model, bad)
    assert hook_state(model) == before


@pytest.mark.parametrize("layers", [[3], [0, -1], 7])
def test_rejects_unknown_layer(layers):
    model = build("llama")
    before = hook_state(model)
    with pytest.raises(ValueError, match=r"valid ids are 0\.\.2"):
        attention_temperature(model, TAU, layers)
    assert hook_state(model) == before


def test_empty_layer_list_tempers_nothing():
    model = build("llama")
    batch = padded_batch()
    plain = logits(model, batch)
    with pytest.warns(UserWarning, match="empty layer list"):
        handle = attention_temperature(model, TAU, [])
    assert handle.layers == []
    assert torch.equal(logits(model, batch), plain)


def test_rejects_unrecognised_query_path(monkeypatch):
    import transformers

    monkeypatch.setattr(attention, "SCALING_ROUTE", False)
    model = build("gpt2")
    for layer in decoder_layers(model):
        self_attention(layer).c_attn.nf += 1  # a fused layout the query route does not know
    before = hook_state(model)
    with pytest.raises(TypeError, match=r"GPT2LMHeadModel: cannot find the query.*exactly"):
        attention_temperature(model, TAU)
    assert hook_state(model) == before

    config = transformers.FalconConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, alibi=True
    )
    falcon = transformers.FalconForCausalLM(config)
    before = hook_state(falcon)
    monkeypatch.setattr(attention, "SCALING_ROUTE", True)
    with pytest.raises(TypeError, match=r"FalconForCausalLM: .*ALiBi.*cannot be exact"):
        attention_temperature(falcon, TAU)
    assert hook_state(falcon) == before


def test_scaling_route_on_new_transformers():
    """On transformers >= 4.48 every module with its own `scaling` is tempered through it."""
    model = build("llama")
    scales = (
        [self_attention(layer).scaling for layer in decoder_layers(model)]
        if (attention.SCALING_ROUTE)
        else None
    )
    with attention_temperature(model, 4.0, [0, 2]) as handle:
        expected = "scaling" if attention.SCALING_ROUTE else "query"
        assert handle.routes == {0: expected, 2: expected}
        if scales is not None:
            now = [self_attention(layer).scaling for layer in decoder_layers(model)]
            assert now == [scales[0] / 4.0, scales[1], scales[2] / 4.0]
            with handle.paused():
                assert [self_attention(la).scaling for la in decoder_layers(model)] == scales
    if scales is not None:
        assert [self_attention(layer).scaling for layer in decoder_layers(model)] == scales


@pytest.mark.parametrize("layers", ["15", "1", 2.0, [1.5], ["0"], [True]])
def test_rejects_non_integer_layer_ids(layers):
    """A string is not read character by character ("15" used to temper layers 1 and 5)."""
    model = build("llama")
    before = hook_state(model)
    with pytest.raises(ValueError, match=r"integer"):
        attention_temperature(model, TAU, layers)
    assert hook_state(model) == before


def test_rejects_model_without_attention():
    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = object()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList([nn.Linear(2, 2)])

    with pytest.raises(TypeError, match=r"NoAttention.*no self-attention.*Supported"):
        attention_temperature(NoAttention(), TAU)


def test_olmo_clip_qkv_really_clamps_here():
    """The clip_qkv model of these tests clamps queries and keys on the test batch (so its exact
    cases above check the moved clamp), and the temperature leaves the shared config's bound."""
    model = build("olmo_clip")
    attn = self_attention(decoder_layers(model)[0])
    seen = {}
    hooks = [
        getattr(attn, name).register_forward_hook(
            lambda m, a, out, name=name: seen.__setitem__(name, out.abs().max().item())
        )
        for name in ("q_proj", "k_proj")
    ]
    logits(model, padded_batch())
    for hook in hooks:
        hook.remove()
    assert min(seen.values()) > 1.5 * model.config.clip_qkv
    with attention_temperature(model, TAU):
        assert model.config.clip_qkv == 1.0
    assert vars(attn)["config"] is model.config
