"""ASU's collapse guard: before training, check that the forget-teacher still answers.

A teacher whose tempered attention makes it end the answer at once teaches the student to answer
with silence. On a sample of the forget set the guard measures the teacher's P(end of answer) at
the first answer token and its share of empty greedy answers, and warns above the limits.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

import torch

from asu_simu_plugin.arch import decoder_layers, resolve_layer_ids, unwrap_model
from asu_simu_plugin.attention import attention_temperature
from asu_simu_plugin.losses import IGNORE_INDEX
from asu_simu_plugin.methods.asu.temperature import (
    check_positive,
    layers_label,
    main_process_then_broadcast,
    measure_teacher,
    sample_items,
    settings_of,
    trainer_parts,
)

logger = logging.getLogger(__name__)


@dataclass
class CollapseGuardConfig:
    """Settings of the check, before training, that the forget-teacher still answers
    (`collapse_guard:` in the ASU method arguments; false switches it off)."""

    sample: int = field(default=16, metadata={"help": "forget rows checked"})
    max_end_probability: float = field(
        default=0.2, metadata={"help": "warn above this P(end of answer) at the first token"}
    )
    max_empty_share: float = field(
        default=0.2, metadata={"help": "warn above this share of empty greedy teacher answers"}
    )
    max_new_tokens: int = 8
    seed: int = 0

    def __post_init__(self):
        for name in ("sample", "max_new_tokens", "max_end_probability", "max_empty_share"):
            check_positive(getattr(self, name), f"collapse_guard.{name}")


def collapse_check(
    model, forget_dataset, temperature, layers, tokenizer=None, settings=None, end_ids=None
) -> dict:
    """P(end of answer) at the teacher's first answer token and the share of empty greedy teacher
    answers on a sample of the forget set, with the teacher tempered by (τ, layers)."""
    from asu_simu_plugin.diagnostics import (
        end_token_ids,
        greedy_continuations,
        is_empty_answer,
    )

    config = settings_of(CollapseGuardConfig, settings, "collapse_guard")
    model = unwrap_model(model)
    items = sample_items(forget_dataset, config.sample, config.seed)
    if end_ids is None:
        answer_ids = torch.cat([item["labels"][item["labels"] != IGNORE_INDEX] for item in items])
        end_ids = end_token_ids(tokenizer, model, answer_ids.tolist())
    layer_ids = resolve_layer_ids(layers, len(decoder_layers(model)))
    was_training = model.training
    model.eval()
    try:
        measured = measure_teacher(model, items, temperature, layer_ids, [], end_ids)
        with attention_temperature(model, float(temperature), layer_ids):
            answers = greedy_continuations(model, items, set(end_ids), config.max_new_tokens)
    finally:
        model.train(was_training)
    empty = sum(is_empty_answer(a, tokenizer) for a in answers)
    return {
        "temperature": float(temperature),
        "layers": layers_label(layer_ids, len(decoder_layers(model))),
        "end_probability": measured["end_probability"],
        "empty_answers": empty,
        "sample": len(items),
        "empty_share": empty / len(items),
    }


def collapse_warning(stats: dict, settings=None, teacher_eos: str = "keep") -> str | None:
    """The warning text when the teacher is collapsing into silence, else None."""
    config = settings_of(CollapseGuardConfig, settings, "collapse_guard")
    if (
        stats["end_probability"] <= config.max_end_probability
        and stats["empty_share"] <= config.max_empty_share
    ):
        return None
    fixes = "temperature=auto layers=auto (picked on the forget set), a smaller temperature, or fewer layers (e.g. the first third)"
    if teacher_eos != "suppress":
        fixes += ", or teacher_eos=suppress (the student then never learns to end early)"
    return (
        f"ASU collapse guard: the forget-teacher (temperature {stats['temperature']:g}, layers "
        f"{stats['layers']}) puts {stats['end_probability']:.2f} of its first answer token's "
        f"probability on ending the answer (limit {config.max_end_probability:g}) and answers "
        f"{stats['empty_answers']}/{stats['sample']} sampled forget questions with nothing "
        f"(limit {config.max_empty_share:.0%}): the student would learn to answer with silence. "
        f"Fix: {fixes}."
    )


def collapse_guard(
    model, forget_dataset, temperature, layers, tokenizer=None, settings=None,
    teacher_eos="keep", end_ids=None,
) -> dict | None:  # fmt: skip
    """Measure (rank 0, broadcast) and warn when the teacher would teach silence; returns the
    numbers (None when the guard is off, `settings=False`)."""
    if settings is False:
        return None

    def compute():
        stats = collapse_check(
            model, forget_dataset, temperature, layers, tokenizer, settings, end_ids
        )
        message = collapse_warning(stats, settings, teacher_eos)
        stats["warning"] = message
        if message:
            logger.warning(message)
            warnings.warn(message, stacklevel=3)
        return stats

    return main_process_then_broadcast(compute, model)


def guard_for_trainer(
    trainer, temperature, layers, settings=None, teacher_eos="keep", end_ids=None
):
    """The collapse guard of an ASU trainer (before training); None when off or no forget set."""
    if settings is False:
        return None
    model, tokenizer, forget, _ = trainer_parts(trainer)
    if forget is None:
        logger.info("ASU collapse guard skipped: the training set has no `forget` part")
        return None
    return collapse_guard(
        model, forget, temperature, layers, tokenizer, settings, teacher_eos, end_ids
    )
