"""The one list of methods, and of the other objects the package offers the harness.

A method is registered once, in its own module, with one call (as peft's
`register_peft_method`):

    register_method(
        "ASU", mixin=ASUMixin, arguments=ASUArguments, config="ASU", summary="...",
    )

Everything else is derived from that record: the trainer classes on the harness's bases
(`asu_simu_plugin.harness`) and on the standalone ones (`asu_simu_plugin.standalone`), the names
registered into the harness, the CLI's `--method` choices and help, the Hydra plugin's messages.
`tests/test_registry.py` holds `pyproject.toml`'s entry points and `configs/trainer/*.yaml`
against it. Adding a method is three edits: its module (mixin, argument dataclass, this call),
its `configs/trainer/NAME.yaml`, its entry-point line in `pyproject.toml`.

Method modules are found by importing every module and subpackage of `asu_simu_plugin.methods`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass, field
from typing import ClassVar

from asu_simu_plugin.arguments import BASE_ARGUMENTS, MethodArgumentError, MethodArguments

# modules that register objects but are not methods
COMPONENT_MODULES = ("asu_simu_plugin.models", "asu_simu_plugin.metrics", "asu_simu_plugin.lume")


@dataclass(frozen=True)
class Method:
    """One unlearning method: its name (the harness's `trainer.handler`), its trainer mixin (None
    for a base the harness ships itself), its argument dataclass, the base it extends, and the
    trainer config this package ships (`configs/trainer/<config>.yaml`; None: the harness's)."""

    name: str
    arguments: type[MethodArguments]
    mixin: type | None = None
    base: str = "GradDiff"
    config: str | None = None
    summary: str = ""
    cli_name: str = field(default="")

    @property
    def offered_to_harness(self) -> bool:
        """A trainer this package adds to the harness (a base is the harness's own)."""
        return self.mixin is not None


@dataclass(frozen=True)
class Component:
    """Another object offered to a harness registry (an optimizer, a model handler)."""

    kind: str  # "optimizer" | "model" | "metric" | "evaluator" | "dataset"
    name: str
    target: str  # "module:attribute", imported on first use

    def load(self):
        module, attribute = self.target.split(":")
        return getattr(importlib.import_module(module), attribute)


_METHODS: dict[str, Method] = {}
_COMPONENTS: dict[tuple[str, str], Component] = {}
_discovered = False


def register_method(
    name: str,
    *,
    arguments: type[MethodArguments],
    mixin: type | None = None,
    base: str = "GradDiff",
    config: str | None = None,
    summary: str = "",
) -> Method:
    """Register a method (see the module docstring); returns its record."""
    if base not in BASE_ARGUMENTS:
        raise ValueError(f"{name}: base {base!r} is not one of {', '.join(BASE_ARGUMENTS)}")
    base_fields = set(BASE_ARGUMENTS[base].names())
    if not base_fields <= set(arguments.names()):
        raise ValueError(f"{name}: {arguments.__name__} must extend {base}'s arguments")
    method = Method(name, arguments, mixin, base, config, summary, name.lower())
    existing = _METHODS.get(name)
    if existing is not None and existing != method:
        raise ValueError(f"a method named {name!r} is already registered")
    _METHODS[name] = method
    return method


def register_component(kind: str, name: str, target: str) -> Component:
    component = Component(kind, name, target)
    _COMPONENTS[(kind, name)] = component
    return component


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    package = importlib.import_module("asu_simu_plugin.methods")
    for info in pkgutil.iter_modules(package.__path__, f"{package.__name__}."):
        importlib.import_module(info.name)
    for module in COMPONENT_MODULES:
        importlib.import_module(module)


def methods() -> dict[str, Method]:
    """Every registered method, by name, in registration order."""
    _discover()
    return dict(_METHODS)


def harness_methods() -> list[Method]:
    """The methods this package adds to the harness's trainer registry."""
    return [m for m in methods().values() if m.offered_to_harness]


def components(kind: str | None = None) -> list[Component]:
    _discover()
    return [c for c in _COMPONENTS.values() if kind is None or c.kind == kind]


def get_method(name: str) -> Method:
    """The method called `name` (its trainer name, or its lower-case CLI name)."""
    found = methods()
    if name in found:
        return found[name]
    by_cli = {m.cli_name: m for m in found.values()}
    if name.lower() in by_cli:
        return by_cli[name.lower()]
    raise KeyError(f"unknown method {name!r}; available: {', '.join(found)}")


# -- trainer classes -------------------------------------------------------------------------------
class MethodInputMixin:
    """Front of every trainer class built here: the method's argument dataclass is its input.

    The trainer takes either `method_args=` (the dataclass, or a mapping) or the same values as
    keywords (the harness passes its `method_args` that way). Either way the dataclass is built
    and checked before anything else happens, kept as `self.method_args`, and the base's own
    arguments (gamma, alpha, retain_loss_type, beta) are passed on to the base from it.
    """

    unlearning_method: ClassVar[Method]

    def __init__(self, *args, method_args=None, **kwargs):
        cls = self.unlearning_method.arguments
        given = {k: kwargs.pop(k) for k in list(kwargs) if k in cls.names()}
        unknown = sorted(set(kwargs) - self._accepted_keywords())
        if unknown:
            valid = ", ".join(sorted(cls.names()))
            raise MethodArgumentError(
                f"unknown method argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)} for {self.unlearning_method.name}; valid: {valid}"
            )
        if method_args is None:
            method_args = cls.from_values(given, self.unlearning_method.name)
        elif given:
            raise TypeError("give the method arguments as method_args= or as keywords, not both")
        elif not isinstance(method_args, cls):
            method_args = cls.from_values(method_args, self.unlearning_method.name)
        self.method_args = method_args
        base_names = BASE_ARGUMENTS[self.unlearning_method.base].names()
        super().__init__(*args, **{k: getattr(method_args, k) for k in base_names}, **kwargs)

    @classmethod
    def _accepted_keywords(cls) -> set[str]:
        """Keywords the classes below the method mixins take (transformers.Trainer's, the
        harness's `evaluators` / `template_args`, ...)."""
        from transformers import Trainer

        names = set()
        for klass in cls.__mro__:
            init = klass.__dict__.get("__init__")
            if init is None or klass is MethodInputMixin:
                continue
            for param in inspect.signature(init).parameters.values():
                if param.kind in (param.KEYWORD_ONLY, param.POSITIONAL_OR_KEYWORD):
                    names.add(param.name)
            if klass is Trainer:
                break
        # `tokenizer=`: transformers >= 5 only has processing_class= (TrainerCompatMixin maps it)
        return (names | {"tokenizer"}) - {"self"}


def build_trainer_class(name: str, bases: dict[str, type], module: str, front=()) -> type:
    """The trainer class of method `name`:
    (MethodInputMixin, front…, its mixin, RetainLossMixin, its base).

    The class gets `name` as `__name__` because the harness registries key on it.
    RetainLossMixin gives every trainer the same retain losses, whatever its base.
    """
    from asu_simu_plugin.methods.base import RetainLossMixin

    method = get_method(name)
    parents = (MethodInputMixin, *front, *([method.mixin] if method.mixin else []))
    base = bases[method.base]
    parents += (base,) if issubclass(base, RetainLossMixin) else (RetainLossMixin, base)
    attributes = {"__module__": module, "__qualname__": name, "unlearning_method": method}
    return type(name, parents, attributes)


def lazy_trainer_classes(module: str, bases_factory, front=(), names=None):
    """A module-level `__getattr__` that builds each method's trainer class on first access.

    Lazy so that importing the module costs nothing (the harness's trainer package is imported
    only when a trainer is used), and cached so every access returns the very same class object
    (registries compare identity). `names`: a callable giving the names served (default: every
    method this package offers to the harness).
    """
    cache: dict[str, type] = {}

    def served():
        return names() if names else [m.name for m in harness_methods()]

    def __getattr__(name: str):
        if name.startswith("__") or name not in served():
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in cache:
            cache[name] = build_trainer_class(name, bases_factory(), module, front)
        return cache[name]

    return __getattr__
