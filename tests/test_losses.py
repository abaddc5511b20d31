"""Loss values against hand computations on tiny hand-written tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from asu_simu_plugin import losses


def softmax(row):
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p, q):
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


# B = 3 sequences, T = 4 positions, V = 3 words. Labels: -100 = not an answer token.
STUDENT = torch.tensor(
    [
        [[0.1, 0.2, 0.3], [1.0, -1.0, 0.0], [0.5, 0.5, -0.5], [2.0, 0.0, 1.0]],
        [[0.0, 1.0, 2.0], [-1.0, 0.0, 1.0], [0.3, -0.2, 0.1], [1.5, 1.0, 0.5]],
        [[0.2, 0.1, 0.0], [0.0, 0.0, 0.0], [1.0, 2.0, 3.0], [0.0, 1.0, 0.0]],
    ]
)
TEACHER = torch.tensor(
    [
        [[0.0, 0.0, 0.0], [0.5, 0.5, 0.0], [1.0, 0.0, -1.0], [0.0, 0.0, 0.0]],
        [[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.5], [0.0, 0.0, 0.0]],
        [[0.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 0.0]],
    ]
)
LABELS = torch.tensor(
    [
        [-100, -100, 1, 2],  # answer tokens at 2, 3 -> predicted from positions 1, 2
        [-100, 0, 2, -100],  # answer tokens at 1, 2 -> positions 0, 1
        [-100, -100, -100, -100],  # no answer: excluded from the mean over sequences
    ]
)


def hand_distillation():
    per_sequence = []
    for b in range(3):
        positions = [t for t in range(3) if LABELS[b, t + 1] != -100]
        if not positions:
            continue
        values = [
            kl(softmax(TEACHER[b, t].tolist()), softmax(STUDENT[b, t].tolist())) for t in positions
        ]
        per_sequence.append(sum(values) / len(values))
    return sum(per_sequence) / len(per_sequence)


def test_asu_distillation_matches_the_hand_computation():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    loss = losses.asu_distillation_loss(student, teacher, LABELS)
    assert float(loss) == pytest.approx(hand_distillation(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None  # the teacher is a fixed target
    assert student.grad[2].abs().sum() == 0  # the answer-less sequence contributes nothing
    assert student.grad[0, 3].abs().sum() == 0  # the last position predicts nothing


def test_distillation_is_zero_for_identical_models_and_refuses_empty_batches():
    assert float(losses.asu_distillation_loss(STUDENT, STUDENT, LABELS)) == pytest.approx(
        0, abs=1e-7
    )
    with pytest.raises(ValueError, match="no answer tokens"):
        losses.asu_distillation_loss(STUDENT, TEACHER, torch.full_like(LABELS, -100))


def test_retain_kl_masked_and_unmasked():
    masked = losses.retain_kl_loss(STUDENT, TEACHER, LABELS)
    assert float(masked) == pytest.approx(hand_distillation(), rel=1e-6)
    unmasked = losses.retain_kl_loss(STUDENT, TEACHER, LABELS, answer_tokens_only=False)
    # the harness's compute_kl_divergence: KL(reference ‖ model) averaged over all B·T positions
    expected = (
        sum(
            kl(softmax(TEACHER[b, t].tolist()), softmax(STUDENT[b, t].tolist()))
            for b in range(3)
            for t in range(4)
        )
        / 12
    )
    assert float(unmasked) == pytest.approx(expected, rel=1e-6)
    reference = F.kl_div(
        F.log_softmax(STUDENT, -1).view(-1, 3),
        F.log_softmax(TEACHER, -1).view(-1, 3),
        reduction="batchmean",
        log_target=True,
    )
    assert float(unmasked) == pytest.approx(float(reference), rel=1e-6)


def test_sequence_nll_and_npo():
    nll = losses.sequence_nll(STUDENT, LABELS)
    hand = []
    for b in range(3):
        total = 0.0
        for t in range(3):
            label = int(LABELS[b, t + 1])
            if label != -100:
                total -= math.log(softmax(STUDENT[b, t].tolist())[label])
        hand.append(total)
    torch.testing.assert_close(nll, torch.tensor(hand), rtol=1e-6, atol=1e-7)
    ref = losses.sequence_nll(TEACHER, LABELS)
    beta = 0.5
    log_ratio = -(nll - ref)
    expected = -2 / beta * sum(math.log(1 / (1 + math.exp(beta * float(r)))) for r in log_ratio) / 3
    assert float(losses.npo_loss(STUDENT, TEACHER, LABELS, beta)) == pytest.approx(
        expected, rel=1e-6
    )


def test_masked_hidden_mse():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [9.0, 9.0]]])
    target = torch.zeros_like(hidden)
    mask = torch.tensor([[1, 1], [1, 0]])
    # seq 0: mean(1,4)=2.5, mean(9,16)=12.5 -> 7.5; seq 1: only token 0 -> 0
    assert float(losses.masked_hidden_mse(hidden, target, mask)) == pytest.approx(3.75)
