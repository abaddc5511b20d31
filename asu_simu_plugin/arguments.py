"""Method arguments as dataclasses: each method's input, with its defaults, help and checks.

A method's dataclass (registered with it, `asu_simu_plugin.registry.register_method`) is the one
place its arguments are declared: the trainers build it from their keywords (the harness's
`method_args`) or take it whole, the CLI derives `--set` keys and help from it, and a bad value is
refused with a one-line `MethodArgumentError` before a model is loaded.

To add an argument: a field with its default and `metadata={"help": ...}` in the dataclass of the
method that takes it, and its check in that class's `__post_init__`.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import MISSING, dataclass, field, fields

AUTO = "auto"


class MethodArgumentError(ValueError):
    """A method argument has a wrong name, type or value."""


# -- value checks --------------------------------------------------------------------------------
def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def check_number(name, value, minimum=None, maximum=None, *, above=None, optional=False):
    """A finite int/float (not a bool) within [minimum, maximum], and > `above` if given."""
    if value is None and optional:
        return
    if not _is_number(value) or not math.isfinite(value):
        raise MethodArgumentError(f"{name} must be a finite number (got {value!r})")
    if above is not None and not value > above:
        raise MethodArgumentError(f"{name} must be > {above:g} (got {value!r})")
    if minimum is not None and value < minimum:
        raise MethodArgumentError(f"{name} must be >= {minimum:g} (got {value!r})")
    if maximum is not None and value > maximum:
        raise MethodArgumentError(f"{name} must be <= {maximum:g} (got {value!r})")


def check_integer(name, value, minimum=None, *, optional=False):
    """An int (not a bool, not a float such as 2.0, not a string such as "2")."""
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise MethodArgumentError(f"{name} must be an integer (got {value!r})")
    if minimum is not None and value < minimum:
        raise MethodArgumentError(f"{name} must be >= {minimum} (got {value!r})")


def check_choice(name, value, choices):
    if value not in choices:
        raise MethodArgumentError(
            f"{name}={value!r} is not supported; use one of {', '.join(map(str, choices))}"
        )


def check_bool(name, value):
    if not isinstance(value, bool):
        raise MethodArgumentError(f"{name} must be true or false (got {value!r})")


def check_layer_ids(name, value, *, allow_auto=False, optional=True):
    """None (all layers), "auto" where allowed, one integer id or a non-empty list of them (>= 0)."""
    if value is None and optional:
        return
    if allow_auto and value == AUTO:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list | tuple) or not value:
        extra = ', "auto"' if allow_auto else ""
        raise MethodArgumentError(
            f"{name} must be a list of 0-based layer ids such as [0, 1, 2] (or null{extra}); "
            f"got {value!r}"
        )
    for item in value:
        check_integer(f"{name} entry", item, 0)


def check_layers_exist(name, value, num_layers: int):
    """Layer ids below the model's layer count (from its config, before loading it)."""
    if value is None or value == AUTO:
        return
    ids = [value] if isinstance(value, int) else list(value)
    bad = [i for i in ids if i >= num_layers]
    if bad:
        raise MethodArgumentError(
            f"{name}: no layer {', '.join(map(str, bad))} in this model, which has {num_layers} "
            f"decoder layers (ids 0-{num_layers - 1})"
        )


def check_regexes(name, value):
    """None, one regex, or a list of regexes, each of which compiles."""
    if value is None:
        return
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise MethodArgumentError(f"{name} must be a regex or a list of regexes (got {value!r})")
    for item in items:
        if not isinstance(item, str):
            raise MethodArgumentError(f"{name} entries must be strings (got {item!r})")
        try:
            re.compile(item)
        except re.error as error:
            raise MethodArgumentError(f"{name}: {item!r} is not a valid regex ({error})") from None


def check_readable_file(name, value, *, optional=True):
    if value is None and optional:
        return
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise MethodArgumentError(f"{name} must be a file path (got {value!r})")
    if not os.path.isfile(value):
        raise MethodArgumentError(f"{name}: {value} is not a file")
    if not os.access(value, os.R_OK):
        raise MethodArgumentError(f"{name}: {value} is not readable (check its permissions)")


def help_text(text: str) -> dict:
    """A dataclass field's metadata: its help (shown by `asu-simu unlearn --help`)."""
    return {"help": text}


# -- the dataclasses -------------------------------------------------------------------------------
@dataclass
class MethodArguments:
    """Base: cooperative `__post_init__` checks and the helpers below."""

    def __post_init__(self):
        pass

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: _default(f) for f in fields(cls)}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        """(name, default, help) of every argument, in declaration order."""
        return [(f.name, _default(f), f.metadata.get("help", "")) for f in fields(cls)]

    @classmethod
    def from_values(cls, values, method: str | None = None):
        """The dataclass from `values` (a dict, or the harness's OmegaConf `method_args`).

        Unknown keys are refused with the list of valid ones, before any check runs.
        """
        values = plain_values(values)
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            owner = f" for {method}" if method else ""
            raise MethodArgumentError(
                f"unknown method argument{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(unknown)}{owner}; valid: {', '.join(sorted(cls.names()))}"
            )
        return cls(**values)

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.names()}

    def check_model_config(self, config) -> None:
        """Checks against the model's config (e.g. layer ids), before its weights load."""


def plain_values(values) -> dict:
    """A plain dict of plain values (OmegaConf containers become dicts and lists)."""
    if values is None:
        return {}
    values = _plain(values)
    if not isinstance(values, dict):
        raise MethodArgumentError(f"method arguments must be a mapping (got {values!r})")
    # the harness passes `method_args` as keywords: a dict whose values may be OmegaConf lists
    return {str(k): _plain(v) for k, v in values.items()}


def _plain(value):
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class GradDiffArguments(MethodArguments):
    """GradDiff's arguments: the harness's `GradDiff` and our standalone base take these."""

    RETAIN_LOSS_TYPES = ("NLL", "KL", "KL_ALL")

    gamma: float = field(default=1.0, metadata=help_text("forget-loss weight (>= 0)"))
    alpha: float = field(default=1.0, metadata=help_text("retain-loss weight (>= 0)"))
    retain_loss_type: str = field(
        default="NLL",
        metadata=help_text(
            "retain loss: NLL | KL (to the original, answer tokens) | KL_ALL (every position)"
        ),
    )

    def __post_init__(self):
        super().__post_init__()
        check_number("gamma", self.gamma, 0)
        check_number("alpha", self.alpha, 0)
        if self.gamma == 0 and self.alpha == 0:
            raise MethodArgumentError(
                "gamma=0 and alpha=0 switch off both losses, so training would not change the "
                "model: set gamma > 0 (forget loss) or alpha > 0 (retain loss)"
            )
        check_choice("retain_loss_type", self.retain_loss_type, self.RETAIN_LOSS_TYPES)


@dataclass
class NPOArguments(GradDiffArguments):
    """The harness's NPO: GradDiff's plus the NPO inverse temperature."""

    beta: float = field(default=1.0, metadata=help_text("NPO beta (> 0)"))

    def __post_init__(self):
        super().__post_init__()
        check_number("beta", self.beta, above=0)


# The bases a method's trainer can extend, by the harness's names, and the arguments they take.
BASE_ARGUMENTS: dict[str, type[MethodArguments]] = {
    "GradDiff": GradDiffArguments,
    "NPO": NPOArguments,
}
