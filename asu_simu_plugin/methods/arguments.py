"""Method arguments as dataclasses: one place for their defaults, help and checks.

Each dataclass mirrors the keyword arguments of a trainer (its method mixin and the GradDiff-family
base below it), so a bad value is refused with a one-line message before a model is loaded;
`asu-simu unlearn --set` and `--help` read them. `tests/test_cli_arguments.py` compares them with
the live `__init__` signatures and with `configs/trainer/*.yaml`, so a new or changed argument that
is not added here fails a test that says which.

To add an argument: a field with its default and `metadata={"help": ...}` in the class of the mixin
that takes it, and its check in that class's `__post_init__`.
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


def _help(text: str) -> dict:
    return {"help": text}


# -- the dataclasses -------------------------------------------------------------------------------
@dataclass
class MethodArguments:
    """Base: cooperative `__post_init__` checks and the helpers below."""

    def __post_init__(self):
        pass

    @classmethod
    def defaults(cls) -> dict:
        return {f.name: _default(f) for f in fields(cls)}

    @classmethod
    def describe(cls) -> list[tuple[str, object, str]]:
        """(name, default, help) of every argument, in declaration order."""
        return [(f.name, _default(f), f.metadata.get("help", "")) for f in fields(cls)]


def _default(f):
    return f.default_factory() if f.default is MISSING else f.default


@dataclass
class GradDiffArguments(MethodArguments):
    """The harness's GradDiff arguments (our standalone base takes the same)."""

    RETAIN_LOSS_TYPES = ("NLL", "KL", "KL_ALL")

    gamma: float = field(default=1.0, metadata=_help("forget-loss weight (>= 0)"))
    alpha: float = field(default=1.0, metadata=_help("retain-loss weight (>= 0)"))
    retain_loss_type: str = field(
        default="NLL", metadata=_help("retain loss: NLL | KL (answer tokens) | KL_ALL")
    )

    def __post_init__(self):
        super().__post_init__()
        check_number("gamma", self.gamma, 0)
        check_number("alpha", self.alpha, 0)
        check_choice("retain_loss_type", self.retain_loss_type, self.RETAIN_LOSS_TYPES)


@dataclass
class NPOArguments(GradDiffArguments):
    """The harness's NPO: GradDiff's plus the NPO inverse temperature."""

    beta: float = field(default=1.0, metadata=_help("NPO beta (> 0)"))

    def __post_init__(self):
        super().__post_init__()
        check_number("beta", self.beta, above=0)


@dataclass
class ASUArguments(GradDiffArguments):
    """`methods.asu.ASUMixin`."""

    RETAIN_LOSS_TYPES = ("NLL", "KL", "KL_ALL", "EMBED_MSE")
    FORGET_LOSS_TYPES = ("KL", "EMBED_MSE")

    temperature: float | str = field(
        default=2.3, metadata=_help('forget-teacher attention temperature tau (> 0), or "auto"')
    )
    layers: list[int] | str | None = field(
        default=None, metadata=_help('0-based decoder layers to smooth; null = all, or "auto"')
    )
    forget_loss_type: str = field(default="KL", metadata=_help("KL | EMBED_MSE (WMDP variant)"))
    embed_layer: int = field(default=7, metadata=_help("layer whose hidden states EMBED_MSE uses"))
    trainable_params_regex: list[str] | str | None = field(
        default=None, metadata=_help("regexes of parameter names to train; null = all")
    )
    teacher_eos: str = field(
        default="keep",
        metadata=_help("keep | suppress: drop the teacher's end-of-answer tokens mid-answer"),
    )
    tau_sweep: dict | None = field(
        default=None, metadata=_help('settings of temperature/layers "auto" (null = defaults)')
    )
    collapse_guard: dict | bool | None = field(
        default=None, metadata=_help("settings of the silent-teacher check; false = off")
    )
    teacher_cache: bool = field(
        default=False, metadata=_help("compute the teacher's outputs once, reuse every epoch")
    )
    teacher_cache_dtype: str = field(
        default="float16", metadata=_help("teacher cache storage: float16 | bfloat16 | float32")
    )
    module_regex: str | None = field(
        default=None, metadata=_help("RMU key of the harness's WMDP experiment (unused)")
    )
    steering_coeff: float | None = field(
        default=None, metadata=_help("RMU key of the harness's WMDP experiment (unused)")
    )

    def __post_init__(self):
        super().__post_init__()
        if self.temperature != AUTO:
            check_number("temperature", self.temperature, above=0)
        check_layer_ids("layers", self.layers, allow_auto=True)
        check_choice("forget_loss_type", self.forget_loss_type, self.FORGET_LOSS_TYPES)
        check_integer("embed_layer", self.embed_layer, 0)
        check_regexes("trainable_params_regex", self.trainable_params_regex)
        check_number("steering_coeff", self.steering_coeff, optional=True)
        check_bool("teacher_cache", self.teacher_cache)
        if self.teacher_cache and self.forget_loss_type != "KL":
            raise MethodArgumentError("teacher_cache needs forget_loss_type KL")
        # The checks the temperature module owns (teacher_eos, tau_sweep, collapse_guard), and
        # the cache's storage types: one place each.
        from asu_simu_plugin.tau_sweep import check_method_arguments
        from asu_simu_plugin.teacher_cache import storage_dtype

        try:
            check_method_arguments(
                self.temperature, self.layers, self.teacher_eos, self.tau_sweep, self.collapse_guard
            )
            storage_dtype(self.teacher_cache_dtype)
        except ValueError as error:
            raise MethodArgumentError(str(error)) from None


