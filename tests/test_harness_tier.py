"""The real harness (`src/train.py`, `src/eval.py`) running our trainers and handlers on TOFU."""

from __future__ import annotations

import json
import subprocess

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    install_into_fresh_venv,
    model_overrides,
    run_harness,
    save_tiny_harness_model,
    venv_without_us,
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


def train(tiny_model, out, *overrides, steps=2, **run_options):
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
        **run_options,
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
    # The shipped config picks tau and layers on the forget set and saves the sweep beside it.
    chosen = json.loads((out / "asu_temperature.json").read_text())
    assert chosen["searched"] == ["temperature", "layers"] and chosen["temperature"] > 1
    assert (out / "asu_tau_sweep.csv").is_file() and (out / "asu_tau_sweep.png").is_file()


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


WHERE_SCRIPT = """
import json, asu_simu_plugin, hydra_plugins.asu_simu_plugin_searchpath as plugin
from hydra.core.plugins import Plugins
from hydra.plugins.search_path_plugin import SearchPathPlugin
found = [p.__name__ for p in Plugins.instance().discover(SearchPathPlugin)]
print(json.dumps({"package": asu_simu_plugin.__file__, "plugin": plugin.__file__, "found": found}))
"""


def test_a_venv_without_us_does_not_find_trainer_asu(tmp_path):
    """The control for the install tests: the throwaway venv sees the harness's packages only."""
    checkout, _ = harness_paths()
    python = venv_without_us(tmp_path / "venv")
    result = subprocess.run(
        [python, "src/train.py", "--config-name=unlearn.yaml", "trainer=ASU", "--cfg", "job"],
        cwd=checkout,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Could not find 'trainer/ASU'" in result.stderr, result.stderr[-3000:]


@pytest.mark.parametrize("editable", [False, True], ids=["pip-install", "pip-install-e"])
def test_trainer_asu_runs_after_plain_and_editable_install(tiny_model, tmp_path, editable):
    """`pip install .` and `pip install -e .` (setuptools' default editable mode) both let
    Hydra's plugin scan find our SearchPathPlugin, so `trainer=ASU` composes and trains."""
    python = install_into_fresh_venv(tmp_path, editable)
    where = json.loads(
        subprocess.check_output([python, "-c", WHERE_SCRIPT], cwd=tmp_path, text=True)
    )
    source = str(tmp_path / "source")
    # editable: imported from the sources; plain: from the venv's site-packages
    assert where["package"].startswith(source) is editable
    assert where["plugin"].startswith(source) is editable
    assert "AsuSimuSearchPathPlugin" in where["found"]
    out = tmp_path / "asu"
    result = train(tiny_model, out, "experiment=unlearn/tofu/default", "trainer=ASU", python=python)
    assert "ASU Trainer loaded" in result.stdout + result.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
    assert (out / "model.safetensors").is_file()
