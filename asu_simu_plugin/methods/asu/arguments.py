"""ASU's arguments: the trainer's input, with their defaults and checks (one place each)."""

from __future__ import annotations

from dataclasses import dataclass, field

from asu_simu_plugin.arguments import (
    AUTO,
    GradDiffArguments,
    MethodArgumentError,
    check_bool,
    check_choice,
    check_integer,
    check_layer_ids,
    check_layers_exist,
    check_number,
    check_regexes,
    help_text,
)

TEACHER_EOS = ("keep", "suppress")


@dataclass
class ASUArguments(GradDiffArguments):
    """Attention Smoothing Unlearning (`asu_simu_plugin.methods.asu.trainer.ASUMixin`)."""

    RETAIN_LOSS_TYPES = ("NLL", "KL", "KL_ALL", "EMBED_MSE")
    FORGET_LOSS_TYPES = ("KL", "EMBED_MSE")

    temperature: float | str = field(
        default=2.3, metadata=help_text('forget-teacher attention temperature tau (> 0), or "auto"')
    )
    layers: list[int] | str | None = field(
        default=None, metadata=help_text('0-based decoder layers to smooth; null = all, or "auto"')
    )
    forget_loss_type: str = field(default="KL", metadata=help_text("KL | EMBED_MSE (WMDP variant)"))
    embed_layer: int = field(
        default=7, metadata=help_text("layer whose hidden states EMBED_MSE uses")
    )
    trainable_params_regex: list[str] | str | None = field(
        default=None, metadata=help_text("regexes of parameter names to train; null = all")
    )
    teacher_eos: str = field(
        default="keep",
        metadata=help_text("keep | suppress: drop the teacher's end-of-answer tokens mid-answer"),
    )
    tau_sweep: dict | None = field(
        default=None, metadata=help_text('settings of temperature/layers "auto" (null = defaults)')
    )
    collapse_guard: dict | bool | None = field(
        default=None, metadata=help_text("settings of the silent-teacher check; false = off")
    )
    teacher_cache: bool = field(
        default=False, metadata=help_text("compute the teacher's outputs once, reuse every epoch")
    )
    teacher_cache_dtype: str = field(
        default="float16", metadata=help_text("storage of the caches: float16 | bfloat16 | float32")
    )
    reference_cache: bool = field(
        default=False,
        metadata=help_text(
            "retain_loss_type KL: the original's retain outputs computed once, cached"
        ),
    )
    module_regex: str | None = field(
        default=None, metadata=help_text("RMU key of the harness's WMDP experiment (unused)")
    )
    steering_coeff: float | None = field(
        default=None, metadata=help_text("RMU key of the harness's WMDP experiment (unused)")
    )

    def __post_init__(self):
        super().__post_init__()
        if self.temperature != AUTO:
            if isinstance(self.temperature, str):
                raise MethodArgumentError(
                    f"temperature must be a finite number > 0 or 'auto' (got {self.temperature!r});"
                    " the paper's TOFU setting is temperature=2.3 layers=null"
                )
            check_number("temperature", self.temperature, above=0)
            if self.temperature == 1:
                raise MethodArgumentError(
                    "temperature=1 leaves the attention as it is, so the forget-teacher is the "
                    "model itself and nothing is unlearned: use a temperature > 1 (the paper's "
                    'TOFU setting is 2.3) or "auto"'
                )
        check_layer_ids("layers", self.layers, allow_auto=True)
        check_choice("forget_loss_type", self.forget_loss_type, self.FORGET_LOSS_TYPES)
        if AUTO in (self.temperature, self.layers) and self.forget_loss_type != "KL":
            # The sweep scores the teacher's answer tokens; the embedding variant matches hidden
            # states at `embed_layer`, which layers above it do not even change.
            raise MethodArgumentError(
                "temperature/layers 'auto' chooses them for the KL forget loss; with "
                f"forget_loss_type={self.forget_loss_type} give a temperature and layers <= "
                "embed_layer"
            )
        check_integer("embed_layer", self.embed_layer, 0)
        check_regexes("trainable_params_regex", self.trainable_params_regex)
        check_choice("teacher_eos", self.teacher_eos, TEACHER_EOS)
        check_number("steering_coeff", self.steering_coeff, optional=True)
        check_bool("teacher_cache", self.teacher_cache)
        if self.teacher_cache and self.forget_loss_type != "KL":
            raise MethodArgumentError(
                "teacher_cache needs forget_loss_type KL: it stores the teacher's output "
                "distributions, which only the KL "
                f"forget loss uses; set teacher_cache=false with forget_loss_type="
                f"{self.forget_loss_type}"
            )
        check_bool("reference_cache", self.reference_cache)
        if self.reference_cache and self.retain_loss_type != "KL":
            raise MethodArgumentError(
                "reference_cache needs retain_loss_type KL: it stores the original model's "
                "distributions at the retain answer tokens, which only KL reads (KL_ALL reads "
                f"every position); set reference_cache=false with retain_loss_type="
                f"{self.retain_loss_type}"
            )
        # The settings dataclasses of the sweep and the guard, and the cache's storage types,
        # are checked by the modules that own them.
        from asu_simu_plugin.methods.asu.collapse import CollapseGuardConfig
        from asu_simu_plugin.methods.asu.teacher_cache import storage_dtype
        from asu_simu_plugin.methods.asu.temperature import AutoTemperatureConfig, settings_of

        try:
            settings_of(AutoTemperatureConfig, self.tau_sweep, "tau_sweep")
            if self.collapse_guard is not False:
                settings_of(CollapseGuardConfig, self.collapse_guard, "collapse_guard")
            storage_dtype(self.teacher_cache_dtype)
        except ValueError as error:
            raise MethodArgumentError(str(error)) from None

    def check_model_config(self, config) -> None:
        count = getattr(config, "num_hidden_layers", None)
        if not count:
            return
        check_layers_exist("layers", self.layers, count)
        if self.uses_embeddings:
            check_layers_exist("embed_layer", self.embed_layer, count)

    @property
    def uses_embeddings(self) -> bool:
        return "EMBED_MSE" in (self.forget_loss_type, self.retain_loss_type)
