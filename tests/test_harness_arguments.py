"""Bad method arguments through the harness's `src/train.py`: refused with the CLI's one-line
messages before the model loads (the model folder here has a config and no weights, so a run that
got as far as loading it would fail differently)."""

from __future__ import annotations

import json
import os
import subprocess

import pytest
from harness_support import CPU_TRAIN_OVERRIDES, harness_paths

pytestmark = pytest.mark.harness

# One harness start each (~15 s): a sample of the CLI's bad-value cases (tests/test_cli_arguments.py
# checks every message on the dataclasses, which both routes build).
CASES = [
    ("ASU", "gamma=-1", "gamma must be >= 0 (got -1)"),
    ("ASU", "layers=[5]", "layers: no layer 5 in this model, which has 2 decoder layers"),
    ("SOGradDiff", "alpha=-1", "alpha must be >= 0 (got -1)"),
    ("SONPO", "beta=0", "beta must be > 0 (got 0)"),
    ("SONPO", "hessian_interval=abc", "hessian_interval must be an integer (got 'abc')"),
    ("SIMU", "attribution_batch_size=0", "attribution_batch_size must be >= 1 (got 0)"),
    ("ASU", "+temprature=2", "unknown method argument temprature for ASU; valid: alpha, "),
]


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory):
    """A model folder with a 2-layer Llama config and nothing else."""
    folder = tmp_path_factory.mktemp("weightless")
    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 600,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("trainer, setting, message", CASES)
def test_bad_method_arguments_stop_before_the_model_loads(
    weightless_model, tmp_path, trainer, setting, message
):
    checkout, python = harness_paths()
    args = [
        "--config-name=unlearn.yaml",
        "experiment=unlearn/tofu/default",
        f"trainer={trainer}",
        # "+key=value" adds a key the trainer config does not have
        f"+trainer.method_args.{setting[1:]}"
        if setting[0] == "+"
        else f"trainer.method_args.{setting}",
        "model=Llama-3.2-1B-Instruct",
        f"model.model_args.pretrained_model_name_or_path={weightless_model}",
        f"model.tokenizer_args.pretrained_model_name_or_path={weightless_model}",
        *CPU_TRAIN_OVERRIDES,
        f"paths.output_dir={tmp_path / 'out'}",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [python, str(checkout / "src" / "train.py"), *args],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"MethodArgumentError: {message}" in output, output[-3000:]
    assert not list(tmp_path.rglob("*.safetensors"))
