"""LoRA: the model handler, merged saving, and the zero-copy teacher / reference."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

pytest.importorskip("peft")

from test_asu_trainer import float_bytes, reachable_float_bytes, toy_llama  # noqa: E402

from asu_simu_plugin import lora  # noqa: E402
from asu_simu_plugin.attention import attention_temperature  # noqa: E402
from asu_simu_plugin.models import LoRACausalLM  # noqa: E402
from asu_simu_plugin.runner import RunSettings, build_trainer, run_unlearning  # noqa: E402

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture
def saved_llama(toy_tokenizer, tmp_path):
    path = tmp_path / "base"
    toy_llama(toy_tokenizer).save_pretrained(path)
    return path


@pytest.fixture
def plain_llama(toy_tokenizer, tmp_path):
    """Unpeaked weights: logits of ordinary size, so fp32 rounding stays ordinary too."""
    path = tmp_path / "plain"
    toy_llama(toy_tokenizer, peaked=False).save_pretrained(path)
    return path


@pytest.fixture
def world(toy_authors, toy_tokenizer):
    forget = toy_authors[0].qa_pairs()
    retain = [qa for a in toy_authors[1:3] for qa in a.qa_pairs()]
    return toy_tokenizer, forget, retain


def randomise_adapters(model, seed=0, scale=0.05):
    """LoRA B starts at zero (the adapted model = the base); give it a real effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def batch(tokenizer, texts=("Ada Lind was born in Oslo.", "Who wrote The Fox?")):
    return tokenizer(list(texts), return_tensors="pt", padding=True)


def logits(model, inputs):
    with torch.no_grad():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def lora_trainer(method, saved, world, out, settings=None, model_args=None, **method_args):
    tokenizer, forget, retain = world
    model = LoRACausalLM.from_pretrained(str(saved), **(model_args or {}))
    settings = settings or RunSettings(
        epochs=1, batch_size=5, learning_rate=1e-2, extra={"max_steps": 1, "disable_tqdm": True}
    )
    return build_trainer(method, model, tokenizer, forget, retain, out, method_args, settings)


# -- the handler ---------------------------------------------------------------------------------
def test_handler_defaults_are_the_official_asu_settings(saved_llama):
    model = LoRACausalLM.from_pretrained(str(saved_llama))
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (8, 32, 0.05)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(LINEAR)  # every linear layer, the output head excluded
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base = LlamaForCausalLM.from_pretrained(saved_llama)
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_lora == sum(8 * (m.in_features + m.out_features) for m in _linears(base))


def _linears(model):
    return [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in LINEAR]


def test_handler_settings_are_overridable(saved_llama):
    model = LoRACausalLM.from_pretrained(
        str(saved_llama), lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_target_modules=["q_proj"]
    )
    config = model.peft_config["default"]
    assert (config.r, config.lora_alpha, config.lora_dropout) == (4, 8, 0.0)
    adapted = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lora_save": "both"}, "lora_save"),
        ({"lora_r": 0}, "lora_r"),
        ({"lora_dropout": 1}, "drop"),
    ],
)
def test_bad_settings_are_refused_before_loading(kwargs, message, tmp_path):
    with pytest.raises(ValueError, match=message):  # the path does not exist: never loaded
        LoRACausalLM.from_pretrained(str(tmp_path / "nowhere"), **kwargs)


def test_missing_peft_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # makes `import peft` fail
    with pytest.raises(ImportError, match=r"pip install asu-simu-plugin\[peft\]"):
        LoRACausalLM.from_pretrained("unused")


# -- saving --------------------------------------------------------------------------------------
def test_saved_model_is_plain_and_merged(plain_llama, toy_tokenizer, tmp_path):
    model = LoRACausalLM.from_pretrained(str(plain_llama))
    randomise_adapters(model)
    model.eval()
    inputs = batch(toy_tokenizer)
    adapted = logits(model, inputs)
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items()}
    model.save_pretrained(tmp_path / "out")

    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "adapter_config.json" not in files and "model.safetensors" in files
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(merged) is LlamaForCausalLM
    assert not any("lora" in n or "base_layer" in n for n in merged.state_dict())
    assert (adapted - logits(merged, inputs)).abs().max() < 1e-5
    assert (
        adapted - logits(LlamaForCausalLM.from_pretrained(plain_llama), inputs)
    ).abs().max() > 0.1
    # saving never touches the live model: base weights bit-identical, adapters still on
    for key, value in model.get_base_model().state_dict().items():
        assert torch.equal(value, base_before[key]), key
    assert torch.equal(logits(model, inputs), adapted)
    # the adapter alone is kept beside it, where Trainer resumes a peft model from
    assert json.loads((tmp_path / "out" / "default" / "adapter_config.json").read_text())["r"] == 8