@dataclass
class SophiaArguments(MethodArguments):
    """`methods.sophia.SophiaMixin` (SophiaG settings; lr and weight decay are training settings)."""

    HESSIAN_MODES = ("gnb", "grad2")

    betas: tuple[float, float] = field(
        default=(0.965, 0.99), metadata=_help("SophiaG (beta1, beta2), each in [0, 1)")
    )
    rho: float = field(default=0.04, metadata=_help("SophiaG clipping scale (> 0)"))
    hessian_mode: str = field(
        default="gnb", metadata=_help("gnb (Sophia-G, sampled labels) | grad2 (SOUL)")
    )
    hessian_interval: int = field(
        default=10, metadata=_help("gnb: refresh the Hessian every k optimizer steps (>= 1)")
    )
    soul_compat: bool = field(default=False, metadata=_help("SOUL's quirks (grad2 only)"))
    sophia_bs: int | None = field(
        default=None, metadata=_help("Sophia bs; null = sampled label tokens (gnb) / 5120 (grad2)")
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.betas, list | tuple) or len(self.betas) != 2:
            raise MethodArgumentError(f"betas must be two numbers [b1, b2] (got {self.betas!r})")
        for beta in self.betas:
            check_number("betas entry", beta, 0)
            if not beta < 1:
                raise MethodArgumentError(f"betas entries must be < 1 (got {self.betas!r})")
        check_number("rho", self.rho, above=0)
        check_choice("hessian_mode", self.hessian_mode, self.HESSIAN_MODES)
        check_integer("hessian_interval", self.hessian_interval, 1)
        check_bool("soul_compat", self.soul_compat)
        if self.soul_compat and self.hessian_mode != "grad2":
            raise MethodArgumentError("soul_compat=true reproduces SOUL, which uses grad2")
        check_integer("sophia_bs", self.sophia_bs, 1, optional=True)


@dataclass
class SOGradDiffArguments(SophiaArguments, GradDiffArguments):
    """SOGradDiff: GradDiff's arguments plus Sophia's."""


@dataclass
class SONPOArguments(SophiaArguments, NPOArguments):
    """SONPO: NPO's arguments plus Sophia's."""


@dataclass
class SIMUArguments(SOGradDiffArguments):
    """`methods.simu.SIMUMixin`: neuron attribution and masks, on SOGradDiff."""

    MODES = ("dual", "forget_only")

    ATTRIBUTIONS = ("per_token", "sequence")

    steps: int = field(
        default=5, metadata=_help("integrated-gradients Riemann steps (>= 1; the paper uses 5)")
    )
    threshold: float = field(
        default=0.3, metadata=_help("critical iff attribution > threshold * layer max; (0, 1]")
    )
    mode: str = field(default="dual", metadata=_help("dual | forget_only (drop retain-critical)"))
    attribution: str = field(
        default="per_token",
        metadata=_help("per_token (one sample per answer token, the paper) | sequence"),
    )
    mask_path: str | None = field(
        default=None, metadata=_help("reuse a saved simu_masks.safetensors instead of attributing")
    )
    attribution_batch_size: int | None = field(
        default=None, metadata=_help("attribution batch size; null = the training batch size")
    )
    attribution_max_batches: int | None = field(
        default=None, metadata=_help("attribute on the first N batches only; null = all")
    )

    def __post_init__(self):
        super().__post_init__()
        check_integer("steps", self.steps, 1)
        check_number("threshold", self.threshold, maximum=1, above=0)
        check_choice("mode", self.mode, self.MODES)
        check_choice("attribution", self.attribution, self.ATTRIBUTIONS)
        check_readable_file("mask_path", self.mask_path)
        check_integer("attribution_batch_size", self.attribution_batch_size, 1, optional=True)
        check_integer("attribution_max_batches", self.attribution_max_batches, 1, optional=True)


# trainer class name -> its arguments
METHOD_ARGUMENTS: dict[str, type[MethodArguments]] = {
    "ASU": ASUArguments,
    "SIMU": SIMUArguments,
    "SOGradDiff": SOGradDiffArguments,
    "SONPO": SONPOArguments,
    "StandaloneGradDiff": GradDiffArguments,
    "StandaloneNPO": NPOArguments,
    "GradDiff": GradDiffArguments,
    "NPO": NPOArguments,
}


def parse_method_arguments(trainer_name: str, values: dict, accepted=()) -> MethodArguments:
    """Check `values` (e.g. from `--set`) for trainer `trainer_name`; returns the dataclass.

    Unknown keys are refused with the list of valid ones. `accepted`: further keys the trainer
    takes (from its live signature) that have no field yet; they pass unchecked.
    """
    cls = METHOD_ARGUMENTS[trainer_name]
    names = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(names) - set(accepted))
    if unknown:
        valid = sorted(set(names) | set(accepted))
        raise MethodArgumentError(
            f"unknown method argument{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(unknown)} for {trainer_name}; valid: {', '.join(valid)}"
        )
    return cls(**{k: v for k, v in values.items() if k in names})


# Constructor keywords of the bases that are harness plumbing, not method arguments.
NOT_METHOD_ARGUMENTS = ("evaluators", "template_args")


def signature_defaults(trainer_class) -> dict:
    """{keyword: default} that `trainer_class`'s own `__init__`s take, above transformers.Trainer.

    The live counterpart of the dataclasses: what the mixins and the base accept today.
    """
    import inspect

    from transformers import Trainer

    found = {}
    for klass in trainer_class.__mro__:
        if klass is Trainer or klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for name, param in inspect.signature(init).parameters.items():
            if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or name == "self":
                continue
            if name in NOT_METHOD_ARGUMENTS or param.default is inspect.Parameter.empty:
                continue
            found.setdefault(name, param.default)
    return found
