"""patches/: four commits for open-unlearning, checked on a clean copy of a real checkout.

0001 makes the registries read entry points, 0002 adds an optimizer registry, 0003 adds
community/methods/ASU and SIMU. Everything runs on copies of OPEN_UNLEARNING_SRC (the checkout
itself is only read), with the harness's own Python (HARNESS_PY) in subprocesses. Most tests use
a throwaway plugin distribution written to tmp_path, so they do not depend on what HARNESS_PY has
installed; the last ones run this package through its entry points alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest
from harness_support import (
    CPU_TRAIN_OVERRIDES,
    install_into_fresh_venv,
    model_overrides,
    run_harness,
    save_tiny_harness_model,
    venv_without_us,
)

pytestmark = pytest.mark.harness

PATCHES = sorted((Path(__file__).parent.parent / "patches").glob("*.patch"))
GIT_IDENTITY = ["-c", "user.name=patch-test", "-c", "user.email=patch-test@localhost"]
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
    """The checkout's committed tree (a git clone) or, outside git, a copy of its files as one
    commit (so that `git am` can apply the patches)."""
    if (checkout / ".git").exists():
        subprocess.run(["git", "clone", "--quiet", str(checkout), str(dest)], check=True)
    else:
        shutil.copytree(checkout, dest, symlinks=True, ignore=shutil.ignore_patterns("saves*"))
        for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "checkout"]):
            subprocess.run(["git", *GIT_IDENTITY, *command], cwd=dest, check=True)
    for name in DATA_ENTRIES:
        if (checkout / name).exists() and not (dest / name).exists():
            (dest / name).symlink_to((checkout / name).resolve())
    return dest


def apply_patches(copy: Path, patches=None) -> None:
    """`git am` each patch in order: every one must apply as one commit."""
    for patch in PATCHES if patches is None else patches:
        before = git_head(copy)
        result = subprocess.run(
            ["git", *GIT_IDENTITY, "am", "--quiet", str(patch)],
            cwd=copy,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{patch.name} does not apply: {result.stderr}"
        count = subprocess.run(
            ["git", "rev-list", "--count", f"{before}..HEAD"],
            cwd=copy,
            capture_output=True,
            text=True,
        ).stdout.strip()
        assert count == "1", f"{patch.name} made {count} commits, not one"


def git_head(checkout: Path) -> str:
    return subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=checkout, capture_output=True, text=True, check=True
    ).stdout.strip()


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


def run_in_harness(
    checkout: Path, code: str, site: Path | None, *argv: str, python: str | None = None
) -> dict:
    """Run `code` with HARNESS_PY (or `python`) in `<checkout>/src`; return its `RESULT {json}`
    line + stderr."""
    result = subprocess.run(
        [python or harness_python(), "-c", textwrap.dedent(code), *argv],
        cwd=checkout / "src",
        env=harness_env(site),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    line = [x for x in result.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return {**json.loads(line[len("RESULT ") :]), "stderr": result.stderr}


PATCH_NAMES = [
    "0001-load-plugins-from-entry-points.patch",
    "0002-optimizer-registry.patch",
    "0003-community-methods-asu-simu.patch",
    "0004-community-benchmarks-lume.patch",
]


def test_the_patches_are_the_four_pull_requests():
    assert [p.name for p in PATCHES] == PATCH_NAMES
    for patch in PATCHES:
        text = patch.read_text()
        assert len(re.findall(r"^From [0-9a-f]{40} ", text, flags=re.M)) == 1, patch.name
    touched = {p.name: re.findall(r"^diff --git a/(\S+)", p.read_text(), re.M) for p in PATCHES}
    assert "src/open_unlearning_plugins.py" in touched[PATCH_NAMES[0]]
    assert {"docs/components.md", "docs/contributing.md"} <= set(touched[PATCH_NAMES[0]])
    assert touched[PATCH_NAMES[1]] == ["docs/components.md", "src/trainer/__init__.py"]
    assert sorted(touched[PATCH_NAMES[2]]) == [
        "community/methods/ASU/README.md",
        "community/methods/ASU/run.sh",
        "community/methods/SIMU/README.md",
        "community/methods/SIMU/run.sh",
    ]
    assert sorted(touched[PATCH_NAMES[3]]) == [
        "community/benchmarks/LUME/README.md",
        "community/benchmarks/LUME/run.sh",
    ]
    # no module that an installed package could shadow (or be shadowed by)
    assert not any(path == "src/plugins.py" for paths in touched.values() for path in paths)


def test_the_patches_apply_in_order_each_as_one_commit_and_the_checkout_is_untouched(tmp_path):
    checkout = harness_checkout()
    before = git_state(checkout)
    copy = clean_copy(checkout, tmp_path / "open-unlearning")
    apply_patches(copy)
    assert (copy / "src" / "open_unlearning_plugins.py").is_file()
    assert not (copy / "src" / "plugins.py").exists()
    for method in ("ASU", "SIMU"):
        readme = (copy / "community" / "methods" / method / "README.md").read_text()
        run_sh = (copy / "community" / "methods" / method / "run.sh").read_text()
        assert "pip install asu-simu-plugin" in readme
        assert f"trainer={method}" in run_sh
        syntax = subprocess.run(["bash", "-n", "-"], input=run_sh, capture_output=True, text=True)
        assert syntax.returncode == 0, syntax.stderr
    lume = copy / "community" / "benchmarks" / "LUME"
    assert "pip install asu-simu-plugin" in (lume / "README.md").read_text()
    run_sh = (lume / "run.sh").read_text()
    assert "experiment=unlearn/lume/${method}" in run_sh and "eval/lume/default" in run_sh
    syntax = subprocess.run(["bash", "-n", "-"], input=run_sh, capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr
    assert git_state(checkout) == before


@pytest.mark.parametrize("index", [2, 3], ids=["community-methods", "community-benchmarks"])
def test_the_community_patches_apply_on_their_own(tmp_path, index):
    copy = clean_copy(harness_checkout(), tmp_path / "open-unlearning")
    apply_patches(copy, [PATCHES[index]])


def pinned_ruff_version(checkout: Path) -> str:
    """The ruff version the harness's CI installs before `make quality`."""
    for workflow in sorted((checkout / ".github" / "workflows").glob("*.y*ml")):
        found = re.search(r"pip install ruff==([\w.]+)", workflow.read_text())
        if found:
            return found.group(1)
    pytest.fail("no `pip install ruff==...` in the harness's .github/workflows")


