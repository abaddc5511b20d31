"""Method mixins and the one recipe that turns them into trainer classes on any base."""

from __future__ import annotations

import importlib

# trainer name -> (mixin "module:attribute", the GradDiff-family base it extends)
METHODS: dict[str, tuple[str, str]] = {
    "ASU": ("asu_simu_plugin.methods.asu:ASUMixin", "GradDiff"),
    "SIMU": ("asu_simu_plugin.methods.simu:SIMUMixin", "GradDiff"),
    "SOGradDiff": ("asu_simu_plugin.methods.sophia:SophiaMixin", "GradDiff"),
    "SONPO": ("asu_simu_plugin.methods.sophia:SophiaMixin", "NPO"),
}


def load_mixin(name: str) -> type:
    module_name, attribute = METHODS[name][0].split(":")
    return getattr(importlib.import_module(module_name), attribute)


def build_trainer_class(name: str, bases: dict[str, type], module: str, front=()) -> type:
    """`name` = (front mixins…, the method's mixin, bases[its base kind]).

    The class gets `name` as `__name__` because the harness registries key on it.
    """
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r}; available: {', '.join(METHODS)}")
    base = bases[METHODS[name][1]]
    return type(
        name, (*front, load_mixin(name), base), {"__module__": module, "__qualname__": name}
    )


def lazy_trainer_classes(module: str, bases_factory, front=()):
    """A module-level `__getattr__` that builds each method's trainer class on first access.

    Lazy so that importing the module costs nothing (the harness's trainer package, SIMU's
    plotting, … are imported only for the method actually used), and cached so every access
    returns the very same class object (registries compare identity).
    """
    cache: dict[str, type] = {}

    def __getattr__(name: str):
        if name not in METHODS:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if name not in cache:
            cache[name] = build_trainer_class(name, bases_factory(), module, front)
        return cache[name]

    return __getattr__
