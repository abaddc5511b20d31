"""Our trainers through the harness's own multi-process route: `accelerate launch` of its
`src/train.py` with a DeepSpeed config (its ZeRO-3 JSON with bf16 off; ZeRO-2), 2 CPU processes.

Needs the harness tier's OPEN_UNLEARNING_SRC and HARNESS_PY (whose venv has deepspeed).
"""

from __future__ import annotations

import json
import subprocess

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    model_overrides,
    save_tiny_harness_model,
)

from .distributed_support import accelerate_config, free_port, numactl_available, quiet_env

pytestmark = [pytest.mark.distributed, pytest.mark.harness]

RUNS = {
    "ASU": ("asu", []),
    "SOGradDiff-grad2": ("sograddiff", ["trainer.method_args.hessian_mode=grad2"]),
    "SOGradDiff-gnb": ("sograddiff", ["trainer.method_args.hessian_mode=gnb"]),
    "SONPO-grad2": ("sonpo", ["trainer.method_args.hessian_mode=grad2"]),
    "SONPO-gnb": ("sonpo", ["trainer.method_args.hessian_mode=gnb"]),
    "SIMU": ("simu", ["trainer.method_args.steps=2"]),
}
# the CI tier: the harness's own stage (3), each trainer once and both Hessian modes; the other
# cases (ZeRO-2, the remaining mode of each Sophia trainer) are marked slow
TIER = ("ASU", "SOGradDiff-gnb", "SONPO-grad2", "SIMU")
CASES = [pytest.param(name, 3, marks=[] if name in TIER else pytest.mark.slow) for name in RUNS]
CASES += [pytest.param(name, 2, marks=pytest.mark.slow) for name in RUNS]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    harness_paths()
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.mark.parametrize(("name", "stage"), CASES)
def test_trains_and_saves_under_zero(tiny_model, tmp_path, name, stage):
    if stage == 3 and not numactl_available():
        pytest.skip("DeepSpeed ZeRO-3 on CPU needs numactl (apt-get install numactl)")
    checkout, python = harness_paths()
    experiment, extra = RUNS[name]
    out = tmp_path / name
    overrides = [
        "--config-name=unlearn.yaml",
        f"experiment=unlearn/tofu/{experiment}",
        f"task_name={out.name}",
        *model_overrides(tiny_model),
        *[o for o in CPU_TRAIN_OVERRIDES if "per_device_train_batch_size" not in o],
        "trainer.args.per_device_train_batch_size=1",
        "trainer.method_args.hessian_interval=1" if "gnb" in name else "trainer.args.seed=0",
        *extra,
        "+trainer.args.max_steps=2",
        f"paths.output_dir={out}",
    ]
    command = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_config(stage, tmp_path)),
        "--main_process_port",
        str(free_port()),
        str(checkout / "src" / "train.py"),
        *overrides,
    ]
    env = quiet_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    result = subprocess.run(
        command, cwd=checkout, env=env, capture_output=True, text=True, timeout=900
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    assert f"{name.split('-')[0]} Trainer loaded" in log
    assert (out / "model.safetensors").is_file()
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    if name == "SIMU":
        assert (out / "simu_masks.safetensors").is_file()
