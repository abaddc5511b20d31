"""The ASU trainer (standalone base): one frozen copy, exact loss, forgetting, clean output."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from asu_simu_plugin import losses, toy
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.cli.demo import finetune
from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.diagnostics import answer_probability
from asu_simu_plugin.runner import RUN_FILE, RunSettings, build_trainer, run_unlearning


@pytest.fixture
def world(toy_authors, toy_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(toy_tokenizer)))
    with torch.no_grad():  # peaked attention, so the temperature matters
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4)
            layer.self_attn.k_proj.weight.mul_(4)
    forget = toy_authors[0].qa_pairs()
    retain = [qa for a in toy_authors[1:4] for qa in a.qa_pairs()]
    return model, toy_tokenizer, forget, retain


def asu(world, out, settings=None, **method_args):
    model, tokenizer, forget, retain = world
    settings = settings or RunSettings(epochs=1, batch_size=5, learning_rate=1e-3)
    return build_trainer("asu", model, tokenizer, forget, retain, out, method_args, settings)


def modules_held(trainer):
    return {id(m) for m in vars(trainer).values() if isinstance(m, torch.nn.Module)}


@pytest.mark.parametrize(
    "args",
    [
        {"retain_loss_type": "NLL"},
        {"retain_loss_type": "KL"},
        {"retain_loss_type": "KL_ALL"},
        {"forget_loss_type": "EMBED_MSE", "retain_loss_type": "EMBED_MSE", "embed_layer": 1},
    ],
)
def test_one_frozen_copy_serves_teacher_and_reference(world, tmp_path, args):
    trainer = asu(world, tmp_path, **args)
    n = sum(p.numel() for p in trainer.model.parameters())
    held = {
        id(p): p.numel()
        for m in vars(trainer).values()
        if isinstance(m, torch.nn.Module)
        for p in m.parameters()
    }
    assert sum(held.values()) == 2 * n  # the student and exactly one copy
    assert trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    assert not trainer.ref_model.training
    student_hooks = sum(len(m._forward_hooks) for m in trainer.model.modules())
    teacher_hooks = sum(len(m._forward_hooks) for m in trainer.ref_model.modules())
    assert student_hooks == 0 and teacher_hooks == len(trainer.layers)
    assert len(modules_held(trainer)) == 2


@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_loss_equals_a_hand_recomputation(world, tmp_path, retain_loss_type):
    original = copy.deepcopy(world[0])
    trainer = asu(
        world, tmp_path, temperature=3.0, gamma=0.7, alpha=1.3, retain_loss_type=retain_loss_type
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    loss = trainer.compute_loss(trainer.model, batch)
    forget, retain = batch["forget"], batch["retain"]

    def run(model, inputs):
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits

    with torch.no_grad(), attention_temperature(original, 3.0):
        teacher = run(original, forget)
    student = run(trainer.model, forget)
    expected = 0.7 * losses.asu_distillation_loss(student, teacher, forget["labels"])
    if retain_loss_type == "NLL":
        expected = expected + 1.3 * trainer.model(**retain).loss
    else:
        with torch.no_grad():
            reference = run(original, retain)
        expected = expected + 1.3 * losses.retain_kl_loss(
            run(trainer.model, retain), reference, retain["labels"]
        )
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # an evaluation batch (no forget/retain split) gets the plain LM loss
    plain = trainer.compute_loss(trainer.model, dict(forget))
    assert float(plain) == pytest.approx(float(trainer.model(**forget).loss), rel=1e-6)


def test_asu_steps_lower_the_kl_and_forget_probability(world, tmp_path):
    model, tokenizer, forget, retain = world
    finetune(model, tokenizer, forget + retain, epochs=30, lr=3e-3, seed=0)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = copy.deepcopy(model).eval()
    pad = tokenizer.pad_token_id
    forget_set = QADataset(forget, tokenizer)
    batch = PadCollator(pad)(list(forget_set))
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}

    def distillation_kl(student):
        with torch.no_grad(), attention_temperature(teacher, 30.0):
            teacher_logits = teacher(**inputs).logits
        with torch.no_grad():
            return float(
                losses.asu_distillation_loss(
                    student(**inputs).logits, teacher_logits, batch["labels"]
                )
            )

    kl_before = distillation_kl(model.eval())
    before = answer_probability(model, forget_set, pad)
    with attention_temperature(teacher, 30.0):
        teacher_probability = answer_probability(teacher, forget_set, pad)
    assert teacher_probability < before - 0.01  # the smoothed teacher knows less
    settings = RunSettings(epochs=10, batch_size=5, learning_rate=2e-3, logging_steps=1)
    trainer = run_unlearning(
        "asu",
        model,
        tokenizer,
        forget,
        retain,
        tmp_path,
        {"temperature": 30.0, "gamma": 1.0, "alpha": 0.0},
        settings,
    )
    student = trainer.model.eval()
    assert distillation_kl(student) < 0.75 * kl_before
    after = answer_probability(student, forget_set, pad)
    assert after < before - 0.01
    assert abs(after - teacher_probability) < abs(before - teacher_probability)
    for name, value in trainer.ref_model.state_dict().items():  # the teacher never trained
        assert torch.equal(value, original[name]), name


def test_saved_model_is_a_plain_transformers_model(world, tmp_path):
    trainer = asu(world, tmp_path / "run", temperature=2.0)
    trainer.train()
    trainer.save_model(str(tmp_path / "saved"))
    keys = set(load_file(str(tmp_path / "saved" / "model.safetensors")))
    assert keys <= set(world[0].state_dict())  # tied/buffer keys aside, nothing of ours
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.randint(4, 500, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, trainer.model.eval()(ids).logits)
    assert sum(len(m._forward_hooks) for m in loaded.modules()) == 0


def test_layers_and_bad_arguments(world, tmp_path):
    assert asu(world, tmp_path, layers=[1]).teacher_temperature.layers == [1]
    with pytest.raises(ValueError, match="valid ids"):
        asu(world, tmp_path, layers=[9])
    with pytest.raises(ValueError, match="finite number > 0"):
        asu(world, tmp_path, temperature=0)
    with pytest.raises(ValueError, match="forget_loss_type"):
        asu(world, tmp_path, forget_loss_type="GA")
    with pytest.raises(ValueError, match="retain_loss_type"):
        asu(world, tmp_path, retain_loss_type="DPO")


def test_embedding_variant_trains_only_the_selected_parameters(world, tmp_path):
    original = {n: p.detach().clone() for n, p in world[0].named_parameters()}
    target = "model.layers.1.mlp.down_proj.weight"
    trainer = asu(
        world,
        tmp_path,
        forget_loss_type="EMBED_MSE",
        retain_loss_type="EMBED_MSE",
        embed_layer=1,
        temperature=100.0,
        trainable_params_regex=[r"model\.layers\.1\.mlp\.down_proj\.weight"],
        settings=RunSettings(epochs=1, batch_size=2, learning_rate=1e-2),
    )
    trainer.train()
    for name, p in trainer.model.named_parameters():
        if name == target:
            assert not torch.equal(p.detach(), original[name])
        else:
            assert torch.equal(p.detach(), original[name]), name


def test_run_record(world, tmp_path):
    model, tokenizer, forget, retain = world
    run_unlearning(
        "asu",
        model,
        tokenizer,
        forget,
        retain,
        tmp_path,
        {"temperature": 2.5},
        RunSettings(epochs=1, batch_size=5, logging_steps=1),
    )
    record = json.loads((tmp_path / RUN_FILE).read_text())
    assert record["method_args"] == {"temperature": 2.5}
    assert any("asu/forget_loss" in h for h in record["log_history"])
