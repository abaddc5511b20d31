"""The registry is the one list of methods: entry points, shipped configs, CLI and trainer
classes all derive from it, and a method's argument dataclass is its trainers' input."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
import yaml
from transformers import LlamaForCausalLM

from asu_simu_plugin import registry, standalone, toy
from asu_simu_plugin.arguments import MethodArgumentError
from asu_simu_plugin.methods.asu import ASUArguments
from asu_simu_plugin.runner import RunSettings, build_trainer, standalone_methods

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "trainer"

# Values a shipped config sets on purpose instead of the dataclass default (published settings).
CONFIG_CHOICES = {
    # the paper's TOFU forget weight; tau and layers chosen on the forget set (the paper's are
    # temperature=2.3 layers=null, the dataclass defaults)
    "ASU": {"gamma": 0.1, "temperature": "auto", "layers": "auto"},
    "SOGradDiff": {"alpha": 2.0, "betas": [0.9, 0.95], "hessian_mode": "grad2"},  # SOUL
    "SONPO": {"beta": 0.1, "betas": [0.9, 0.95], "hessian_mode": "grad2"},  # SOUL
}


def entry_points(group: str) -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project["entry-points"][group]


def test_entry_points_are_the_registry():
    offered = {m.name: f"asu_simu_plugin.harness:{m.name}" for m in registry.harness_methods()}
    assert entry_points("open_unlearning.trainers") == offered
    for kind, group in (("optimizer", "optimizers"), ("model", "models"), ("dataset", "datasets")):
        listed = {c.name: c.target for c in registry.components(kind)}
        assert entry_points(f"open_unlearning.{group}") == listed


def test_shipped_trainer_configs_are_the_registry():
    shipped = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert shipped == {m.config for m in registry.methods().values() if m.config}
    for method in registry.methods().values():
        if method.config is None:
            continue
        config = yaml.safe_load((CONFIGS / f"{method.config}.yaml").read_text())
        assert config["handler"] == method.name
        # it extends its base's harness config (or a method that does, as SIMU's)
        parent = config["defaults"][0]
        assert parent == method.base or registry.get_method(parent).base == method.base


@pytest.mark.parametrize("name", [m.name for m in registry.harness_methods()])
def test_shipped_config_matches_the_dataclass(name):
    method = registry.get_method(name)
    config = yaml.safe_load((CONFIGS / f"{method.config}.yaml").read_text())
    values = config.get("method_args") or {}
    parsed = method.arguments.from_values(values, name)  # every value valid, no unknown key
    defaults = method.arguments.defaults()
    chosen = CONFIG_CHOICES.get(name, {})
    for key, value in values.items():
        expected = chosen.get(key, defaults[key])
        assert [value] == [list(expected) if isinstance(expected, tuple) else expected], (
            f"configs/trainer/{name}.yaml: {key}={value!r}, the dataclass default is "
            f"{defaults[key]!r}; change both, or list it in CONFIG_CHOICES with its reason"
        )
    assert parsed.to_dict().keys() == defaults.keys()


def test_cli_choices_and_standalone_classes_are_the_registry():
    names = list(registry.methods())
    assert sorted(standalone_methods().values()) == sorted(names)
    assert {"ASU", "SIMU", "GradDiff", "NPO"} <= set(names)
    for name in names:
        trainer = getattr(standalone, name)
        assert trainer.__name__ == name and trainer.unlearning_method is registry.get_method(name)
        assert getattr(standalone, name) is trainer  # one class object per name


def test_register_method_refuses_a_dataclass_without_the_base_arguments():
    with pytest.raises(ValueError, match="must extend NPO's arguments"):
        registry.register_method("Broken", arguments=ASUArguments, base="NPO")


@pytest.fixture
def toy_setup(toy_authors, toy_tokenizer, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(toy.tiny_llama_config(len(toy_tokenizer)))
    forget = toy_authors[0].qa_pairs()[:2]
    retain = [qa for a in toy_authors[1:2] for qa in a.qa_pairs()][:2]
    return model, toy_tokenizer, forget, retain, tmp_path


def test_keywords_and_dataclass_build_the_same_trainer(toy_setup):
    model, tokenizer, forget, retain, tmp_path = toy_setup
    settings = RunSettings(epochs=1, batch_size=2)
    values = {"temperature": 3.0, "gamma": 0.5, "retain_loss_type": "KL", "collapse_guard": False}
    by_dict = build_trainer("asu", model, tokenizer, forget, retain, tmp_path, values, settings)
    given = ASUArguments(**values)
    by_class = build_trainer("asu", model, tokenizer, forget, retain, tmp_path, given, settings)
    assert by_class.method_args is given
    assert by_dict.method_args == given
    for trainer in (by_dict, by_class):
        # the base's arguments come from the dataclass; the mixin reads the rest from it
        assert (trainer.gamma, trainer.alpha, trainer.retain_loss_type) == (0.5, 1.0, "KL")
        assert trainer.temperature == 3.0


def test_bad_and_unknown_keywords_are_refused_before_any_model_work(toy_setup, monkeypatch):
    model, tokenizer, forget, retain, tmp_path = toy_setup

    def no_copy(*args, **kwargs):
        raise AssertionError("the frozen copy was built before the arguments were checked")

    monkeypatch.setattr(standalone.StandaloneGradDiff, "_prepare_ref_model", no_copy)
    settings = RunSettings(epochs=1, batch_size=2)
    for values, message in (
        ({"gamma": -1}, "gamma must be >= 0"),
        ({"layers": []}, "layers must be a list of 0-based layer ids"),
        ({"temprature": 2}, "unknown method argument temprature for ASU"),
    ):
        with pytest.raises(MethodArgumentError, match=message):
            build_trainer("asu", model, tokenizer, forget, retain, tmp_path, values, settings)
