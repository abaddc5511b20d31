"""patches/: applies to a clean open-unlearning checkout and makes its registries read entry points.

Everything runs on copies of OPEN_UNLEARNING_SRC (the checkout itself is only read), with the
harness's own Python (HARNESS_PY) in subprocesses. The plugin used is a throwaway distribution
written to tmp_path, so the tests do not depend on what HARNESS_PY has installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from harness_support import CPU_TRAIN_OVERRIDES, model_overrides, save_tiny_harness_model

pytestmark = pytest.mark.harness

PATCHES = sorted((Path(__file__).parent.parent / "patches").glob("*.patch"))
SKIP_NO_CHECKOUT = (
    "set OPEN_UNLEARNING_SRC to an open-unlearning checkout (see README: harness tier)"
)
SKIP_NO_PYTHON = (
    "set HARNESS_PY to a Python with open-unlearning's requirements (see README: harness tier)"
)
# Untracked data the harness reads relative to its working directory (TOFU, MUSE, IdK).
DATA_ENTRIES = ("data", "locuslab", "muse-bench")


def harness_checkout() -> Path:
    """The checkout named by OPEN_UNLEARNING_SRC (the checkout or its src/), else skip."""
    root = os.environ.get("OPEN_UNLEARNING_SRC")
    if not root:
        pytest.skip(SKIP_NO_CHECKOUT)
    path = Path(root).expanduser().resolve()
    checkout = path.parent if (path / "train.py").is_file() else path
    if not (checkout / "src" / "train.py").is_file():
        pytest.fail(
            f"OPEN_UNLEARNING_SRC={root} has no src/train.py; point it at a clone of "
            "locuslab/open-unlearning"
        )
    return checkout


def harness_python() -> str:
    python = os.environ.get("HARNESS_PY")
    if not python:
        pytest.skip(SKIP_NO_PYTHON)
    return python


def clean_copy(checkout: Path, dest: Path) -> Path:
    """The checkout's committed tree (a git clone) or, outside git, a copy of its files."""
    if (checkout / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(checkout), str(dest)], check=True)
    else:
        shutil.copytree(checkout, dest, symlinks=True, ignore=shutil.ignore_patterns("saves*"))
    for name in DATA_ENTRIES:
        if (checkout / name).exists() and not (dest / name).exists():
            (dest / name).symlink_to((checkout / name).resolve())
    return dest


def apply_patches(copy: Path) -> None:
    for patch in PATCHES:
        check = subprocess.run(
            ["git", "apply", "--check", str(patch)], cwd=copy, capture_output=True, text=True
        )
        assert check.returncode == 0, f"{patch.name} does not apply: {check.stderr}"
        subprocess.run(["git", "apply", str(patch)], cwd=copy, check=True)


def git_state(checkout: Path) -> tuple[str, str] | None:
    if not (checkout / ".git").exists():
        return None
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True
    ).stdout
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=checkout, capture_output=True, text=True
    ).stdout
    return head, status


@pytest.fixture(scope="module")
def patched_checkout(tmp_path_factory) -> Path:
    copy = clean_copy(harness_checkout(), tmp_path_factory.mktemp("patched") / "open-unlearning")
    apply_patches(copy)
    return copy


TOY_ENTRY_POINTS = """
[open_unlearning.trainers]
ToyTrainer = toy_ou_plugin:ToyTrainer
ToySelfRegistered = toy_ou_plugin:ToyTrainer
GradDiff = toy_ou_plugin:Impostor
Broken = toy_ou_plugin_missing:Nothing

[open_unlearning.optimizers]
ToyOptimizer = toy_ou_plugin:ToyOptimizer

[open_unlearning.models]
ToyModel = toy_ou_plugin:ToyModel

[open_unlearning.datasets]
ToyDataset = toy_ou_plugin:ToyDataset

[open_unlearning.collators]
ToyCollator = toy_ou_plugin:ToyCollator

[open_unlearning.evaluators]
ToyEvaluator = toy_ou_plugin:ToyEvaluator

[open_unlearning.metrics]
toy_metric = toy_ou_plugin:toy_metric
"""

TOY_MODULE = '''
"""A throwaway open-unlearning plugin."""

import os

import torch

# Harness imports at the top, as real plugins have them: entry points read while `evals` or
# `trainer` were still being imported would find this module half-initialised.
from evals.base import Evaluator
from evals.metrics.base import UnlearningMetric
from trainer import TRAINER_REGISTRY
from trainer.unlearn.grad_diff import GradDiff


class ToyTrainer(GradDiff):
    pass


class ToyOptimizer(torch.optim.SGD):
    def step(self, closure=None):
        if os.environ.get("TOY_OPTIMIZER_LOG"):
            with open(os.environ["TOY_OPTIMIZER_LOG"], "a") as log:
                log.write("step\\n")
        return super().step(closure)


class ToyModel:
    @classmethod
    def from_pretrained(cls, **kwargs):
        model = cls()
        model.kwargs = kwargs
        return model


class ToyDataset:
    def __init__(self, size):
        self.size = size


class ToyCollator:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


class ToyEvaluator(Evaluator):
    def __init__(self, eval_cfg, **kwargs):
        super().__init__("Toy", eval_cfg, **kwargs)


toy_metric = UnlearningMetric(name="toy_metric", metric_fn=lambda model, **kwargs: {})


class Impostor:
    pass


# A plugin may also register itself; its entry point then names the very same object.
TRAINER_REGISTRY["ToySelfRegistered"] = ToyTrainer
'''


