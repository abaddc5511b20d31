"""Safety rails of every trainer: non-finite training stops, checkpoints are read weights-only."""

from __future__ import annotations

import math
import os

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaForCausalLM

from asu_simu_plugin import standalone, toy
from asu_simu_plugin.guards import NonFiniteTrainingError, UnsafeCheckpointError
from asu_simu_plugin.runner import RunSettings, build_trainer

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def rows(toy_authors):
    return toy_authors[0].qa_pairs(), [qa for a in toy_authors[1:3] for qa in a.qa_pairs()]


def trainer_for(rows, tokenizer, out, method="graddiff", steps=3, save_steps=0, **method_args):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tokenizer)))
    extra = {"max_steps": steps, "disable_tqdm": True}
    if save_steps:
        extra["save_steps"] = save_steps
    settings = RunSettings(
        epochs=1,
        batch_size=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="steps" if save_steps else "no",
        extra=extra,
    )
    forget, retain = rows
    return build_trainer(method, model, tokenizer, forget, retain, out, method_args, settings)


def weights(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("method", ["graddiff", "asu", "sograddiff"])
def test_nan_method_argument_stops_at_step_one_naming_loss_and_fix(
    rows, toy_tokenizer, tmp_path, method
):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path, method)
    trainer.alpha = math.nan  # a NaN retain weight: the dataclass refuses it as an argument
    before = weights(trainer)
    with pytest.raises(NonFiniteTrainingError) as error:
        trainer.train()
    message = str(error.value)
    assert "optimizer step 1" in message and "loss is nan" in message
    assert "lower the learning rate (now 0.001)" in message
    # stopped before the optimizer step: the weights are the original ones, bit for bit
    assert all(torch.equal(p, before[n]) for n, p in weights(trainer).items())
    assert not trainer.args.logging_nan_inf_filter  # a NaN loss is never logged as 0.0
    assert not any(tmp_path.iterdir())  # nothing saved


def test_divergence_keeps_the_last_good_checkpoint(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path, steps=4, save_steps=1)
    compute_loss = trainer.compute_loss

    def diverge_at_step_three(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        return loss * math.inf if trainer.state.global_step == 2 else loss

    trainer.compute_loss = diverge_at_step_three
    with pytest.raises(NonFiniteTrainingError, match="step 3: the loss is -?inf") as error:
        trainer.train()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == [
        "checkpoint-1",
        "checkpoint-2",
    ]
    assert f"last good checkpoint is {tmp_path / 'checkpoint-2'}" in str(error.value)
    saved = load_file(tmp_path / "checkpoint-2" / "model.safetensors")
    assert all(bool(torch.isfinite(t).all()) for t in saved.values())
    assert not (tmp_path / "model.safetensors").exists()


def test_nonfinite_gradient_with_finite_loss_stops_before_the_step(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path)
    target = trainer.model.model.layers[1].mlp.up_proj.weight
    target.register_hook(lambda grad: grad * math.nan)
    before = weights(trainer)
    with pytest.raises(NonFiniteTrainingError, match=r"step 1: gradients of .* are non-finite"):
        trainer.train()
    assert all(torch.equal(p, before[n]) for n, p in weights(trainer).items())


def test_infinite_learning_rate_is_caught_at_the_next_step(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path)
    trainer.args.learning_rate = math.inf
    with pytest.raises(NonFiniteTrainingError, match="step 2: the loss is nan"):
        trainer.train()
    assert not any(tmp_path.iterdir())


def test_nonfinite_weights_are_never_checkpointed(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path, save_steps=1)
    trainer.args.learning_rate = math.inf
    with pytest.raises(NonFiniteTrainingError, match="step 1: the optimizer step made"):
        trainer.train()
    assert not any(tmp_path.iterdir())


def test_save_model_refuses_nonfinite_weights(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path / "run")
    with torch.no_grad():
        trainer.model.model.norm.weight[0] = math.nan
    with pytest.raises(NonFiniteTrainingError, match="model.norm.weight"):
        trainer.save_model(str(tmp_path / "saved"))
    assert not (tmp_path / "saved").exists()


def test_float16_weights_diverging_name_bf16_as_the_fix(rows, toy_tokenizer, tmp_path):
    trainer = trainer_for(rows, toy_tokenizer, tmp_path)
    trainer.model.half()
    trainer.args.learning_rate = 1e5
    with pytest.raises(NonFiniteTrainingError, match="instead of float16"):
        trainer.train()


# -- resuming never unpickles --------------------------------------------------------------------
class Payload:
    """Unpickling this creates `path`: proof that code from the checkpoint ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("planted", ["rng_state.pth", "optimizer.pt", "scheduler.pt"])
def test_resume_never_runs_a_planted_pickle(rows, toy_tokenizer, tmp_path, planted, monkeypatch):
    # The variable makes torch.load unpickle freely wherever weights_only is not passed.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    trainer_for(rows, toy_tokenizer, tmp_path, steps=2, save_steps=1).train()
    checkpoint = tmp_path / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save({"state": Payload(marker)}, checkpoint / planted)
    resumed = trainer_for(rows, toy_tokenizer, tmp_path, steps=2, save_steps=1)
    with pytest.raises(UnsafeCheckpointError, match=planted) as refused:
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()
    message = str(refused.value)  # one line, naming what was refused (not how to allow it)
    assert "\n" not in message
    assert message.endswith(
        "Detail: WeightsUnpickler error: Unsupported global: GLOBAL io.open was not an allowed "
        "global by default."
    )


def test_resume_from_an_honest_checkpoint_restores_rng_and_continues(
    rows, toy_tokenizer, tmp_path, monkeypatch
):
    # The variable makes torch.load unpickle freely wherever weights_only is not passed.
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    full = trainer_for(rows, toy_tokenizer, tmp_path / "full", steps=3)
    full.train()
    first = trainer_for(rows, toy_tokenizer, tmp_path / "part", steps=3, save_steps=2)
    first.train()
    resumed = trainer_for(rows, toy_tokenizer, tmp_path / "part", steps=3, save_steps=2)
    loads = []
    original = torch.load

    def spy(*args, **kwargs):
        loads.append((os.path.basename(str(args[0])), kwargs.get("weights_only")))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    resumed.train(resume_from_checkpoint=str(tmp_path / "part" / "checkpoint-2"))
    names = {name for name, _ in loads}
    assert {"optimizer.pt", "scheduler.pt", "rng_state.pth"} <= names
    assert all(weights_only is True for _, weights_only in loads)
    assert resumed.state.global_step == 3
    for name, param in full.model.named_parameters():
        torch.testing.assert_close(dict(resumed.model.named_parameters())[name], param)


def test_standalone_classes_carry_the_guard():
    from asu_simu_plugin.guards import NonFiniteGuardMixin

    for name in ("ASU", "SIMU", "SOGradDiff", "SONPO", "StandaloneGradDiff", "StandaloneNPO"):
        assert issubclass(getattr(standalone, name), NonFiniteGuardMixin), name


def test_logged_loss_shows_nan_not_zero(rows, toy_tokenizer, tmp_path):
    from asu_simu_plugin.guards import _NonFiniteCallback

    trainer = trainer_for(rows, toy_tokenizer, tmp_path, steps=2)
    trainer.alpha = math.nan
    trainer.remove_callback(_NonFiniteCallback)  # let it run on, to see what is logged
    trainer.train()
    logged = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isnan(v) for v in logged)  # transformers' filter: 0.0
