"""Through the real harness: a diverging run of our trainer fails and saves no model."""

from __future__ import annotations

import os
import subprocess

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    model_overrides,
    save_tiny_harness_model,
)

pytestmark = pytest.mark.harness


def test_diverging_harness_run_fails_and_saves_no_model(tmp_path):
    checkout, python = harness_paths()
    model = save_tiny_harness_model(tmp_path / "model")
    # a NaN in the final norm: every loss is NaN from the first step (a NaN method argument is
    # refused before the model loads, tests/test_harness_arguments.py)
    poison = (
        "import sys; from safetensors.torch import load_file, save_file; p = sys.argv[1]; "
        "sd = load_file(p); sd['model.norm.weight'][0] = float('nan'); "
        "save_file(sd, p, metadata={'format': 'pt'})"
    )
    subprocess.run([python, "-c", poison, str(model / "model.safetensors")], check=True)
    out = tmp_path / "run"
    result = subprocess.run(
        [
            python,
            str(checkout / "src" / "train.py"),
            "--config-name=unlearn.yaml",
            "experiment=unlearn/tofu/default",
            "trainer=SOGradDiff",
            "task_name=diverge",
            *model_overrides(model),
            *CPU_TRAIN_OVERRIDES,
            "+trainer.args.max_steps=2",
            f"paths.output_dir={out}",
        ],
        cwd=checkout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=900,
    )
    log = result.stdout + result.stderr
    assert result.returncode != 0, log[-3000:]
    assert "NonFiniteTrainingError: training diverged at optimizer step 1: the loss is nan" in log
    assert not list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
