"""SOGradDiff / SONPO / SIMU trainers: Sophia wiring, masks, resume (DDP: tests/distributed)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from asu_simu_plugin import registry, toy
from asu_simu_plugin.arch import attention_projection_names, decoder_layers, down_projection
from asu_simu_plugin.guards import NonFiniteTrainingError
from asu_simu_plugin.methods.simu.masks import load_masks
from asu_simu_plugin.methods.sophia.optimizer import SophiaG
from asu_simu_plugin.runner import RunSettings, build_trainer


@pytest.fixture
def world(toy_authors, toy_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(toy_tokenizer)))
    forget = toy_authors[0].qa_pairs()
    retain = [qa for a in toy_authors[1:4] for qa in a.qa_pairs()]
    return model, toy_tokenizer, forget, retain


def make(world, method, out, settings=None, **method_args):
    model, tokenizer, forget, retain = world
    settings = settings or RunSettings(epochs=2, batch_size=2, learning_rate=1e-3, logging_steps=1)
    return build_trainer(method, model, tokenizer, forget, retain, out, method_args, settings)


def test_sograddiff_uses_sophia_with_gnb_refreshes(world, tmp_path):
    trainer = make(world, "sograddiff", tmp_path, hessian_mode="gnb", hessian_interval=2)
    trainer.train()
    assert isinstance(trainer.optimizer_for_hessian(), SophiaG)
    steps = trainer.state.global_step
    assert trainer._hessian_updates == steps // 2
    logged = [h for h in trainer.state.log_history if "sophia/win_rate" in h]
    assert logged and all(0.0 <= h["sophia/win_rate"] <= 1.0 for h in logged)
    groups = trainer.optimizer_for_hessian().param_groups
    assert {g["weight_decay"] for g in groups} == {0.0, trainer.args.weight_decay} or len(
        groups
    ) == 1


def test_gnb_pass_keeps_the_training_gradient(world, tmp_path):
    trainer = make(world, "sograddiff", tmp_path, hessian_mode="gnb")
    trainer.create_optimizer()
    model = trainer.model
    grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        grads[name] = p.grad.clone()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.gauss_newton_bartlett_update(model, batch)
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters())
    optimizer = trainer.optimizer_for_hessian()
    hessians = [optimizer.state[p]["hessian"] for p in model.parameters()]
    assert any(bool(h.abs().sum() > 0) for h in hessians)
    answer_tokens = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch.values())
    assert trainer.hessian_tokens == answer_tokens
    assert all(g["bs"] == 1 for g in optimizer.param_groups)  # B is folded into each estimate


def hessians_of(trainer):
    optimizer = trainer.optimizer_for_hessian()
    return [optimizer.state[p]["hessian"].clone() for p in trainer.model.parameters()]


@pytest.mark.parametrize("fault", ["loss", "gradient", "logits"])
def test_a_nonfinite_hessian_pass_stops_before_the_estimate_changes(world, tmp_path, fault):
    from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

    trainer = make(world, "sograddiff", tmp_path, hessian_mode="gnb")
    trainer.create_optimizer()
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.gauss_newton_bartlett_update(model, batch)  # a finite estimate first
    before = hessians_of(trainer)
    assert any(bool(h.any()) for h in before)
    training_grads = {}
    for name, p in model.named_parameters():
        p.grad = torch.randn_like(p)
        training_grads[name] = p.grad.clone()
    name = "model.layers.0.mlp.down_proj.weight"
    if fault == "loss":
        original = SophiaMixin._sampled_label_loss
        trainer._sampled_label_loss = lambda m, b: original(trainer, m, b) * float("nan")
        expected = "the sampled-label loss of the Hessian pass is nan"
    elif fault == "gradient":
        weight = model.get_parameter(name)
        weight.register_hook(lambda g: torch.full_like(g, float("inf")))
        expected = f"the Hessian pass's gradients of {name} are non-finite"
    else:  # a non-finite weight: without the guard, torch.multinomial fails on NaN probabilities
        with torch.no_grad():
            model.get_parameter(name)[0, 0] = float("nan")
        expected = "the sampled-label loss of the Hessian pass is nan"
    trainer.state.global_step = 7
    with pytest.raises(NonFiniteTrainingError) as caught:
        trainer.gauss_newton_bartlett_update(model, batch)
    assert str(caught.value).startswith(
        f"training diverged at optimizer step 7: {expected} (the Hessian estimate was left "
        "unchanged). Stopped without saving a model"
    )
    after = hessians_of(trainer)
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
    assert trainer._hessian_updates == 1
    assert all(torch.equal(p.grad, training_grads[n]) for n, p in model.named_parameters())


def test_training_stops_at_the_step_of_a_nonfinite_hessian_pass(world, tmp_path):
    from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

    trainer = make(world, "sograddiff", tmp_path, hessian_mode="gnb", hessian_interval=1)
    original = SophiaMixin._sampled_label_loss
    passes = []

    def second_pass_is_nan(model, batch):
        loss = original(trainer, model, batch)
        if trainer.state.global_step < 2:
            return loss
        if not passes:
            passes.append(hessians_of(trainer))  # the estimate after step 1's pass
        return loss * float("nan")

    trainer._sampled_label_loss = second_pass_is_nan
    with pytest.raises(NonFiniteTrainingError, match=r"at optimizer step 2: the sampled-label"):
        trainer.train()
    assert trainer.state.global_step == 2 and trainer._hessian_updates == 1
    assert all(torch.equal(a, b) for a, b in zip(passes[0], hessians_of(trainer), strict=True))
    assert all(bool(p.isfinite().all()) for p in trainer.model.parameters())


def argmax_labels(logits):
    return logits.argmax(dim=-1)


def test_gnb_folds_each_batch_token_count_into_its_own_estimate(world, tmp_path, monkeypatch):
    """h after two passes on batches of different answer lengths, against a hand computation."""
    from asu_simu_plugin.methods.sophia.trainer import SophiaMixin

    monkeypatch.setattr(SophiaMixin, "sample_labels", staticmethod(argmax_labels))
    settings = RunSettings(epochs=1, batch_size=2, learning_rate=1e-3, extra={"max_grad_norm": 0})
    trainer = make(world, "sograddiff", tmp_path, settings, hessian_mode="gnb", betas=(0.9, 0.8))
    trainer.create_optimizer()
    model = trainer.model
    data = trainer.train_dataset
    batches = [trainer.data_collator([data[i] for i in idx]) for idx in ([0, 1], [2])]

    def answer_tokens(batch):
        return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batch.values())

    def hand_gradient(batch):
        """∇ of the mean CE of argmax labels over the batch's answer tokens, explicitly."""
        model.zero_grad(set_to_none=True)
        total = 0.0
        for part in batch.values():
            logits = model(input_ids=part["input_ids"], attention_mask=part["attention_mask"])
            logits = logits.logits[:, :-1].float()
            answer = part["labels"][:, 1:] != -100
            labels = logits.detach().argmax(-1)
            nll = torch.nn.functional.cross_entropy(
                logits.transpose(1, 2), labels, reduction="none"
            )
            total = total + (nll * answer).sum()
        (total / answer_tokens(batch)).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        model.zero_grad(set_to_none=True)
        return grads

    counts = [answer_tokens(b) for b in batches]
    assert counts[0] != counts[1]
    expected = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    beta2 = 0.8
    for batch, count in zip(batches, counts, strict=True):
        grads = hand_gradient(batch)
        for n in expected:
            expected[n] = beta2 * expected[n] + (1 - beta2) * count * grads[n] ** 2
        trainer.gauss_newton_bartlett_update(model, batch)
        assert trainer.hessian_tokens == count
    optimizer = trainer.optimizer_for_hessian()
    for n, p in model.named_parameters():
        # summation order differs from the trainer's: entries near 0 get an absolute margin
        atol = 1e-5 * float(expected[n].abs().max())
        torch.testing.assert_close(optimizer.state[p]["hessian"], expected[n], rtol=1e-5, atol=atol)
    assert {g["bs"] for g in optimizer.param_groups} == {1}


