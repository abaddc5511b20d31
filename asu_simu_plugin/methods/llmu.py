"""LLMU — "Large Language Model Unlearning" (Yao et al.) as the ASU paper runs it (from the
"closer look" code): gradient ascent on forget answers, plus NLL on mismatched pairs (each forget
question with the answer of the retain row beside it in the batch, as the official data module
pairs them) and KL to the original on retain data:

  loss = gamma · (−NLL forget) + alpha · (NLL mismatch + retain loss)

The official retain KL covers every position (its second `kl_loss` definition wins): KL_ALL, the
default here. The mismatched pairs are built from the batch's own tokens (`mismatch_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from asu_simu_plugin.arguments import GradDiffArguments
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.base import UnlearnMethodMixin, model_inputs
from asu_simu_plugin.registry import register_method


def mismatch_batch(forget: dict, retain: dict, pad_token_id: int = 0) -> dict:
    """Row i: the prompt of forget row i (its tokens before the first answer token) followed by
    the answer tokens of retain row i, labelled as the answer; right-padded."""
    rows = []
    for i in range(forget["input_ids"].shape[0]):
        answer_at = (forget["labels"][i] != IGNORE_INDEX).nonzero()
        start = int(answer_at[0]) if len(answer_at) else forget["labels"].shape[1]
        keep = forget["attention_mask"][i, :start].bool()
        prompt = forget["input_ids"][i, :start][keep]
        answer = retain["input_ids"][i][retain["labels"][i] != IGNORE_INDEX]
        rows.append((prompt, answer))
    length = max(len(p) + len(a) for p, a in rows)
    device = forget["input_ids"].device
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long, device=device)
    labels = torch.full_like(ids, IGNORE_INDEX)
    attention = torch.zeros_like(ids)
    for i, (prompt, answer) in enumerate(rows):
        n, m = len(prompt), len(answer)
        ids[i, : n + m] = torch.cat([prompt, answer])
        labels[i, n : n + m] = answer
        attention[i, : n + m] = 1
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


@dataclass
class LLMUArguments(GradDiffArguments):
    """LLMU's arguments: GradDiff's, with the official all-position KL as the retain loss."""

    retain_loss_type: str = field(
        default="KL_ALL",
        metadata={"help": "retain loss beside the mismatch NLL: KL_ALL (official) | KL | NLL"},
    )


class LLMUMixin(UnlearnMethodMixin):
    """loss = gamma · (−NLL forget) + alpha · (NLL mismatch + retain loss)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, **kwargs):
        if "forget" not in inputs:  # evaluation batches keep the plain LM loss
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        forget = model_inputs(inputs["forget"])
        retain = model_inputs(inputs["retain"])
        forget_outputs = model(**forget)
        forget_loss = -forget_outputs.loss
        mismatch_loss = model(**mismatch_batch(forget, retain)).loss
        retain_loss = self.retain_objective(model, retain)
        self.track("llmu/forget_nll", -forget_loss)
        self.track("llmu/mismatch_loss", mismatch_loss)
        self.track("llmu/retain_loss", retain_loss)
        loss = self.gamma * forget_loss + self.alpha * (mismatch_loss + retain_loss)
        return (loss, forget_outputs) if return_outputs else loss


register_method(
    "LLMU",
    mixin=LLMUMixin,
    arguments=LLMUArguments,
    config="LLMU",
    summary="LLMU (ASU paper baseline): gradient ascent + mismatched-answer NLL + KL",
)
