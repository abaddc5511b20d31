"""IDK — the ASU paper's "I don't know" baseline (from the "closer look" code): on forget
questions the model learns a refusal drawn from the harness's `data/idk.jsonl` (NLL on the
`alternate` answer of the harness's `QAwithIdkDataset`), plus a retain loss:
NLL (IDK+GD), KL (IDK+KL) or AP (IDK+AP, answer preservation):

  AP = −(1/β) · mean log σ(β · (NLL(refusal | retain question) − NLL(answer | retain question)))

with sequence-summed NLLs: the retain answer is kept more likely than a refusal. AP reads the
retain batch's `original` and `alternate` (a `QAwithIdkDataset` on the retain split,
`data/datasets/TOFU_QA_retain_idk`). Official forget weight 1.0, β 0.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from asu_simu_plugin import losses
from asu_simu_plugin.arguments import GradDiffArguments, check_number
from asu_simu_plugin.methods.base import UnlearnMethodMixin, model_inputs
from asu_simu_plugin.registry import register_method


def answer_preservation_loss(
    answer_logits: torch.Tensor,
    answer_labels: torch.Tensor,
    refusal_logits: torch.Tensor,
    refusal_labels: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """AP: −(1/β) · mean log σ(β · (NLL_refusal − NLL_answer)), NLLs summed per sequence."""
    answer = losses.sequence_nll(answer_logits, answer_labels)
    refusal = losses.sequence_nll(refusal_logits, refusal_labels)
    return -F.logsigmoid(beta * (refusal - answer)).mean() / beta


def original_of(batch: dict) -> dict:
    """The plain QA part of a batch (a `QAwithIdkDataset` batch nests it under `original`)."""
    return batch["original"] if "original" in batch else batch


def refusal_of(batch: dict, split: str) -> dict:
    if "alternate" not in batch:
        raise ValueError(
            f"IDK needs {split} batches with a refusal (`alternate`): the harness's "
            f"QAwithIdkDataset (data TOFU_QA_{split}_idk; experiment=unlearn/tofu/paper/IDK_GD)"
        )
    return model_inputs(batch["alternate"])


@dataclass
class IDKArguments(GradDiffArguments):
    """IDK's arguments: GradDiff's, AP as a further retain loss, and AP's β."""

    RETAIN_LOSS_TYPES = ("NLL", "KL", "KL_ALL", "AP")

    retain_loss_type: str = field(
        default="NLL",
        metadata={"help": "NLL (IDK+GD) | KL | KL_ALL (IDK+KL) | AP (answer preservation)"},
    )
    beta: float = field(default=0.1, metadata={"help": "AP's inverse temperature (> 0)"})

    def __post_init__(self):
        super().__post_init__()
        check_number("beta", self.beta, above=0)


class IDKMixin(UnlearnMethodMixin):
    """loss = gamma · NLL(refusal | forget question) + alpha · retain loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:  # evaluation batches keep the plain LM loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        refusal_outputs = model(**refusal_of(inputs["forget"], "forget"))
        forget_loss = refusal_outputs.loss
        retain = inputs["retain"]
        if self.retain_loss_type == "AP":
            answer = model_inputs(original_of(retain))
            refusal = refusal_of(retain, "retain")
            retain_loss = answer_preservation_loss(
                model(**answer).logits,
                answer["labels"],
                model(**refusal).logits,
                refusal["labels"],
                self.method_args.beta,
            )
        else:
            retain_loss = self.retain_objective(model, model_inputs(original_of(retain)))
        self.track("idk/forget_loss", forget_loss)
        self.track("idk/retain_loss", retain_loss)
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, refusal_outputs) if return_outputs else loss


register_method(
    "IDK",
    mixin=IDKMixin,
    arguments=IDKArguments,
    config="IDK",
    summary="I-don't-know (ASU paper baseline): NLL towards a refusal; retain NLL, KL or AP",
)
