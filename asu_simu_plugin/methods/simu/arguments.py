"""SIMU's arguments: neuron attribution and masks, on the Sophia GradDiff arguments."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from asu_simu_plugin.arguments import (
    MethodArgumentError,
    check_choice,
    check_integer,
    check_readable_file,
    help_text,
)
from asu_simu_plugin.methods.simu.attribution import check_threshold
from asu_simu_plugin.methods.simu.masks import (
    load_masks,
    mask_files,
    mask_record,
    require_critical_neurons,
)
from asu_simu_plugin.methods.sophia import SOGradDiffArguments


@dataclass
class SIMUArguments(SOGradDiffArguments):
    """SIMU (`SIMUMixin`): neuron attribution and masks, on SOGradDiff's arguments."""

    MODES = ("dual", "forget_only")

    ATTRIBUTIONS = ("per_token", "sequence")

    steps: int = field(
        default=5, metadata=help_text("integrated-gradients Riemann steps (>= 1; the paper uses 5)")
    )
    threshold: float = field(
        default=0.3, metadata=help_text("critical iff attribution > threshold * layer max; (0, 1)")
    )
    mode: str = field(
        default="dual", metadata=help_text("dual | forget_only (drop retain-critical)")
    )
    attribution: str = field(
        default="per_token",
        metadata=help_text("per_token (one sample per answer token, the paper) | sequence"),
    )
    mask_path: str | None = field(
        default=None,
        metadata=help_text("reuse a saved simu_masks.safetensors instead of attributing"),
    )
    attribution_batch_size: int | None = field(
        default=None, metadata=help_text("attribution batch size; null = the training batch size")
    )
    attribution_max_batches: int | None = field(
        default=None, metadata=help_text("attribute on the first N batches only; null = all")
    )

    def __post_init__(self):
        super().__post_init__()
        check_integer("steps", self.steps, 1)
        check_threshold(self.threshold)
        check_choice("mode", self.mode, self.MODES)
        check_choice("attribution", self.attribution, self.ATTRIBUTIONS)
        if self.mask_path is not None:
            self._check_mask_file()
        check_integer("attribution_batch_size", self.attribution_batch_size, 1, optional=True)
        check_integer("attribution_max_batches", self.attribution_max_batches, 1, optional=True)

    def _check_mask_file(self):
        """A folder, a stem or either file of a saved mask: readable, with a critical neuron
        (its model is checked once the model is loaded, `masks.load_masks(..., model=)`)."""
        if not isinstance(self.mask_path, str | os.PathLike) or not str(self.mask_path):
            raise MethodArgumentError(f"mask_path must be a file path (got {self.mask_path!r})")
        tensors_path = mask_files(self.mask_path)[0]
        check_readable_file("mask_path", str(tensors_path))
        try:
            masks = load_masks(tensors_path)
            mask_record(tensors_path)
            require_critical_neurons(masks, str(tensors_path))
        except ValueError as error:
            raise MethodArgumentError(f"mask_path: {error}") from None