def test_the_patched_files_pass_the_harness_lint(patched_checkout):
    """The Python files the patches touch pass the harness's `make quality` checks (`ruff check`,
    `ruff format --check`) with the ruff version its CI pins (HARNESS_RUFF, else the ruff beside
    HARNESS_PY). Only our files: a newer upstream tree may itself fail them (4b43848's
    src/train.py does)."""
    version = pinned_ruff_version(patched_checkout)
    ruff = os.environ.get("HARNESS_RUFF") or str(Path(harness_python()).parent / "ruff")
    try:
        found = subprocess.run([ruff, "--version"], capture_output=True, text=True).stdout
    except FileNotFoundError:
        found = ""
    if found.split()[-1:] != [version]:
        pytest.skip(
            f"the harness lints with ruff {version}: `pip install ruff=={version}` beside "
            f"HARNESS_PY, or point HARNESS_RUFF at one (found {found.strip() or 'none'})"
        )
    touched = sorted(
        {
            path
            for patch in PATCHES
            for path in re.findall(r"^diff --git a/(\S+\.py) ", patch.read_text(), re.M)
        }
    )
    assert "src/open_unlearning_plugins.py" in touched
    for command in (["check"], ["format", "--check"]):
        result = subprocess.run(
            [ruff, *command, *touched], cwd=patched_checkout, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


REGISTRY_SCRIPT = """
import inspect, json, logging, sys
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
import torch, transformers
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

def trainer_with(optimizer):
    cfg = {"handler": "ToyTrainer", "args": args}
    if optimizer is not None:
        cfg["optimizer"] = optimizer
    return load_trainer(OmegaConf.create(cfg), net())

def error_of(optimizer):
    try:
        trainer_with(optimizer)
    except Exception as error:
        return f"{type(error).__name__}: {error}"

toy_trainer, _ = trainer_with(None)
result = {
    "at_import": at_import,
    "model": [type(toy_model).__name__, toy_model.kwargs["pretrained_model_name_or_path"]],
    "dataset": [type(dataset).__name__, dataset.size],
    "collator": [type(collator).__name__, collator.kwargs],
    "evaluator": [type(evaluators["toy"]).__name__,
                  {k: v.name for k, v in evaluators["toy"].metrics.items()}],
    "trainer": type(toy_trainer).__name__,
    "graddiff": trainer.TRAINER_REGISTRY["GradDiff"].__module__,
    "self_registered": (trainer.TRAINER_REGISTRY["ToySelfRegistered"]
                        is trainer.TRAINER_REGISTRY["ToyTrainer"]),
    "broken": "Broken" in trainer.TRAINER_REGISTRY,
    "supported": "optimizer_cls_and_kwargs" in inspect.signature(transformers.Trainer).parameters,
}
# without `optimizer`, transformers builds what trainer.args.optim names, as before
toy_trainer.create_optimizer()
result["default_optimizer"] = type(toy_trainer.optimizer).__name__
toy_optimizer = {"handler": "ToyOptimizer", "args": {"momentum": 0.9}}
if result["supported"]:
    with_optimizer, trainer_args = trainer_with(toy_optimizer)
    with_optimizer.create_optimizer_and_scheduler(num_training_steps=10)
    optimizer = with_optimizer.optimizer
    result.update({
        "optimizer": type(optimizer).__name__,
        "groups": [[g["lr"], g["weight_decay"], g["momentum"], len(g["params"])]
                   for g in optimizer.param_groups],
        "trainer_weight_decay": trainer_args.weight_decay,
        "scheduler_bound": with_optimizer.lr_scheduler.optimizer is optimizer,
        "patched_instance": "get_optimizer_cls_and_kwargs" in vars(with_optimizer),
        "unknown": error_of({"handler": "NoSuchOptimizer"}),
        "lr_in_args": error_of({"handler": "SGD", "args": {"lr": 0.1}}),
        "wd_in_args": error_of({"handler": "SGD", "args": {"weight_decay": 0.1}}),
    })
else:
    result["too_old"] = error_of(toy_optimizer)
print("RESULT " + json.dumps(result))
"""


@pytest.fixture(scope="module")
def registry_run(patched_checkout, tmp_path_factory) -> dict:
    """REGISTRY_SCRIPT's result with the toy plugin (one harness process for both tests)."""
    tmp_path = tmp_path_factory.mktemp("registry")
    site = write_toy_plugin(tmp_path / "site")
    return run_in_harness(patched_checkout, REGISTRY_SCRIPT, site, str(tmp_path / "out"))


def test_registries_load_plugins_at_lookup_time(registry_run):
    out = registry_run
    # nothing is read at import time, so plugins may import the harness at their top
    assert not {"ToyTrainer", "ToyOptimizer"} & set(out["at_import"])
    assert out["model"] == ["ToyModel", "toy-path"]
    assert out["dataset"] == ["ToyDataset", 3]
    assert out["collator"] == ["ToyCollator", {"pad": 1}]
    assert out["evaluator"] == ["ToyEvaluator", {"forget_toy": "toy_metric"}]
    assert out["trainer"] == "ToyTrainer"
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
    assert out["default_optimizer"] == "AdamW"


def test_optimizer_registry_hands_transformers_the_class_and_kwargs(registry_run):
    out = registry_run
    if not out["supported"]:
        # the harness's transformers predates Trainer(optimizer_cls_and_kwargs=...): one line
        assert out["too_old"].startswith("RuntimeError: trainer.optimizer needs transformers >=")
        pytest.skip("transformers < 4.47 in HARNESS_PY: only the error path is checked")
    # transformers' create_optimizer built it: lr from trainer.args, weight decay from
    # trainer.args on the Linear weight only (its bias and both LayerNorm parameters get none)
    assert out["optimizer"] == "ToyOptimizer"
    assert out["groups"] == [[0.5, 0.1, 0.9, 1], [0.5, 0.0, 0.9, 3]]
    assert out["trainer_weight_decay"] == 0.1  # untouched
    assert out["scheduler_bound"] is True
    assert out["patched_instance"] is False  # nothing patched onto the trainer
    assert "NoSuchOptimizer" in out["unknown"] and "'ToyOptimizer'" in out["unknown"]
    assert out["lr_in_args"] == (
        "ValueError: trainer.optimizer.args.lr is not used: set trainer.args.learning_rate instead"
    )
    assert out["wd_in_args"] == (
        "ValueError: trainer.optimizer.args.weight_decay is not used: set "
        "trainer.args.weight_decay instead"
    )


def harness_supports_optimizer_cls_and_kwargs() -> bool:
    probe = (
        "import inspect, transformers; "
        "print('optimizer_cls_and_kwargs' in inspect.signature(transformers.Trainer).parameters)"
    )
    out = subprocess.run([harness_python(), "-c", probe], capture_output=True, text=True)
    return out.stdout.splitlines()[-1:] == ["True"]  # DeepSpeed may log to stdout first


@pytest.mark.slow
def test_patched_train_py_runs_a_plugin_trainer_with_a_plugin_optimizer(patched_checkout, tmp_path):
    if not harness_supports_optimizer_cls_and_kwargs():
        pytest.skip("transformers < 4.47 in HARNESS_PY: trainer.optimizer is unavailable")
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
import data, evals, model, trainer
from evals import metrics
from open_unlearning_plugins import load_entry_points
groups = {"trainers": trainer.TRAINER_REGISTRY, "optimizers": trainer.OPTIMIZER_REGISTRY,
          "models": model.MODEL_REGISTRY, "metrics": metrics.METRICS_REGISTRY,
          "evaluators": evals.EVALUATOR_REGISTRY, "datasets": data.DATASET_REGISTRY}
ours = {ep.name: ep for kind in groups for ep in entry_points(group="open_unlearning." + kind)
        if ep.value.startswith("asu_simu_plugin.")}
for kind, registry in groups.items():
    load_entry_points(kind, registry)
registries = {k: v for registry in groups.values() for k, v in registry.items()}
found = {name: ep.value for name, ep in ours.items() if registries.get(name) is ep.load()}
from asu_simu_plugin import harness
ours = {name: ep.value for name, ep in ours.items()}
print("RESULT " + json.dumps({"ours": ours, "found": found, "again": harness.register()}))
"""


@pytest.fixture(scope="module")
def python_with_us(tmp_path_factory) -> str:
    """HARNESS_PY's packages plus this package freshly installed (`pip install .`), so that its
    entry points are exactly those pyproject.toml declares now."""
    harness_python()
    return install_into_fresh_venv(tmp_path_factory.mktemp("with_us"), editable=False)


def test_installed_asu_simu_plugin_registers_through_entry_points(patched_checkout, python_with_us):
    out = run_in_harness(patched_checkout, INSTALLED_SCRIPT, None, python=python_with_us)
    expected = {"ASU", "SIMU", "SOGradDiff", "SONPO", "SophiaG", "TemperedCausalLM", "LUMEDataset"}
    assert expected <= set(out["ours"])
    assert out["found"] == out["ours"]
    # its Hydra-plugin registration, run after the entry points, finds everything in place
    assert out["again"] == []
    assert "skipped" not in out["stderr"], out["stderr"][-3000:]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return save_tiny_harness_model(tmp_path_factory.mktemp("tiny") / "model")


def train_args(tiny_model, out, *overrides):
    return [
        "--config-name=unlearn.yaml",
        "experiment=unlearn/tofu/default",
        *overrides,
        f"task_name={out.name}",
        *model_overrides(tiny_model),
        *CPU_TRAIN_OVERRIDES,
        "+trainer.args.max_steps=2",
        f"paths.output_dir={out}",
    ]


NO_REGISTRATION = {"ASU_SIMU_PLUGIN_REGISTER": "0"}  # our Hydra plugin then only adds configs


def test_trainer_asu_runs_through_entry_points_alone(
    patched_checkout, python_with_us, tiny_model, tmp_path
):
    """With the Hydra plugin's registration off, the patched harness finds ASU through its entry
    point; the unpatched one (the control) does not find it at all."""
    checkout = harness_checkout()
    unpatched = subprocess.run(
        [python_with_us, "src/train.py", *train_args(tiny_model, tmp_path / "x", "trainer=ASU")],
        cwd=checkout,
        env=harness_env(None, **NO_REGISTRATION),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert unpatched.returncode != 0
    assert "ASU not implemented or not registered" in unpatched.stderr, unpatched.stderr[-3000:]

    out = tmp_path / "asu"
    result = run_harness(
        "train.py",
        train_args(tiny_model, out, "trainer=ASU"),
        checkout=patched_checkout,
        python=python_with_us,
        env=NO_REGISTRATION,
    )
    assert "ASU Trainer loaded" in result.stdout + result.stderr
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2


def test_the_harness_graddiff_still_runs_without_any_plugin(patched_checkout, tiny_model, tmp_path):
    """A user who installs no plugin: the patched harness's own GradDiff, in a venv without us."""
    python = venv_without_us(tmp_path / "venv")
    out = tmp_path / "graddiff"
    result = run_harness(
        "train.py",
        train_args(tiny_model, out, "trainer=GradDiff"),
        checkout=patched_checkout,
        python=python,
    )
    assert "GradDiff Trainer loaded" in result.stdout + result.stderr
    assert "open_unlearning." not in result.stderr  # no entry-point warning of any kind
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 2
