"""SIMU — Selective Influence Machine Unlearning (Agarwal et al., 2025).

1. Before training, integrated-gradients attribution on the forget set finds, per layer, the MLP
   neurons (input dimensions of `down_proj`) that carry it (`attribution`).
2. Training is second-order GradDiff (SophiaG) restricted to: every attention projection, fully,
   and the `down_proj` columns of the critical neurons. Every other parameter is frozen; inside
   `down_proj` the masked-out columns keep value, momentum and Hessian bit-identical (the
   paper's "triple masking", weight decay included) and their gradients are zeroed so they do
   not count towards gradient clipping.

The masks are saved beside the model (`simu_masks.safetensors`, `simu_masks.json`,
`simu_masks.png`; `masks`) and can be reused with `mask_path`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from asu_simu_plugin.arch import (
    attention_projection_names,
    decoder_layers,
    down_projection,
    unwrap_model,
)
from asu_simu_plugin.lora import is_lora_model
from asu_simu_plugin.methods.simu.attribution import (
    critical_neuron_masks,
    neuron_attributions,
)
from asu_simu_plugin.methods.simu.masks import (
    load_masks,
    mask_record,
    model_record,
    plot_mask_counts,
    require_critical_neurons,
    save_masks,
)
from asu_simu_plugin.methods.sophia.trainer import SophiaMixin
from asu_simu_plugin.zero import whole_parameters

MASK_FILE = "simu_masks"


def _qualified_parameter_name(model, parameter) -> str:
    for name, param in model.named_parameters():
        if param is parameter:
            return name
    raise LookupError("parameter is not part of the model")


class SIMUMixin(SophiaMixin):
    """Neuron-masked Sophia GradDiff.

    Its settings, besides the Sophia and GradDiff ones, are `self.method_args`' SIMU fields
    (`asu_simu_plugin.methods.simu.arguments`): `steps` (integrated-gradients Riemann steps, 5 as
    in the paper), `threshold` (t: critical iff attribution > t · layer max, 0.3), `mode` ("dual":
    keep neurons also critical on the retain set; "forget_only": drop them), `attribution`
    ("per_token": one sample per answer token, the paper's definition; "sequence": the whole
    sequence scaled at once), `mask_path` (reuse a saved `simu_masks.safetensors` made for this
    model instead of attributing), `attribution_batch_size` (default: the training batch size),
    `attribution_max_batches`.

    With several processes (DDP, DeepSpeed) each rank attributes every world_size-th batch and
    the scores are summed over ranks, so every rank derives the same masks; under ZeRO-3 the
    attribution runs with the parameters gathered.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if is_lora_model(self.model):
            raise ValueError(
                "SIMU does not run on a LoRA model: it trains chosen down_proj columns of the full "
                "weights, which LoRA freezes. Load the model without LoRACausalLM for SIMU."
            )
        settings = self.method_args
        self.simu_steps = int(settings.steps)
        self.simu_threshold = float(settings.threshold)
        self.simu_mode = settings.mode
        self.simu_attribution = settings.attribution
        self.attribution_batch_size = (
            settings.attribution_batch_size or self.args.per_device_train_batch_size
        )
        self.attribution_max_batches = settings.attribution_max_batches
        self.neuron_masks = self._masks(settings.mask_path)
        self._down_proj_masks = self._select_trainable_parameters()
        self._save_masks(Path(self.args.output_dir))

    # -- the masks -----------------------------------------------------------------------------
    def _attribution_spans(self, dataset) -> list[tuple[int, int]]:
        """(start, stop) rows of every attribution batch, over all ranks."""
        if dataset is None or len(dataset) == 0:
            raise ValueError("the forget set is empty: SIMU has nothing to attribute")
        size = int(self.attribution_batch_size)
        spans = [(i, min(i + size, len(dataset))) for i in range(0, len(dataset), size)]
        if self.attribution_max_batches:
            spans = spans[: int(self.attribution_max_batches)]
        return spans

    def _attribution_batches(self, dataset):
        """This rank's share: every num_processes-th batch, starting at its index."""
        device = self.accelerator.device
        share = self._attribution_spans(dataset)[
            self.accelerator.process_index :: self.accelerator.num_processes
        ]
        for start, stop in share:
            batch = self.data_collator([dataset[i] for i in range(start, stop)])
            yield {
                k: v.to(device)
                for k, v in batch.items()
                if k in ("input_ids", "attention_mask", "labels")
            }

    def _attribute(self, dataset) -> dict[int, torch.Tensor]:
        model = unwrap_model(self.model)
        with whole_parameters(model):
            return neuron_attributions(
                model,
                self._attribution_batches(dataset),
                steps=self.simu_steps,
                attribution=self.simu_attribution,
                distributed=self.accelerator.num_processes > 1,
                progress=self.accelerator.is_main_process,
            )

    def _masks(self, mask_path) -> dict[int, torch.Tensor]:
        """The critical-neuron masks (the same on every rank) and `self.mask_settings`, what
        made them (saved beside the model)."""
        model = unwrap_model(self.model)
        if mask_path:
            masks = load_masks(mask_path, model=model)
            made = mask_record(mask_path) or {}
            made.pop("model", None)
            self.mask_settings = {**made, "mask_path": str(mask_path)}
            return masks
        forget = getattr(self.train_dataset, "forget", None)
        retain = getattr(self.train_dataset, "retain", None)
        dual = self.simu_mode != "forget_only"
        forget_attr = self._attribute(forget)
        retain_attr = None if dual else self._attribute(retain)
        masks = critical_neuron_masks(
            forget_attr, self.simu_threshold, retain_attributions=retain_attr, mode=self.simu_mode
        )
        require_critical_neurons(
            masks, f"SIMU attribution (threshold {self.simu_threshold}, mode {self.simu_mode})"
        )

        def rows(dataset):
            return sum(stop - start for start, stop in self._attribution_spans(dataset))

        self.mask_settings = {
            "steps": self.simu_steps,
            "threshold": self.simu_threshold,
            "mode": self.simu_mode,
            "attribution": self.simu_attribution,
            "forget_rows": rows(forget),
            "retain_rows": None if dual else rows(retain),
            "attribution_batch_size": int(self.attribution_batch_size),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "processes": self.accelerator.num_processes,
        }
        return masks

    def _select_trainable_parameters(self) -> dict[str, torch.Tensor]:
        """Freeze everything but attention projections and critical down_proj columns."""
        model = unwrap_model(self.model)
        attention = set(attention_projection_names(model))
        down_proj_masks = {}
        for layer_id, layer in enumerate(decoder_layers(model)):
            critical = self.neuron_masks.get(layer_id)
            if critical is None or not bool(critical.any()):
                continue
            weight = down_projection(layer).weight
            name = _qualified_parameter_name(model, weight)
            down_proj_masks[name] = critical.to(weight.device).view(1, -1)
        for name, param in model.named_parameters():
            param.requires_grad_(name in attention or name in down_proj_masks)
        parameters = dict(model.named_parameters())
        for name, mask in down_proj_masks.items():
            # Zero the gradient of frozen columns, so clipping sees only what is trained.
            parameters[name].register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype))
        return down_proj_masks

    def parameter_masks(self) -> dict[str, torch.Tensor]:
        return self._down_proj_masks

    def _save_masks(self, output_dir: Path) -> None:
        # Every rank takes part in the fingerprint (a collective gather under ZeRO-3).
        metadata = {**self.mask_settings, "model": model_record(self.model)}
        if not self.accelerator.is_main_process:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        save_masks(self.neuron_masks, output_dir / MASK_FILE, metadata)
        plot_mask_counts(self.neuron_masks, output_dir / f"{MASK_FILE}.png")
