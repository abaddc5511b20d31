"""SOGradDiff / SONPO / SIMU trainers: Sophia wiring, masks, resume, DDP."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM

from asu_simu_plugin import toy
from asu_simu_plugin.arch import attention_projection_names, decoder_layers, down_projection
from asu_simu_plugin.neurons import load_masks
from asu_simu_plugin.runner import RunSettings, build_trainer
from asu_simu_plugin.sophia import SophiaG


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
    assert all(g["bs"] == answer_tokens for g in optimizer.param_groups)


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


def free_port() -> int:
    """A port nobody listens on, so parallel runs of this test do not collide."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


DDP_SCRIPT = textwrap.dedent(
    """
    import hashlib, json, os, sys, torch
    from transformers import LlamaForCausalLM
    from asu_simu_plugin import toy
    from asu_simu_plugin.runner import RunSettings, build_trainer, close_distributed
    out = sys.argv[1]
    authors = toy.make_authors(4)
    tok = toy.build_tokenizer(toy.corpus_texts(authors), vocab_size=600)
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(tok)))
    forget = authors[0].qa_pairs()
    retain = [qa for a in authors[1:] for qa in a.qa_pairs()]
    settings = RunSettings(epochs=1, batch_size=1, learning_rate=1e-3, logging_steps=1,
                           extra={"ddp_backend": "gloo", "max_steps": 3})
    method = sys.argv[2]
    method_args = {"asu": {"temperature": 2.0, "retain_loss_type": "KL"},
                   "simu": {"threshold": 0.3, "steps": 2, "hessian_mode": "gnb",
                            "hessian_interval": 2}}[method]
    trainer = build_trainer(method, model, tok, forget, retain, out, method_args, settings)
    trainer.train()
    rank = int(os.environ["RANK"])
    digest = hashlib.sha256()
    for p in trainer.model.parameters():
        digest.update(p.detach().cpu().numpy().tobytes())
    masks = {k: v.int().tolist() for k, v in getattr(trainer, "neuron_masks", {}).items()}
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"params": digest.hexdigest(), "masks": masks}, f)
    del trainer
    close_distributed()
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["simu", "asu"])
def test_two_process_ddp_gives_identical_masks_and_parameters(tmp_path, method):
    script = tmp_path / "ddp_simu.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            str(script),
            str(tmp_path / "out"),
            method,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["masks"] == ranks[1]["masks"]
    assert ranks[0]["params"] == ranks[1]["params"]


def test_deepspeed_zero_is_refused_for_gnb_and_masks(world, tmp_path, monkeypatch):
    from asu_simu_plugin.methods import sophia

    monkeypatch.setattr(sophia, "deepspeed_zero_stage", lambda trainer: 2)
    with pytest.raises(NotImplementedError, match="ZeRO stage 2"):
        make(world, "sograddiff", tmp_path, hessian_mode="gnb")
    with pytest.raises(NotImplementedError, match="masks"):
        make(world, "simu", tmp_path, hessian_mode="grad2", steps=2)
    make(world, "sograddiff", tmp_path, hessian_mode="grad2")  # no GNB pass, no masks: fine
