"""Method-argument dataclasses: they match the live trainers and configs, and refuse bad values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from asu_simu_plugin import standalone
from asu_simu_plugin.methods import METHODS
from asu_simu_plugin.methods.arguments import (
    METHOD_ARGUMENTS,
    ASUArguments,
    MethodArgumentError,
    SIMUArguments,
    SOGradDiffArguments,
    parse_method_arguments,
    signature_defaults,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "trainer"
STANDALONE = [*METHODS, "StandaloneGradDiff", "StandaloneNPO"]

# Values a shipped config sets on purpose instead of the Python default (published settings).
CONFIG_CHOICES = {
    # the paper's TOFU forget weight; tau and layers chosen on the forget set (the paper's are
    # temperature=2.3 layers=null, the constructor's defaults)
    "ASU": {"gamma": 0.1, "temperature": "auto", "layers": "auto"},
    "SOGradDiff": {"alpha": 2.0, "betas": [0.9, 0.95], "hessian_mode": "grad2"},  # SOUL
    "SONPO": {"beta": 0.1, "betas": [0.9, 0.95], "hessian_mode": "grad2"},  # SOUL
}


def normalise(value):
    return list(value) if isinstance(value, tuple) else value


@pytest.mark.parametrize("name", STANDALONE)
def test_dataclass_matches_the_live_constructor(name):
    live = {k: normalise(v) for k, v in signature_defaults(getattr(standalone, name)).items()}
    declared = {k: normalise(v) for k, v in METHOD_ARGUMENTS[name].defaults().items()}
    missing = sorted(set(live) - set(declared))
    assert not missing, (
        f"{name} takes {missing}, which asu_simu_plugin/methods/arguments.py does not declare: "
        "add a field (default, help, check) to the dataclass of the mixin that takes it"
    )
    stale = sorted(set(declared) - set(live))
    assert not stale, (
        f"{METHOD_ARGUMENTS[name].__name__} declares {stale}, which {name} no longer takes"
    )
    differing = {k: (declared[k], live[k]) for k in live if declared[k] != live[k]}
    assert not differing, f"defaults differ (dataclass, constructor): {differing}"


@pytest.mark.parametrize("name", list(METHODS))
def test_shipped_config_matches_the_dataclass(name):
    config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
    values = config.get("method_args") or {}
    defaults = {k: normalise(v) for k, v in METHOD_ARGUMENTS[name].defaults().items()}
    unknown = sorted(set(values) - set(defaults))
    assert not unknown, f"configs/trainer/{name}.yaml sets {unknown}, unknown to {name}"
    chosen = CONFIG_CHOICES.get(name, {})
    for key, value in values.items():
        expected = chosen.get(key, defaults[key])
        assert normalise(value) == expected, (
            f"configs/trainer/{name}.yaml: {key}={value!r}, the dataclass default is "
            f"{defaults[key]!r}; change both, or list it in CONFIG_CHOICES with its reason"
        )
    # every value the config sets is valid
    METHOD_ARGUMENTS[name](**values)


def test_defaults_are_valid():
    for cls in set(METHOD_ARGUMENTS.values()):
        cls()


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
        (ASUArguments, {"teacher_eos": "drop"}, "teacher_eos must be one of keep, suppress"),
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
        (SIMUArguments, {"threshold": 0}, "threshold must be > 0"),
        (SIMUArguments, {"threshold": 1.5}, "threshold must be <= 1"),
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
        parse_method_arguments("ASU", {"temprature": 2.0, "gamma": 0.1})
    message = str(error.value)
    assert message.startswith("unknown method argument temprature for ASU; valid: alpha, ")
    assert "temperature" in message and "layers" in message
    # keys a trainer takes that have no field yet pass unchecked
    assert parse_method_arguments("ASU", {"new_key": 1}, accepted=["new_key"]).gamma == 1.0