def test_adapter_only_saving(plain_llama, toy_tokenizer, tmp_path):
    model = LoRACausalLM.from_pretrained(str(plain_llama), lora_save="adapter")
    randomise_adapters(model)
    model.eval()
    model.save_pretrained(tmp_path / "out")
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(plain_llama), tmp_path / "out"
    )
    inputs = batch(toy_tokenizer)
    assert (logits(model, inputs) - logits(reloaded.eval(), inputs)).abs().max() < 1e-6


def test_trainer_output_is_the_merged_model(plain_llama, world, tmp_path):
    tokenizer = world[0]
    model = LoRACausalLM.from_pretrained(str(plain_llama))
    settings = RunSettings(
        epochs=1, batch_size=5, learning_rate=1e-2, extra={"max_steps": 2, "disable_tqdm": True}
    )
    run_unlearning("graddiff", model, tokenizer, world[1], world[2], tmp_path / "run", {}, settings)
    inputs = batch(tokenizer)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "run")
    assert (logits(model.eval(), inputs) - logits(merged, inputs)).abs().max() < 1e-5


# -- the zero-copy original ----------------------------------------------------------------------
@pytest.mark.parametrize("retain_loss_type", ["NLL", "KL"])
def test_asu_teacher_is_the_tempered_base_without_a_copy(
    saved_llama, world, tmp_path, retain_loss_type
):
    trainer = lora_trainer(
        "asu", saved_llama, world, tmp_path, temperature=2.0, retain_loss_type=retain_loss_type
    )
    model = trainer.model
    randomise_adapters(model)  # an adapted student: the teacher must ignore its adapters
    assert isinstance(trainer.ref_model, lora.FrozenReference)
    # everything the trainer holds: the base weights and the adapters, once
    assert reachable_float_bytes(trainer) == float_bytes(model)

    inputs = {k: v for k, v in batch(world[0]).items() if k != "token_type_ids"}
    original = LlamaForCausalLM.from_pretrained(saved_llama).eval()
    model.train()  # as during training: the teacher must still run in eval mode, then restore it
    with attention_temperature(original, 2.0):
        tempered = logits(original, inputs)
    assert (trainer.teacher_logits(inputs) - tempered).abs().max() < 1e-6
    assert (trainer.reference_logits(inputs) - logits(original, inputs)).abs().max() < 1e-6
    assert (tempered - logits(original, inputs)).abs().max() > 0.1  # τ does change the teacher
    # the temperature never stays on the shared modules, and the student keeps its adapters
    assert not any(m._forward_hooks for m in model.modules() if "q_proj" in type(m).__name__)
    assert all(m.training for m in model.modules())
    student = model(**inputs).logits
    assert (student - logits(original, inputs)).abs().max() > 0.1

    base_before = {
        k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k
    }
    b_before = {n: p.clone() for n, p in model.named_parameters() if "lora_B" in n}
    trainer.train()
    for key, value in model.get_base_model().state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base_before[key]), key  # the teacher's weights never move
    assert all(
        not torch.equal(p, b_before[n]) for n, p in model.named_parameters() if "lora_B" in n
    )


def test_asu_embedding_variant_on_lora(saved_llama, world, tmp_path):
    trainer = lora_trainer(
        "asu",
        saved_llama,
        world,
        tmp_path,
        temperature=2.0,
        forget_loss_type="EMBED_MSE",
        retain_loss_type="EMBED_MSE",
        embed_layer=1,
    )
    assert reachable_float_bytes(trainer) == float_bytes(trainer.model)
    trainer.train()
    assert all(
        torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h
    )


@pytest.mark.parametrize(
    "method, method_args",
    [
        ("sograddiff", {"retain_loss_type": "KL"}),
        ("sonpo", {}),
        ("npo", {}),
        ("graddiff", {"retain_loss_type": "KL"}),
    ],
)
def test_references_are_the_base_without_a_copy(saved_llama, world, tmp_path, method, method_args):
    trainer = lora_trainer(method, saved_llama, world, tmp_path, **method_args)
    randomise_adapters(trainer.model)
    assert isinstance(trainer.ref_model, lora.FrozenReference)
    assert reachable_float_bytes(trainer) == float_bytes(trainer.model)
    inputs = {k: v for k, v in batch(world[0]).items() if k != "token_type_ids"}
    original = LlamaForCausalLM.from_pretrained(saved_llama).eval()
    assert (logits(trainer.ref_model, inputs) - logits(original, inputs)).abs().max() < 1e-6
    trainer.train()
    assert all(
        torch.isfinite(torch.tensor(h["loss"])) for h in trainer.state.log_history if "loss" in h
    )


