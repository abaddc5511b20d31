"""ME — maximum-entropy unlearning (the ASU paper's baseline, from the "closer look" code):
on forget data the model's next-token distributions are pulled towards the uniform one,
KL(uniform ‖ p_θ), averaged over the tokens of the batch; plus the retain loss (ME+GD: NLL,
ME+KL: KL to the original). Official forget weight 0.1.

The official code runs ME with `mask: false`: its forget labels are the whole padded sequence, so
the KL covers every position (question, answer and padding). `positions: all` does the same on
the harness's batches, which are padded to their longest row rather than to a fixed length;
`positions: answer` keeps the answer tokens only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from asu_simu_plugin import losses
from asu_simu_plugin.arguments import GradDiffArguments, check_choice
from asu_simu_plugin.methods.base import UnlearnMethodMixin, model_inputs
from asu_simu_plugin.registry import register_method

POSITIONS = ("all", "answer")


def uniform_kl_loss(
    logits: torch.Tensor, labels: torch.Tensor | None = None, positions: str = "all"
) -> torch.Tensor:
    """KL(uniform ‖ softmax(logits)) per predicting position, mean over the batch's positions
    (every position of logits[:, :-1], or those predicting an answer token).

    KL(u ‖ p) = Σ_v (1/V)(log(1/V) − log p_v) = −log V − mean_v log p_v.
    """
    log_probs = F.log_softmax(logits[:, :-1].float(), dim=-1)
    per_token = -math.log(log_probs.shape[-1]) - log_probs.mean(dim=-1)  # [B, T-1]
    if positions == "all":
        return per_token.mean()
    mask = losses.answer_token_mask(labels).to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


@dataclass
class MEArguments(GradDiffArguments):
    """ME's arguments: GradDiff's (forget weight 0.1 as the official configs) plus positions."""

    gamma: float = field(default=0.1, metadata={"help": "forget (maximum-entropy) weight (>= 0)"})
    positions: str = field(
        default="all",
        metadata={
            "help": "all: every position, as the official mask=false | answer: answer tokens"
        },
    )

    def __post_init__(self):
        super().__post_init__()
        check_choice("positions", self.positions, POSITIONS)


class MEMixin(UnlearnMethodMixin):
    """loss = gamma · KL(uniform ‖ p_θ) on forget + alpha · retain loss."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:  # evaluation batches keep the plain LM loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        forget = model_inputs(inputs["forget"])
        forget_outputs = model(**model_inputs(forget, with_labels=False))
        forget_loss = uniform_kl_loss(
            forget_outputs.logits, forget["labels"], self.method_args.positions
        )
        retain_loss = self.retain_objective(model, model_inputs(inputs["retain"]))
        self.track("me/forget_loss", forget_loss)
        self.track("me/retain_loss", retain_loss)
        loss = self.gamma * forget_loss + self.alpha * retain_loss
        return (loss, forget_outputs) if return_outputs else loss


register_method(
    "ME",
    mixin=MEMixin,
    arguments=MEArguments,
    config="ME",
    summary="maximum entropy (ASU paper baseline): forget predictions pulled to uniform",
)