def test_gnb_with_a_fixed_sophia_bs_applies_it_at_step_time(world, tmp_path):
    trainer = make(world, "sograddiff", tmp_path, hessian_mode="gnb", sophia_bs=64)
    trainer.create_optimizer()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.gauss_newton_bartlett_update(trainer.model, batch)
    assert {g["bs"] for g in trainer.optimizer_for_hessian().param_groups} == {64}


def registry_optimizer():
    """The class the harness's optimizer registry gets for `handler: SophiaG`."""
    (target,) = [c.target for c in registry.components("optimizer") if c.name == "SophiaG"]
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def test_so_trainers_honour_a_sophia_optimizer_config_and_refuse_others(world, tmp_path):
    trainer = make(world, "sograddiff", tmp_path, hessian_mode="grad2")
    # what the harness's optimizer registry does for `trainer.optimizer: {handler: SophiaG, ...}`
    trainer.get_optimizer_cls_and_kwargs = lambda args, model=None: (
        registry_optimizer(),
        {"lr": 3e-3, "betas": [0.5, 0.6], "rho": 0.2, "weight_decay": 0.25},
    )
    optimizer = trainer.create_optimizer()
    assert type(optimizer) is SophiaG
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["rho"]) == (3e-3, (0.5, 0.6), 0.2)
    assert group["weight_decay"] == 0.25 and group["hessian_mode"] == "grad2"
    assert group["bs"] == 5120
    for cls, kwargs, match in (
        (torch.optim.AdamW, {"lr": 1e-3}, "trainer.optimizer=AdamW cannot be honoured"),
        (SophiaG, {"momentum": 0.9}, "not SophiaG options"),
        (SophiaG, {"hessian_mode": "gnb"}, "method_args.hessian_mode"),
    ):
        other = make(world, "sograddiff", tmp_path / cls.__name__, hessian_mode="grad2")
        other.get_optimizer_cls_and_kwargs = lambda args, model=None, c=cls, k=kwargs: (c, k)
        with pytest.raises(ValueError, match=match):
            other.create_optimizer()


