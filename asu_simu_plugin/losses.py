"""Unlearning losses, harness-free: plain functions of logits, labels and hidden states.

Conventions (the harness's and transformers'): `labels` is -100 wherever a token is not an answer
token (prompt, padding); logits at position t predict token t+1, so every per-token quantity is
computed on `logits[:, :-1]` against `labels[:, 1:]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def answer_token_mask(labels: torch.Tensor) -> torch.Tensor:
    """Bool mask [B, T-1] of the positions whose logits predict an answer token."""
    return labels[:, 1:] != IGNORE_INDEX


def mean_over_answer_tokens(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over each sequence's answer tokens, then mean over the sequences that have any.

    Every sequence weighs the same whatever its answer length (the ASU paper's reduction).
    """
    mask = answer_token_mask(labels).to(per_token.dtype)
    tokens_per_sequence = mask.sum(dim=1)
    has_answer = tokens_per_sequence > 0
    if not bool(has_answer.any()):
        raise ValueError(
            "no answer tokens in this batch (every label is -100): the forget/retain examples "
            "must keep labels on their answers; check max_length truncation and the template"
        )
    per_sequence = (per_token * mask).sum(dim=1)[has_answer] / tokens_per_sequence[has_answer]
    return per_sequence.mean()


def token_kl(target_logits: torch.Tensor, model_logits: torch.Tensor) -> torch.Tensor:
    """KL(target ‖ model) over the full vocabulary at every position of the shifted sequence.

    Returns [B, T-1]. Computed in fp32 so bf16 logits do not make the KL negative.
    """
    target = F.log_softmax(target_logits[:, :-1].float(), dim=-1)
    model = F.log_softmax(model_logits[:, :-1].float(), dim=-1)
    return F.kl_div(model, target, reduction="none", log_target=True).sum(dim=-1)


def suppress_end_of_answer(
    teacher_logits: torch.Tensor, labels: torch.Tensor, end_token_ids
) -> torch.Tensor:
    """The teacher's logits with the end-of-answer token(s) removed where the answer goes on.

    At every position whose logits predict an answer token that comes before the answer's first
    end token (eos / end-of-turn), the end tokens get probability 0 and the other tokens keep
    their relative probabilities (renormalised: p'_v = p_v / (1 − Σ_end p)). Positions predicting
    the end token itself, anything after it, and non-answer positions are unchanged. Why: a
    smoothed teacher that puts its mass on ending the turn at once would teach the student to
    answer forget questions with silence; the student should learn a fluent non-answer instead.

    Returns fp32 logits of the same shape; a removed token's logit is the most negative finite
    float, so `token_kl` stays finite (its probability is exactly 0).
    """
    logits = teacher_logits.detach().float().clone()
    ids = torch.as_tensor(list(end_token_ids), dtype=torch.long, device=logits.device)
    if ids.numel() == 0:
        return logits
    targets = labels[:, 1:]
    answer = targets != IGNORE_INDEX
    is_end = torch.isin(targets, ids) & answer
    before_end = answer & (is_end.long().cumsum(dim=1) == 0)
    positions = torch.zeros(labels.shape, dtype=torch.bool, device=logits.device)
    positions[:, :-1] = before_end
    columns = logits[..., ids]
    logits[..., ids] = columns.masked_fill(positions.unsqueeze(-1), torch.finfo(logits.dtype).min)
    return logits


def asu_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """ASU forget loss: forward KL(smoothed teacher ‖ student) on the answer positions.

    Mean over answer tokens within each sequence, then mean over sequences that have any.
    The teacher is fixed, so the loss is ≥ 0 and no gradient ascent is involved.
    """
    return mean_over_answer_tokens(token_kl(teacher_logits.detach(), student_logits), labels)


def retain_kl_loss(
    model_logits: torch.Tensor,
    reference_logits: torch.Tensor,
    labels: torch.Tensor,
    answer_tokens_only: bool = True,
) -> torch.Tensor:
    """KL(original ‖ model) on retain data.

    `answer_tokens_only=True` (our default) masks it like the forget loss. The harness's
    `compute_kl_divergence` instead averages over all B·T positions, prompt and padding
    included (`answer_tokens_only=False` reproduces it exactly): with short answers that spends
    most of the retain budget on padding and question tokens.
    """
    if answer_tokens_only:
        return mean_over_answer_tokens(token_kl(reference_logits.detach(), model_logits), labels)
    target = F.log_softmax(reference_logits.detach().float(), dim=-1).flatten(0, 1)
    model = F.log_softmax(model_logits.float(), dim=-1).flatten(0, 1)
    return F.kl_div(model, target, reduction="batchmean", log_target=True)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed answer-token NLL per sequence, [B] (the harness's `compute_batch_nll`)."""
    shifted = labels[:, 1:]
    nll = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return nll.sum(dim=-1)


def npo_loss(
    model_logits: torch.Tensor, reference_logits: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """NPO forget loss: -(2/β)·mean log σ(-β·(logπ_θ(y|x) − logπ_ref(y|x)))."""
    log_ratio = -(sequence_nll(model_logits, labels) - sequence_nll(reference_logits, labels))
    return -2.0 / beta * F.logsigmoid(-beta * log_ratio).mean()


def masked_hidden_mse(
    hidden: torch.Tensor, target: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """RMU-style activation loss: mean squared error per token over the hidden size, averaged
    over each sequence's non-padding tokens, then over the batch."""
    squared = (hidden.float() - target.detach().float()).pow(2).mean(dim=-1)
    mask = attention_mask.to(squared.dtype)
    per_sequence = (squared * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
    return per_sequence.mean()
