"""The only module that imports the open-unlearning harness.

It finds the harness, builds our trainer classes on the harness's own `GradDiff` / `NPO` (so they
inherit its DeepSpeed reference-model path, evaluation and logging) and our metrics and evaluator
on its `UnlearningMetric` / `Evaluator` (`asu_simu_plugin.metrics`) and LUME's dataset on its
`CompletionDataset` (`asu_simu_plugin.lume`), and registers them into the
harness registries without ever shadowing a harness name.

The harness is the one already running (inside `python src/train.py` its `trainer` module is
imported before us), else the checkout named by `OPEN_UNLEARNING_SRC` (its `src/` is put on
`sys.path`), else an importable top-level `trainer` module that has `TRAINER_REGISTRY`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from pathlib import Path
from types import ModuleType

from asu_simu_plugin import registry
from asu_simu_plugin.lora import SharedReferenceMixin
from asu_simu_plugin.methods.base import TrainerCompatMixin

logger = logging.getLogger(__name__)

ENV_VAR = "OPEN_UNLEARNING_SRC"
# harness registry attribute and module, per kind of component (asu_simu_plugin.registry)
COMPONENT_REGISTRIES = {
    "model": ("MODEL_REGISTRY", "model"),
    "optimizer": ("OPTIMIZER_REGISTRY", "trainer"),
    "metric": ("METRICS_REGISTRY", "evals.metrics"),
    "evaluator": ("EVALUATOR_REGISTRY", "evals"),
    "dataset": ("DATASET_REGISTRY", "data"),
}


class HarnessNotFoundError(ImportError):
    """The open-unlearning harness could not be imported."""


def _looks_like_harness(trainer_module: ModuleType) -> bool:
    return hasattr(trainer_module, "TRAINER_REGISTRY") and hasattr(trainer_module, "load_trainer")


def harness_src_dir() -> Path | None:
    """`<checkout>/src` from OPEN_UNLEARNING_SRC (accepts the checkout or its src/), else None."""
    root = os.environ.get(ENV_VAR)
    if not root:
        return None
    path = Path(root).expanduser().resolve()
    src = path if (path / "trainer").is_dir() else path / "src"
    if not (src / "trainer" / "__init__.py").is_file():
        raise HarnessNotFoundError(
            f"{ENV_VAR}={root} is not an open-unlearning checkout (no src/trainer/__init__.py "
            "there); point it at the directory you cloned locuslab/open-unlearning into"
        )
    return src


def import_harness(module: str = "trainer") -> ModuleType:
    """Import a top-level harness module (`trainer`, `model`, `data`, `evals`)."""
    running = sys.modules.get("trainer")
    if running is None or not _looks_like_harness(running):  # the running harness wins
        src = harness_src_dir()
        if src is not None and str(src) not in sys.path:
            sys.path.insert(0, str(src))
    try:
        trainer_module = importlib.import_module("trainer")
    except ImportError as error:
        if isinstance(error, ModuleNotFoundError) and error.name == "trainer":
            raise HarnessNotFoundError(_not_found_message()) from error
        raise HarnessNotFoundError(
            f"the open-unlearning harness was found but failed to import ({error}); install its "
            "requirements (`pip install -r requirements.txt` in the checkout; its `trainer` "
            "package needs deepspeed)"
        ) from error
    if not _looks_like_harness(trainer_module):
        raise HarnessNotFoundError(
            f"the importable `trainer` module ({getattr(trainer_module, '__file__', '?')}) is "
            "not open-unlearning's. " + _not_found_message()
        )
    return trainer_module if module == "trainer" else importlib.import_module(module)


def _not_found_message() -> str:
    return (
        "the open-unlearning harness is not importable. Either set "
        f"{ENV_VAR}=/path/to/open-unlearning (a checkout of locuslab/open-unlearning), or run "
        "from inside the harness (`python src/train.py ...` puts its src/ on sys.path). Without "
        "the harness, use the standalone trainers: `asu_simu_plugin.standalone` or `asu-simu "
        "unlearn`."
    )


def _bases() -> dict[str, type]:
    import_harness()
    grad_diff = importlib.import_module("trainer.unlearn.grad_diff").GradDiff
    npo = importlib.import_module("trainer.unlearn.npo").NPO
    return {"GradDiff": grad_diff, "NPO": npo}


# Our methods on the harness's own bases (built on first access; these
# `asu_simu_plugin.harness:<Name>` objects are what our `open_unlearning.trainers` entry points name).
# SharedReferenceMixin: on a LoRA model the KL / NPO reference is the student's own base weights
# with the adapters off, where the harness's `_prepare_ref_model` would deep-copy the model.
_trainer_class = registry.lazy_trainer_classes(
    __name__, _bases, front=(TrainerCompatMixin, SharedReferenceMixin)
)
_evaluation_objects: dict[str, object] = {}


def _load(target: str):
    module, attribute = target.split(":")
    return getattr(importlib.import_module(module), attribute)


def _harness_classes() -> dict[str, tuple[str, str]]:
    """name -> (our mixin, the harness base): evaluators and datasets."""
    from asu_simu_plugin import lume, metrics

    return {**metrics.EVALUATORS, **lume.DATASETS}


def _evaluation_object(name: str):
    """Our metric (the harness's `UnlearningMetric` around one of our functions), or evaluator or
    dataset (our mixin in front of the harness's class)."""
    from asu_simu_plugin import metrics

    if name not in _evaluation_objects:
        if name in metrics.METRIC_FUNCTIONS:
            base = import_harness("evals.metrics.base").UnlearningMetric
            function = _load(metrics.METRIC_FUNCTIONS[name])
            _evaluation_objects[name] = base(name=name, metric_fn=function)
        else:
            mixin, base = _harness_classes()[name]
            harness_module, attribute = base.split(":")
            base = getattr(import_harness(harness_module), attribute)
            attributes = {"__module__": __name__, "__qualname__": name}
            _evaluation_objects[name] = type(name, (_load(mixin), base), attributes)
    return _evaluation_objects[name]


def __getattr__(name: str):
    """Trainer classes, metrics, evaluators and datasets, each built once on first access
    (registries compare identity)."""
    from asu_simu_plugin import metrics

    if name in metrics.METRIC_FUNCTIONS or name in _harness_classes():
        return _evaluation_object(name)
    return _trainer_class(name)


def _register_into(registry: dict, name: str, obj) -> bool:
    """Add `obj` under `name` unless the key is taken; the same object again is a no-op."""
    existing = registry.get(name)
    if existing is obj:
        return False
    if existing is not None:
        logger.warning(
            "open-unlearning already has a %r (%s); asu-simu-plugin leaves it in place",
            name,
            getattr(existing, "__module__", type(existing).__name__),
        )
        return False
    registry[name] = obj
    return True


def _plugin_objects():
    """(registry attribute, module, name, loader) for everything we offer to the harness."""
    module = sys.modules[__name__]
    for method in registry.harness_methods():
        yield "TRAINER_REGISTRY", "trainer", method.name, lambda n=method.name: getattr(module, n)
    for component in registry.components():
        registry_name, module_name = COMPONENT_REGISTRIES[component.kind]
        yield registry_name, module_name, component.name, component.load


def register() -> list[str]:
    """Register our trainers, model handlers, optimizers, metrics and evaluator into the running
    harness.

    Returns the names newly added. Safe to call more than once, and alongside the entry-point
    patch (names already registered with the same object are skipped silently). One object that
    fails to load is reported and skipped; the others still register.
    """
    added = []
    for registry_name, module_name, name, load in _plugin_objects():
        registry = getattr(import_harness(module_name), registry_name, None)
        if registry is None:  # OPTIMIZER_REGISTRY exists only with the entry-point patch
            continue
        try:
            obj = load()
        except Exception as error:
            logger.warning("asu-simu-plugin: %s is unavailable (%r)", name, error)
            continue
        if _register_into(registry, name, obj):
            added.append(name)
    if added:
        logger.info("asu-simu-plugin registered %s", ", ".join(added))
    return added


REFERENCE_ENV = "ASU_SIMU_REFERENCE_MODEL"  # set by the continual driver for src/train.py
RECORD_ENV = "ASU_SIMU_REFERENCE_RECORD"  # where to record that it was applied (JSON)


def use_reference_model(path: str, record: str | None = None) -> None:
    """Build every trainer's frozen reference (the harness's `GradDiff._prepare_ref_model`,
    which NPO, DPO, SimNPO, ... and our trainers, ASU's teacher included, go through) with the
    weights of the model at `path` instead of a copy of the model being trained: continual
    unlearning's `--reference original` (`asu_simu_plugin.continual`), where the trained model is
    the previous step's. One process, no LoRA (a LoRA reference is the adapters-off student and
    does not come here). `record` (a JSON file) says that the override is in place and, once a
    trainer built its reference (GradDiff with an NLL retain loss builds none), that it did."""
    import json

    import_harness()
    grad_diff = importlib.import_module("trainer.unlearn.grad_diff").GradDiff
    current = grad_diff._prepare_ref_model
    build = getattr(current, "__asu_simu_original__", current)

    def note(built: bool) -> None:
        if record and int(os.environ.get("RANK", "0")) == 0:
            Path(record).write_text(json.dumps({"reference": path, "built": built}))

    def prepare_ref_model(self, model):
        from transformers import AutoModelForCausalLM

        reference = build(self, model)
        target = getattr(reference, "module", reference)
        dtype = next(target.parameters()).dtype
        source = AutoModelForCausalLM.from_pretrained(path, torch_dtype=dtype)
        target.load_state_dict(source.state_dict(), strict=True)  # same architecture, or fail
        logger.info("asu-simu-plugin: the reference model holds the weights of %s", path)
        note(built=True)
        return reference

    prepare_ref_model.__asu_simu_original__ = build
    grad_diff._prepare_ref_model = prepare_ref_model
    note(built=False)


def share_batch_scores():
    """Share the per-batch probabilities and greedy answers of the harness's memorization
    metrics between this process's evaluators (`asu_simu_plugin.metrics.reuse`): the ASU paper's
    evaluator reuses what `eval=tofu` scored on the same rows. Returns the store, or None where
    it stays off (several processes)."""
    from asu_simu_plugin.metrics import reuse

    return reuse.share(import_harness("evals.metrics.memorization"))
