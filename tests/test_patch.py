"""patches/: applies to the harness, and makes it load plugins through entry points alone."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    harness_paths,
    model_overrides,
    save_tiny_harness_model,
)

pytestmark = pytest.mark.harness

PATCHES = sorted((Path(__file__).parent.parent / "patches").glob("*.patch"))


@pytest.fixture(scope="module")
def patched_checkout(tmp_path_factory):
    """A copy of the user's checkout (never the checkout itself) with every patch applied."""
    checkout, _ = harness_paths()
    copy = tmp_path_factory.mktemp("patched") / "open-unlearning"
    shutil.copytree(checkout, copy, symlinks=True, ignore=shutil.ignore_patterns(".git", "saves"))
    for patch in PATCHES:
        check = subprocess.run(
            ["git", "apply", "--check", str(patch)], cwd=copy, capture_output=True, text=True
        )
        assert check.returncode == 0, f"{patch.name} does not apply: {check.stderr}"
        subprocess.run(["git", "apply", str(patch)], cwd=copy, check=True)
    return copy


def test_there_is_a_patch():
    assert PATCHES, "patches/ holds no .patch file"


def run_python(checkout: Path, code: str, extra_path: str | None = None) -> dict:
    _, python = harness_paths()
    env = {k: v for k, v in os.environ.items() if k != "OPEN_UNLEARNING_SRC"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [extra_path, env.get("PYTHONPATH")]))
    result = subprocess.run(
        [python, "-c", textwrap.dedent(code)],
        cwd=checkout / "src",
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT ") :]), "stderr": result.stderr}


def test_our_classes_register_through_entry_points_alone(patched_checkout):
    out = run_python(
        patched_checkout,
        """
        import json, trainer, model
        from asu_simu_plugin import harness
        names = ["ASU", "SIMU", "SOGradDiff", "SONPO"]
        found = {n: trainer.TRAINER_REGISTRY[n].__module__ for n in names}
        optimizer = trainer.OPTIMIZER_REGISTRY["SophiaG"].__module__
        handler = model.MODEL_REGISTRY["TemperedCausalLM"].__module__
        # the Hydra plugin's registration path, run after the entry points: harmless
        again = harness.register()
        print("RESULT " + json.dumps({"found": found, "optimizer": optimizer,
                                      "handler": handler, "again": again}))
    """,
    )
    assert set(out["found"].values()) == {"asu_simu_plugin.harness"}
    assert out["optimizer"] == "asu_simu_plugin.sophia"
    assert out["handler"] == "asu_simu_plugin.models"
    assert out["again"] == []


def test_shadowing_and_broken_plugins_are_skipped(patched_checkout, tmp_path):
    site = tmp_path / "site"
    info = site / "toy_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        textwrap.dedent("""
        [open_unlearning.trainers]
        GradDiff = toy_plugin:Impostor
        Broken = toy_plugin_missing:Nothing
        [open_unlearning.optimizers]
        ToyOptimizer = toy_plugin:ToyOptimizer
    """)
    )
    (site / "toy_plugin.py").write_text(
        textwrap.dedent("""
        import torch
        class Impostor: pass
        class ToyOptimizer(torch.optim.SGD): pass
    """)
    )
    out = run_python(
        patched_checkout,
        """
        import json, logging
        logging.basicConfig(level=logging.WARNING)
        import torch, trainer
        from omegaconf import OmegaConf
        from transformers import TrainingArguments
        graddiff = trainer.TRAINER_REGISTRY["GradDiff"].__module__
        model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.LayerNorm(3))
        args = TrainingArguments(output_dir="unused", learning_rate=0.5, weight_decay=0.1,
                                 report_to=[], use_cpu=True)
        cfg = OmegaConf.create({"handler": "ToyOptimizer", "args": {"momentum": 0.9}})
        optimizer = trainer.load_optimizer(cfg, model, args)
        groups = [(g["lr"], g["weight_decay"], g["momentum"], len(g["params"]))
                  for g in optimizer.param_groups]
        print("RESULT " + json.dumps({"graddiff": graddiff, "broken": "Broken" in
              trainer.TRAINER_REGISTRY, "optimizer": type(optimizer).__name__,
              "groups": groups}))
    """,
        extra_path=str(site),
    )
    assert out["graddiff"] == "trainer.unlearn.grad_diff"  # the built-in wins
    assert "GradDiff" in out["stderr"] and "ignored" in out["stderr"]
    assert out["broken"] is False and "could not load 'Broken'" in out["stderr"]
    assert out["optimizer"] == "ToyOptimizer"
    # 2-D weight decays; bias and LayerNorm (1-D) do not
    assert out["groups"] == [[0.5, 0.1, 0.9, 1], [0.5, 0.0, 0.9, 3]]


def test_patched_harness_trains_with_an_optimizer_from_the_registry(patched_checkout, tmp_path):
    _, python = harness_paths()
    model_dir = save_tiny_harness_model(tmp_path / "model")
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "OPEN_UNLEARNING_SRC"}
    result = subprocess.run(
        [
            python,
            "src/train.py",
            "--config-name=unlearn.yaml",
            "experiment=unlearn/tofu/default",
            "trainer=GradDiff",
            "+trainer.optimizer.handler=SophiaG",
            "+trainer.optimizer.args.rho=0.04",
            f"task_name={out.name}",
            *model_overrides(model_dir),
            *CPU_TRAIN_OVERRIDES,
            "+trainer.args.max_steps=2",
            f"paths.output_dir={out}",
        ],
        cwd=patched_checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
