"""Method-argument dataclasses: the one place of each method's defaults and checks."""

from __future__ import annotations

import math

import pytest

from asu_simu_plugin.arguments import MethodArgumentError, NPOArguments
from asu_simu_plugin.methods.asu import ASUArguments
from asu_simu_plugin.methods.simu import SIMUArguments
from asu_simu_plugin.methods.sophia import SOGradDiffArguments, SONPOArguments
from asu_simu_plugin.registry import get_method


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (ASUArguments, {"layers": ["1"]}, "layers entry must be an integer"),
        (ASUArguments, {"layers": [1.0]}, "layers entry must be an integer"),
        (ASUArguments, {"layers": [True]}, "layers entry must be an integer"),
        (ASUArguments, {"layers": [-1]}, "layers entry must be >= 0"),
        (ASUArguments, {"layers": []}, "list of 0-based layer ids"),
        (ASUArguments, {"layers": "0,1"}, "list of 0-based layer ids"),
        (ASUArguments, {"temperature": math.nan}, "temperature must be a finite number"),
        (ASUArguments, {"temperature": 0}, "temperature must be > 0"),
        (ASUArguments, {"temperature": True}, "temperature must be a finite number"),
        (ASUArguments, {"temperature": "hot"}, "temperature must be a finite number"),
        (ASUArguments, {"alpha": math.nan}, "alpha must be a finite number"),
        (ASUArguments, {"gamma": -0.1}, "gamma must be >= 0"),
        (ASUArguments, {"gamma": math.inf}, "gamma must be a finite number"),
        (ASUArguments, {"retain_loss_type": "MSE"}, "use one of NLL, KL, KL_ALL, EMBED_MSE"),
        (ASUArguments, {"forget_loss_type": "NLL"}, "use one of KL, EMBED_MSE"),
        (ASUArguments, {"embed_layer": 2.5}, "embed_layer must be an integer"),
        (ASUArguments, {"trainable_params_regex": ["("]}, "not a valid regex"),
        (
            ASUArguments,
            {"teacher_eos": "drop"},
            "teacher_eos='drop' is not supported; use one of keep, suppress",
        ),
        (ASUArguments, {"tau_sweep": {"sampel": 4}}, "known keys: sample"),
        (ASUArguments, {"collapse_guard": {"sample": 0}}, "collapse_guard.sample must be"),
        (ASUArguments, {"teacher_cache": 1}, "teacher_cache must be true or false"),
        (ASUArguments, {"teacher_cache_dtype": "int8"}, "use one of float16"),
        (
            ASUArguments,
            {"teacher_cache": True, "forget_loss_type": "EMBED_MSE"},
            "teacher_cache needs forget_loss_type KL",
        ),
        (SOGradDiffArguments, {"betas": [0.9]}, "two numbers"),
        (SOGradDiffArguments, {"betas": [0.9, 1.0]}, "< 1"),
        (SOGradDiffArguments, {"rho": 0}, "rho must be > 0"),
        (SOGradDiffArguments, {"hessian_interval": 0}, "hessian_interval must be >= 1"),
        (SOGradDiffArguments, {"hessian_interval": "10"}, "must be an integer"),
        (SOGradDiffArguments, {"soul_compat": "yes"}, "true or false"),
        (SOGradDiffArguments, {"soul_compat": True}, "grad2"),
        (SOGradDiffArguments, {"sophia_bs": 0}, "sophia_bs must be >= 1"),
        (SIMUArguments, {"steps": 0}, "steps must be >= 1"),
        (SIMUArguments, {"threshold": 0}, r"threshold must be in \(0, 1\), got 0:"),
        (SIMUArguments, {"threshold": 1}, r"threshold must be in \(0, 1\), got 1 \(a neuron"),
        (SIMUArguments, {"mode": "both"}, "use one of dual, forget_only"),
        (SIMUArguments, {"mask_path": "/nonexistent/masks.safetensors"}, "is not a file"),
        (SIMUArguments, {"attribution_batch_size": 0}, ">= 1"),
    ],
)
def test_bad_values_are_refused_with_the_argument_named(cls, values, message):
    with pytest.raises(MethodArgumentError, match=message):
        cls(**values)


def test_accepted_values():
    assert ASUArguments(temperature="auto", layers="auto").layers == "auto"
    assert ASUArguments(temperature=3, layers=[0, 2], trainable_params_regex="a.*").temperature == 3
    assert (
        SOGradDiffArguments(betas=(0.9, 0.95), soul_compat=True, hessian_mode="grad2").rho == 0.04
    )


def test_unknown_keys_list_the_valid_ones():
    with pytest.raises(MethodArgumentError) as error:
        ASUArguments.from_values({"temprature": 2.0, "gamma": 0.1}, "ASU")
    message = str(error.value)
    assert message.startswith("unknown method argument temprature for ASU; valid: alpha, ")
    assert "temperature" in message and "layers" in message


def test_omegaconf_values_become_plain_ones():
    """The harness passes `method_args` as OmegaConf containers: lists and dicts are checked as
    the CLI's JSON values are."""
    from omegaconf import OmegaConf

    values = OmegaConf.create({"betas": [0.9, 0.95], "hessian_mode": "grad2"})
    parsed = SOGradDiffArguments.from_values(values)
    assert parsed.betas == [0.9, 0.95] and isinstance(parsed.betas, list)
    # as the harness passes them: keywords whose values are OmegaConf containers
    keywords = {"betas": OmegaConf.create([0.9, 0.95]), "tau_sweep": None}
    assert SOGradDiffArguments.from_values({"betas": keywords["betas"]}).betas == [0.9, 0.95]
    guard = OmegaConf.create({"collapse_guard": {"sample": 0}})
    with pytest.raises(MethodArgumentError, match="collapse_guard.sample must be"):
        ASUArguments.from_values(guard)


@pytest.mark.parametrize(
    "cls, values, message",
    [
        (NPOArguments, {"beta": 0}, "beta must be > 0"),
        (SONPOArguments, {"beta": -0.5}, "beta must be > 0"),
        (SOGradDiffArguments, {"alpha": -1}, "alpha must be >= 0"),
        (SOGradDiffArguments, {"gamma": -2}, "gamma must be >= 0"),
        (SOGradDiffArguments, {"hessian_interval": "abc"}, "hessian_interval must be an integer"),
        (ASUArguments, {"alpha": -1}, "alpha must be >= 0"),
    ],
)
def test_values_the_harness_route_once_accepted_are_refused(cls, values, message):
    with pytest.raises(MethodArgumentError, match=message):
        cls(**values)


def test_layer_ids_are_checked_against_the_model_config():
    class Config:
        num_hidden_layers = 4

    ASUArguments(layers=[0, 3]).check_model_config(Config())
    with pytest.raises(MethodArgumentError, match="no layer 4 in this model, which has 4"):
        ASUArguments(layers=[1, 4]).check_model_config(Config())
    with pytest.raises(MethodArgumentError, match="embed_layer: no layer 7"):
        ASUArguments(forget_loss_type="EMBED_MSE", temperature=2.0).check_model_config(Config())


def test_kl_means_answer_tokens_for_every_method():
    for name in ("ASU", "GradDiff", "NPO", "SOGradDiff", "SONPO", "SIMU"):
        choices = get_method(name).arguments.RETAIN_LOSS_TYPES
        assert {"NLL", "KL", "KL_ALL"} <= set(choices), name
