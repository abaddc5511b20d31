"""Our trainers on a harness base laid out like open-unlearning after its transformers-4.51.3
change (its PR #175): `UnlearnTrainer.compute_loss(model, inputs, **kwargs)` sends training
batches to `compute_unlearn_loss(model, inputs, return_outputs=False, num_items_in_batch=None)`
and evaluation batches to transformers' own loss.

The stand-in bases below have that layout and the GradDiff / NPO losses of our standalone bases,
so a trainer built on them (the recipe of `asu_simu_plugin.harness`) must train bit-identically
to the standalone one, and a `num_items_in_batch` given to it must reach the base.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import TRANSFORMERS_VERSION
from packaging import version
from transformers import LlamaForCausalLM, Trainer

from asu_simu_plugin import losses, runner, toy
from asu_simu_plugin.methods.base import TrainerCompatMixin, model_inputs
from asu_simu_plugin.registry import build_trainer_class
from asu_simu_plugin.runner import RunSettings, build_trainer, standalone_methods

# transformers' compute_loss takes num_items_in_batch from 4.46 on
PASSES_NUM_ITEMS = TRANSFORMERS_VERSION >= version.parse("4.46")


class NewLayoutUnlearnTrainer(Trainer):
    """The newer harness base: dispatch in compute_loss, the method's loss in
    compute_unlearn_loss (which records the num_items_in_batch it was given)."""

    def __init__(
        self,
        *args,
        gamma=1.0,
        alpha=1.0,
        retain_loss_type="NLL",
        evaluators=None,
        template_args=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.args.remove_unused_columns = False  # keep the nested forget / retain batches
        self.gamma, self.alpha, self.retain_loss_type = gamma, alpha, retain_loss_type
        self.evaluators, self.template_args = evaluators, template_args
        self.ref_model = None
        self.num_items_seen = []

    def _prepare_ref_model(self, model):
        ref_model = copy.deepcopy(model).to(self.accelerator.device).eval()
        ref_model.requires_grad_(False)
        return ref_model

    def compute_loss(self, model, inputs, **kwargs):
        if model.training:
            return self.compute_unlearn_loss(model, inputs, **kwargs)
        return super().compute_loss(model, inputs, **kwargs)

    def compute_unlearn_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self.num_items_seen.append(num_items_in_batch)
        forget_outputs = model(**model_inputs(inputs["forget"]))
        loss = self.gamma * self.forget_loss(model, forget_outputs, inputs["forget"])
        loss = loss + self.alpha * model(**model_inputs(inputs["retain"])).loss
        return (loss, forget_outputs) if return_outputs else loss


class NewLayoutGradDiff(NewLayoutUnlearnTrainer):
    def forget_loss(self, model, outputs, forget):
        return -outputs.loss


class NewLayoutNPO(NewLayoutUnlearnTrainer):
    def __init__(self, *args, beta=1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.beta = beta
        self.ref_model = self._prepare_ref_model(self.model)

    def forget_loss(self, model, outputs, forget):
        with torch.no_grad():
            ref_logits = self.ref_model(**model_inputs(forget, False)).logits
        return losses.npo_loss(outputs.logits, ref_logits, forget["labels"], self.beta)


NEW_LAYOUT_BASES = {"GradDiff": NewLayoutGradDiff, "NPO": NewLayoutNPO}
METHOD_ARGS = {
    "asu": {"temperature": 2.0, "gamma": 0.5},
    "sograddiff": {"hessian_mode": "grad2"},
    "sonpo": {"hessian_mode": "grad2"},
}


def new_layout_class(method: str) -> type:
    """The class `asu_simu_plugin.harness` would build, on the stand-in base."""
    name = standalone_methods()[method]
    return build_trainer_class(name, NEW_LAYOUT_BASES, __name__, front=(TrainerCompatMixin,))


def build(toy_authors, toy_tokenizer, tmp_path, method, monkeypatch=None):
    if monkeypatch is not None:
        monkeypatch.setattr(runner, "trainer_class", new_layout_class)
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(toy_tokenizer)))
    forget = toy_authors[0].qa_pairs()
    retain = [qa for a in toy_authors[1:3] for qa in a.qa_pairs()]
    settings = RunSettings(
        epochs=1, batch_size=2, learning_rate=1e-3, logging_steps=1, extra={"max_steps": 2}
    )
    trainer = build_trainer(
        method, model, toy_tokenizer, forget, retain, tmp_path, METHOD_ARGS[method], settings
    )
    return trainer


def train(*args, **kwargs):
    trainer = build(*args, **kwargs)
    trainer.train()
    return trainer


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_trainers_on_the_newer_base_train_like_on_the_standalone_one(
    toy_authors, toy_tokenizer, tmp_path, monkeypatch, method
):
    reference = train(toy_authors, toy_tokenizer, tmp_path / "old", method)
    trainer = train(toy_authors, toy_tokenizer, tmp_path / "new", method, monkeypatch)
    assert isinstance(trainer, NewLayoutUnlearnTrainer) and trainer.state.global_step == 2
    assert not isinstance(reference, NewLayoutUnlearnTrainer)
    old, new = reference.model.state_dict(), trainer.model.state_dict()
    assert old.keys() == new.keys()
    assert [k for k in old if not torch.equal(old[k], new[k])] == []
    # ASU computes its own loss on training batches; the SO trainers use the base's
    assert len(trainer.num_items_seen) == (0 if method == "asu" else 2)


@pytest.mark.parametrize("method", ["sograddiff", "sonpo"])
def test_num_items_in_batch_reaches_the_base(
    toy_authors, toy_tokenizer, tmp_path, monkeypatch, method
):
    trainer = build(toy_authors, toy_tokenizer, tmp_path, method, monkeypatch)
    batch = trainer.data_collator([trainer.train_dataset[0]])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch, num_items_in_batch=7)
    assert trainer.num_items_seen[-1] == 7


@pytest.mark.skipif(
    not PASSES_NUM_ITEMS,
    reason="the newer harness layout needs transformers >= 4.46 (it pins 4.51.3)",
)
def test_evaluation_batches_reach_the_plain_language_model_loss(
    toy_authors, toy_tokenizer, tmp_path, monkeypatch
):
    trainer = build(toy_authors, toy_tokenizer, tmp_path, "asu", monkeypatch)
    batch = trainer.data_collator([trainer.train_dataset[0]])["retain"]
    model = trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(model, model_inputs(batch))
        expected = model(**model_inputs(batch)).loss
    assert torch.equal(loss, expected)
