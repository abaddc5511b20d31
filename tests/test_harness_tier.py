"""The real harness (`src/train.py`, `src/eval.py`) running our trainers and handlers on TOFU."""

from __future__ import annotations

import json

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    model_overrides,
    run_harness,
    save_tiny_harness_model,
)

pytestmark = pytest.mark.harness

EVAL_SUBSET = [  # the cheap TOFU metrics; the rest need generation over many sets
    "~eval.tofu.metrics.model_utility",
    "~eval.tofu.metrics.forget_Q_A_ROUGE",
    "~eval.tofu.metrics.privleak",
    "~eval.tofu.metrics.extraction_strength",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


def train(tiny_model, out, *overrides, steps=2):
    return run_harness(
        "train.py",
        [
            "--config-name=unlearn.yaml",
            *overrides,
            f"task_name={out.name}",
            *model_overrides(tiny_model),
            *CPU_TRAIN_OVERRIDES,
            f"+trainer.args.max_steps={steps}",
            f"paths.output_dir={out}",
        ],
    )


def evaluate(model_dir, out, *overrides):
    run_harness(
        "eval.py",
        [
            "experiment=eval/tofu/default",
            *overrides,
            "forget_split=forget01",
            "holdout_split=holdout01",
            f"task_name={out.name}",
            *model_overrides(model_dir),
            "~model.model_args.attn_implementation",
            "model.model_args.torch_dtype=float32",
            "model.model_args.device_map=cpu",
            f"paths.output_dir={out}",
            *EVAL_SUBSET,
        ],
    )
    return json.loads((out / "TOFU_SUMMARY.json").read_text())


def test_asu_experiment_trains_and_eval_scores_it(tiny_model, tmp_path):
    out = tmp_path / "asu"
    result = train(tiny_model, out, "experiment=unlearn/tofu/asu")
    log = result.stdout + result.stderr
    assert "ASU Trainer loaded" in log
    assert (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    summary = evaluate(out, tmp_path / "asu_eval")
    assert 0.0 < summary["forget_Q_A_Prob"] < 1.0


def test_our_trainer_on_the_harness_default_experiment(tiny_model, tmp_path):
    out = tmp_path / "asu_kl"
    train(
        tiny_model,
        out,
        "experiment=unlearn/tofu/default",
        "trainer=ASU",
        "trainer.method_args.retain_loss_type=KL",
    )
    assert (out / "model.safetensors").is_file()


def test_teacher_handler_scores_the_tempered_model(tiny_model, tmp_path):
    plain = evaluate(tiny_model, tmp_path / "plain")
    tempered = evaluate(
        tiny_model,
        tmp_path / "teacher",
        "experiment=eval/tofu/asu_teacher",
        "model.model_args.temperature=50.0",
    )
    assert tempered["forget_Q_A_Prob"] != pytest.approx(plain["forget_Q_A_Prob"], rel=1e-6)


@pytest.mark.parametrize("trainer", ["SOGradDiff", "SONPO", "SIMU"])
def test_second_order_trainers_train(tiny_model, tmp_path, trainer):
    out = tmp_path / trainer
    extra = ["trainer.method_args.steps=2"] if trainer == "SIMU" else []
    train(
        tiny_model,
        out,
        f"experiment=unlearn/tofu/{trainer.lower()}",
        "trainer.method_args.hessian_mode=gnb",
        "trainer.method_args.hessian_interval=1",
        *extra,
    )
    assert (out / "model.safetensors").is_file()
    if trainer == "SIMU":
        record = json.loads((out / "simu_masks.json").read_text())
        assert record["steps"] == 2 and record["critical_total"] > 0
        assert (out / "simu_masks.safetensors").is_file() and (out / "simu_masks.png").is_file()


def test_smollm2_model_config_composes_with_the_harness_finetune_experiment():
    """configs/model/SmolLM2-135M-Instruct.yaml (ChatML tags) is visible to the harness."""
    result = run_harness(
        "train.py",
        ["experiment=finetune/tofu/default", "model=SmolLM2-135M-Instruct", "--cfg", "job"],
        timeout=300,
    )
    assert "HuggingFaceTB/SmolLM2-135M-Instruct" in result.stdout
    assert "asst_start_tag: '<|im_start|>assistant" in result.stdout