@pytest.mark.parametrize("mode", ["gnb", "grad2"])
def test_so_trainers_pass_their_hessian_mode(world, tmp_path, mode):
    trainer = make(world, "sograddiff", tmp_path, hessian_mode=mode)
    groups = trainer.create_optimizer().param_groups
    assert {g["hessian_mode"] for g in groups} == {mode}


def test_the_registry_optimizer_refreshes_its_hessian_by_default():
    assert registry_optimizer() is SophiaG  # one class, wherever it is reached from
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5))
    optimizer = registry_optimizer()([p], lr=1e-2, betas=(0.9, 0.5))
    p.grad = torch.randn(5)
    optimizer.step()  # no update_hessian() anywhere: the step itself folds grad² in
    torch.testing.assert_close(optimizer.state[p]["hessian"], 0.5 * p.grad**2, rtol=0, atol=0)
    with pytest.raises(ValueError, match="hessian_mode='none'"):
        registry_optimizer()([p], hessian_mode="none")


def test_soul_compat_needs_grad2(world, tmp_path):
    with pytest.raises(ValueError, match="grad2"):
        make(world, "sograddiff", tmp_path, hessian_mode="gnb", soul_compat=True)
    with pytest.raises(ValueError, match="hessian_mode"):
        make(world, "sograddiff", tmp_path, hessian_mode="newton")


def test_sonpo_trains(world, tmp_path):
    trainer = make(world, "sonpo", tmp_path, beta=0.1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.train()
    assert any(
        not torch.equal(a, p) for a, p in zip(before, trainer.model.parameters(), strict=True)
    )


def test_simu_updates_only_critical_columns_and_attention(world, tmp_path):
    model = world[0]
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make(
        world, "simu", tmp_path, threshold=0.3, steps=4, hessian_mode="gnb", hessian_interval=2
    )
    trainer.train()
    masks = trainer.neuron_masks
    assert any(bool(m.any()) for m in masks.values())
    attention = set(attention_projection_names(model))
    moved_attention = 0
    for layer_id, layer in enumerate(decoder_layers(model)):
        weight = down_projection(layer).weight.detach()
        name = f"model.layers.{layer_id}.mlp.down_proj.weight"
        critical = masks[layer_id]
        assert torch.equal(weight[:, ~critical], original[name][:, ~critical])
        if critical.any():
            assert not torch.equal(weight[:, critical], original[name][:, critical])
    for name, p in model.named_parameters():
        if name in attention:
            moved_attention += int(not torch.equal(p.detach(), original[name]))
        elif "down_proj" not in name:
            assert torch.equal(p.detach(), original[name]), name
    assert moved_attention == len(attention)
    saved = load_masks(Path(tmp_path) / "simu_masks.safetensors")
    assert all(torch.equal(saved[k], masks[k]) for k in masks)
    record = json.loads((Path(tmp_path) / "simu_masks.json").read_text())
    assert record["threshold"] == 0.3 and record["mode"] == "dual"
    assert (Path(tmp_path) / "simu_masks.png").stat().st_size > 0


def test_simu_reuses_a_saved_mask(world, tmp_path):
    first = make(world, "simu", tmp_path / "a", threshold=0.5, steps=2)
    reused = make(world, "simu", tmp_path / "b", mask_path=str(tmp_path / "a" / "simu_masks"))
    assert all(
        torch.equal(first.neuron_masks[k], reused.neuron_masks[k]) for k in first.neuron_masks
    )


def test_resume_from_checkpoint_is_identical(world, tmp_path):
    model, tokenizer, forget, retain = world
    initial = {k: v.clone() for k, v in model.state_dict().items()}

    def run(out, resume=None, max_steps=20):
        fresh = LlamaForCausalLM(model.config)
        fresh.load_state_dict(initial)
        settings = RunSettings(
            epochs=4,
            batch_size=1,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="steps",
            save_total_limit=0,  # keep checkpoint-10, resumed below
            extra={"save_steps": 5, "max_steps": max_steps},
        )
        trainer = build_trainer(
            "sograddiff",
            fresh,
            tokenizer,
            forget,
            retain,
            out,
            {"hessian_mode": "gnb", "hessian_interval": 3},
            settings,
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    straight = run(tmp_path / "straight")
    resumed = run(tmp_path / "resumed_src")
    checkpoint = tmp_path / "resumed_src" / "checkpoint-10"
    again = run(tmp_path / "resumed_src", resume=str(checkpoint))
    assert straight.state.global_step == again.state.global_step == 20
    for (name, a), b in zip(
        straight.model.named_parameters(), again.model.parameters(), strict=True
    ):
        assert torch.equal(a.detach(), b.detach()), name
    del resumed
