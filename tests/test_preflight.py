"""The harness-route check of our method arguments, before the harness loads a model."""

from __future__ import annotations

import types

import pytest
from omegaconf import OmegaConf

from asu_simu_plugin.arguments import MethodArgumentError
from asu_simu_plugin.preflight import check_config, install


def harness_script(loaded: list):
    """A stand-in for the harness's src/train.py: `main(cfg)` calls `get_model(cfg.model)`."""
    script = types.ModuleType("fake_train")

    def get_model(model_cfg):
        loaded.append(model_cfg)
        return "model", "tokenizer"

    def main(cfg):
        return script.get_model(cfg.model)

    script.get_model, script.main = get_model, main
    return script


def config(handler, model_path="unused", **method_args):
    return OmegaConf.create(
        {
            "trainer": {"handler": handler, "method_args": method_args},
            "model": {"model_args": {"pretrained_model_name_or_path": model_path}},
        }
    )


def test_bad_values_stop_before_get_model_and_good_ones_pass():
    loaded = []
    script = harness_script(loaded)
    assert install(script) and not install(script)  # wraps once
    with pytest.raises(MethodArgumentError, match="gamma must be >= 0"):
        script.main(config("ASU", gamma=-1))
    with pytest.raises(MethodArgumentError, match=r"betas must be two numbers"):
        script.main(config("SOGradDiff", betas=[0.9]))
    assert loaded == []
    assert script.main(config("ASU", temperature=2.0, layers=[0, 1])) == ("model", "tokenizer")
    assert script.main(config("GradDiff", gamma=-1)) == ("model", "tokenizer")  # the harness's
    assert len(loaded) == 2


def test_layer_ids_are_checked_against_a_local_model_config(tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(num_hidden_layers=3).save_pretrained(tmp_path)
    check_config(config("ASU", str(tmp_path), layers=[0, 2]))
    with pytest.raises(MethodArgumentError, match="no layer 3 in this model, which has 3"):
        check_config(config("ASU", str(tmp_path), layers=[3]))