@pytest.mark.parametrize("method", ["asu", "graddiff"])
def test_gradient_checkpointing_trains_the_adapters(saved_llama, world, tmp_path, method):
    settings = RunSettings(
        epochs=1,
        batch_size=5,
        learning_rate=1e-2,
        extra={"max_steps": 1, "disable_tqdm": True, "gradient_checkpointing": True},
    )
    trainer = lora_trainer(method, saved_llama, world, tmp_path, settings=settings)
    grads = {}
    handles = [
        p.register_hook(lambda g, n=n: grads.__setitem__(n, g.abs().sum().item()))
        for n, p in trainer.model.named_parameters()
        if "lora_B" in n
    ]
    trainer.train()
    for handle in handles:
        handle.remove()
    assert trainer.model.get_base_model().is_gradient_checkpointing
    b_names = [n for n, _ in trainer.model.named_parameters() if "lora_B" in n]
    assert set(grads) == set(b_names) and all(v > 0 for v in grads.values())


def test_simu_refuses_a_lora_model(saved_llama, world, tmp_path):
    with pytest.raises(ValueError, match="SIMU does not run on a LoRA model"):
        lora_trainer("simu", saved_llama, world, tmp_path, steps=1)
    assert not (tmp_path / "simu_masks.safetensors").exists()  # refused before the attribution


# -- the unmodified harness ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def harness_tiny_model(tmp_path_factory):
    from harness_support import save_tiny_harness_model

    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.harness
@pytest.mark.parametrize(
    "trainer, extra",
    [
        ("GradDiff", []),
        ("NPO", []),
        ("SimNPO", []),
        ("ASU", ["trainer.method_args.teacher_cache=true"]),
        ("SONPO", []),
    ],
)
def test_harness_trains_lora_and_eval_scores_the_merged_model(
    harness_tiny_model, tmp_path, trainer, extra
):
    from harness_support import CPU_TRAIN_OVERRIDES, model_overrides, run_harness
    from safetensors.torch import load_file

    out = tmp_path / trainer
    run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            "experiment=unlearn/tofu/default",
            f"trainer={trainer}",
            *extra,
            f"task_name={trainer}",
            *model_overrides(harness_tiny_model),
            "++model.model_handler=LoRACausalLM",
            "+model.model_args.lora_r=4",
            *CPU_TRAIN_OVERRIDES,
            "trainer.args.learning_rate=1e-2",
            "+trainer.args.max_steps=2",
            f"paths.output_dir={out}",
        ],
    )
    top = {p.name for p in out.iterdir()}
    assert "model.safetensors" in top and "adapter_config.json" not in top
    assert json.loads((out / "default" / "adapter_config.json").read_text())["r"] == 4
    merged = load_file(out / "model.safetensors")
    base = load_file(harness_tiny_model / "model.safetensors")
    assert set(merged) == set(base)  # a plain model: no LoRA or base_layer names
    changed = [k for k in base if not torch.equal(merged[k], base[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted layers

    if trainer != "GradDiff":  # one evaluation shows eval.py takes the output like any model
        return
    evals = tmp_path / f"{trainer}_eval"
    run_harness(
        "eval.py",
        [
            "experiment=eval/tofu/default",
            "forget_split=forget01",
            "holdout_split=holdout01",
            f"task_name={trainer}_eval",
            *model_overrides(out),
            "~model.model_args.attn_implementation",
            "model.model_args.torch_dtype=float32",
            "model.model_args.device_map=cpu",
            f"paths.output_dir={evals}",
            "~eval.tofu.metrics.model_utility",
            "~eval.tofu.metrics.forget_Q_A_ROUGE",
            "~eval.tofu.metrics.privleak",
            "~eval.tofu.metrics.extraction_strength",
        ],
    )
    summary = json.loads((evals / "TOFU_SUMMARY.json").read_text())
    assert 0.0 < summary["forget_Q_A_Prob"] < 1.0


def test_resume_restores_the_adapters_from_a_checkpoint(plain_llama, world, tmp_path):
    tokenizer, forget, retain = world

    def settings(steps):
        extra = {"max_steps": steps, "disable_tqdm": True, "save_steps": 1}
        return RunSettings(
            epochs=1, batch_size=5, learning_rate=1e-2, save_strategy="steps", extra=extra
        )

    first = LoRACausalLM.from_pretrained(str(plain_llama))
    run_unlearning("graddiff", first, tokenizer, forget, retain, tmp_path / "a", {}, settings(1))
    checkpoint = tmp_path / "a" / "checkpoint-1"
    assert (checkpoint / "adapter_model.safetensors").is_file()  # peft's format: Trainer resumes it
    assert not (checkpoint / "model.safetensors").exists()
    assert (tmp_path / "a" / "model.safetensors").is_file()  # the final output: merged
    trained = {n: p.detach().clone() for n, p in first.named_parameters() if "lora_" in n}

    second = LoRACausalLM.from_pretrained(str(plain_llama))
    trainer = build_trainer(
        "graddiff", second, tokenizer, forget, retain, tmp_path / "a", {}, settings(1)
    )
    trainer.train(resume_from_checkpoint=str(checkpoint))  # at max_steps already: loads only
    for name, param in second.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, trained[name]), name
            assert param.requires_grad  # loaded trainable, as it was