def write_toy_plugin(site: Path) -> Path:
    """A distribution found by importlib.metadata once `site` is on PYTHONPATH."""
    info = site / "toy_ou_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-ou-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(TOY_ENTRY_POINTS)
    (site / "toy_ou_plugin.py").write_text(TOY_MODULE)
    return site


def harness_env(site: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "OPEN_UNLEARNING_SRC"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def run_in_harness(checkout: Path, code: str, site: Path | None, *argv: str) -> dict:
    """Run `code` with HARNESS_PY in `<checkout>/src`; return its `RESULT {json}` line + stderr."""
    result = subprocess.run(
        [harness_python(), "-c", textwrap.dedent(code), *argv],
        cwd=checkout / "src",
        env=harness_env(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT ") :]), "stderr": result.stderr}


def test_there_is_a_patch():
    assert PATCHES, "patches/ holds no .patch file"


def test_every_patch_applies_to_a_clean_copy_and_the_checkout_is_untouched(tmp_path):
    checkout = harness_checkout()
    before = git_state(checkout)
    copy = clean_copy(checkout, tmp_path / "open-unlearning")
    apply_patches(copy)
    assert (copy / "src" / "plugins.py").is_file()
    assert git_state(checkout) == before


REGISTRY_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
import torch
from omegaconf import OmegaConf
# the imports of src/train.py, in its order
from data import get_data, get_collators
from model import get_model
from trainer import load_trainer
from evals import get_evaluators
import data, model, trainer, evals.metrics

out_dir = sys.argv[1]
at_import = sorted(trainer.TRAINER_REGISTRY) + sorted(trainer.OPTIMIZER_REGISTRY)

model.get_tokenizer = lambda cfg: "toy-tokenizer"  # ToyModel needs none
toy_model, _ = get_model(OmegaConf.create({
    "model_handler": "ToyModel",
    "model_args": {"pretrained_model_name_or_path": "toy-path", "torch_dtype": "float32"},
    "tokenizer_args": {},
}))
dataset = data.get_datasets(OmegaConf.create({"forget": {"handler": "ToyDataset",
                                                         "args": {"size": 3}}}))
collator = get_collators(OmegaConf.create({"c": {"handler": "ToyCollator", "args": {"pad": 1}}}))
evaluators = get_evaluators(OmegaConf.create({"toy": {
    "handler": "ToyEvaluator", "output_dir": out_dir,
    "metrics": {"forget_toy": {"handler": "toy_metric"}},
}}))

def net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))

args = {"output_dir": out_dir, "learning_rate": 0.5, "weight_decay": 0.1, "report_to": "none",
        "use_cpu": True}
cfg = OmegaConf.create({"handler": "ToyTrainer", "args": args, "optimizer": {
    "handler": "ToyOptimizer", "args": {"momentum": 0.9, "weight_decay": 0.25}}})
toy_trainer, trainer_args = load_trainer(cfg, net())
toy_trainer.create_optimizer_and_scheduler(num_training_steps=10)
optimizer = toy_trainer.optimizer
groups = [[g["lr"], g["weight_decay"], g["momentum"], len(g["params"])]
          for g in optimizer.param_groups]

default_trainer, _ = load_trainer(OmegaConf.create({"handler": "GradDiff", "args": args}), net())
default_trainer.create_optimizer()
try:
    load_trainer(OmegaConf.create({"handler": "GradDiff", "args": args,
                                   "optimizer": {"handler": "NoSuchOptimizer"}}), net())
    unknown = None
except NotImplementedError as error:
    unknown = str(error)

registry = trainer.TRAINER_REGISTRY
print("RESULT " + json.dumps({
    "at_import": at_import,
    "model": [type(toy_model).__name__, toy_model.kwargs["pretrained_model_name_or_path"]],
    "dataset": [type(dataset).__name__, dataset.size],
    "collator": [type(collator).__name__, collator.kwargs],
    "evaluator": [type(evaluators["toy"]).__name__,
                  {k: v.name for k, v in evaluators["toy"].metrics.items()}],
    "trainer": type(toy_trainer).__name__,
    "optimizer": type(optimizer).__name__,
    "groups": groups,
    "trainer_weight_decay": trainer_args.weight_decay,
    "scheduler_bound": toy_trainer.lr_scheduler.optimizer is optimizer,
    "default_optimizer": type(default_trainer.optimizer).__name__,
    "default_overridden": "get_optimizer_cls_and_kwargs" in vars(default_trainer),
    "unknown": unknown,
    "graddiff": registry["GradDiff"].__module__,
    "self_registered": registry["ToySelfRegistered"] is registry["ToyTrainer"],
    "broken": "Broken" in registry,
}))
"""


def test_registries_load_plugins_at_lookup_time(patched_checkout, tmp_path):
    site = write_toy_plugin(tmp_path / "site")
    out = run_in_harness(patched_checkout, REGISTRY_SCRIPT, site, str(tmp_path / "out"))
    # nothing is read at import time, so plugins may import the harness at their top
    assert not {"ToyTrainer", "ToyOptimizer"} & set(out["at_import"])
    assert out["model"] == ["ToyModel", "toy-path"]
    assert out["dataset"] == ["ToyDataset", 3]
    assert out["collator"] == ["ToyCollator", {"pad": 1}]
    assert out["evaluator"] == ["ToyEvaluator", {"forget_toy": "toy_metric"}]
    assert out["trainer"] == "ToyTrainer"
    # HF's create_optimizer built it: lr from trainer.args, weight decay from optimizer.args on
    # the Linear weight only (its bias and both LayerNorm parameters get none)
    assert out["optimizer"] == "ToyOptimizer"
    assert out["groups"] == [[0.5, 0.25, 0.9, 1], [0.5, 0.0, 0.9, 3]]
    assert out["trainer_weight_decay"] == 0.25
    assert out["scheduler_bound"] is True
    # without `optimizer` in the trainer config, nothing changes
    assert out["default_overridden"] is False
    assert out["default_optimizer"] == "AdamW"
    assert "NoSuchOptimizer" in out["unknown"] and "'ToyOptimizer'" in out["unknown"]
    # the built-in wins; the shadowing attempt is reported once, however many lookups
    assert out["graddiff"] == "trainer.unlearn.grad_diff"
    stderr = out["stderr"]
    assert stderr.count("'GradDiff' (toy_ou_plugin:Impostor) skipped") == 1, stderr[-3000:]
    # a plugin that fails to import is reported and the rest still loads
    assert out["broken"] is False
    assert "could not load 'Broken' (toy_ou_plugin_missing:Nothing)" in stderr
    assert "ModuleNotFoundError" in stderr
    # the same object under the same name (self-registration) is silent
    assert out["self_registered"] is True
    assert "ToySelfRegistered" not in stderr


@pytest.mark.slow
def test_patched_train_py_runs_a_plugin_trainer_with_a_plugin_optimizer(patched_checkout, tmp_path):
    harness_python()
    site = write_toy_plugin(tmp_path / "site")
    model_dir = save_tiny_harness_model(tmp_path / "model")
    run_dir = tmp_path / "run"
    steps_log = tmp_path / "optimizer_steps.txt"
    result = subprocess.run(
        [
            harness_python(),
            "src/train.py",
            "--config-name=unlearn.yaml",
            "experiment=unlearn/tofu/default",
            "trainer=GradDiff",
            "trainer.handler=ToyTrainer",
            "+trainer.optimizer.handler=ToyOptimizer",
            "+trainer.optimizer.args.momentum=0.9",
            f"task_name={run_dir.name}",
            *model_overrides(model_dir),
            *CPU_TRAIN_OVERRIDES,
            "+trainer.args.max_steps=2",
            f"paths.output_dir={run_dir}",
        ],
        cwd=patched_checkout,
        env=harness_env(site, TOY_OPTIMIZER_LOG=str(steps_log)),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert json.loads((run_dir / "trainer_state.json").read_text())["global_step"] == 2
    assert steps_log.read_text().splitlines() == ["step", "step"]


INSTALLED_SCRIPT = """
import json, logging
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from importlib.metadata import entry_points
import model, trainer
from plugins import load_entry_points
ours = {ep.name: ep.value for kind in ("trainers", "optimizers", "models")
        for ep in entry_points(group="open_unlearning." + kind)
        if ep.value.startswith("asu_simu_plugin.")}
load_entry_points("trainers", trainer.TRAINER_REGISTRY)
load_entry_points("optimizers", trainer.OPTIMIZER_REGISTRY)
load_entry_points("models", model.MODEL_REGISTRY)
registries = {**trainer.TRAINER_REGISTRY, **trainer.OPTIMIZER_REGISTRY, **model.MODEL_REGISTRY}
found = {name: registries[name].__module__ + ":" + name for name in ours if name in registries}
from asu_simu_plugin import harness
print("RESULT " + json.dumps({"ours": ours, "found": found, "again": harness.register()}))
"""


def test_installed_asu_simu_plugin_registers_through_entry_points(patched_checkout):
    out = run_in_harness(patched_checkout, INSTALLED_SCRIPT, None)
    if not out["ours"]:
        pytest.skip("asu-simu-plugin is not installed in HARNESS_PY (pip install it there)")
    assert out["found"] == out["ours"]
    # its Hydra-plugin registration, run after the entry points, finds everything in place
    assert out["again"] == []
    assert "skipped" not in out["stderr"], out["stderr"][-3000:]
