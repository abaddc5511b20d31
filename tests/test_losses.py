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
        [-100, -100, 1, 2],  # 2 answer tokens (2, 3), predicted from positions 1, 2
        [-100, 0, 2, 1],  # 3 answer tokens (1, 2, 3), predicted from positions 0, 1, 2
        [-100, -100, -100, -100],  # no answer: left out of the mean over sequences
    ]
)
B, T, V = STUDENT.shape


def answer_positions(b):
    """Positions t whose logits predict an answer token (label at t + 1 is not -100)."""
    return [t for t in range(T - 1) if LABELS[b, t + 1] != -100]


def position_kl(target, model, b, t):
    return kl(softmax(target[b, t].tolist()), softmax(model[b, t].tolist()))


def hand_distillation(target=TEACHER, model=STUDENT):
    """Mean KL over each sequence's answer positions, then mean over sequences that have any."""
    per_sequence = []
    for b in range(B):
        positions = answer_positions(b)
        if positions:
            values = [position_kl(target, model, b, t) for t in positions]
            per_sequence.append(sum(values) / len(values))
    return sum(per_sequence) / len(per_sequence)


def test_asu_distillation_matches_the_hand_computation():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    loss = losses.asu_distillation_loss(student, teacher, LABELS)
    assert loss.item() == pytest.approx(hand_distillation(), rel=1e-6)

    # The fixture tells the two reductions apart: pooling all answer tokens of the batch (the
    # muse fork's reduction) gives another number, so the test checks the per-sequence mean.
    pooled = [position_kl(TEACHER, STUDENT, b, t) for b in range(B) for t in answer_positions(b)]
    assert abs(sum(pooled) / len(pooled) - hand_distillation()) > 1e-2


def test_distillation_gradient_reaches_the_student_only():
    student = STUDENT.clone().requires_grad_(True)
    teacher = TEACHER.clone().requires_grad_(True)
    losses.asu_distillation_loss(student, teacher, LABELS).backward()
    assert teacher.grad is None  # the teacher is a fixed target

    # d KL(p ‖ softmax(s)) / ds = softmax(s) − p, weighted by 1 / (|A_b| · sequences with answers)
    sequences = sum(1 for b in range(B) if answer_positions(b))
    expected = torch.zeros(B, T, V)
    for b in range(B):
        positions = answer_positions(b)
        for t in positions:
            q, p = softmax(STUDENT[b, t].tolist()), softmax(TEACHER[b, t].tolist())
            for v in range(V):
                expected[b, t, v] = (q[v] - p[v]) / (len(positions) * sequences)
    torch.testing.assert_close(student.grad, expected, rtol=1e-5, atol=1e-7)
    assert student.grad[2].abs().sum() == 0  # the answer-less sequence contributes nothing
    assert student.grad[:, T - 1].abs().sum() == 0  # the last position predicts nothing


def test_distillation_is_zero_for_identical_models_and_never_negative():
    assert losses.asu_distillation_loss(STUDENT, STUDENT, LABELS).item() == pytest.approx(
        0, abs=1e-7
    )
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        student = 5 * torch.randn(2, 6, 11, generator=generator)
        teacher = 5 * torch.randn(2, 6, 11, generator=generator)
        labels = torch.randint(0, 11, (2, 6), generator=generator)
        labels[torch.rand(2, 6, generator=generator) < 0.5] = -100
        labels[:, -1] = 7  # every sequence keeps at least one answer token
        assert losses.asu_distillation_loss(student, teacher, labels).item() >= 0


def test_distillation_of_bf16_logits_is_computed_in_fp32():
    student, teacher = STUDENT.bfloat16(), TEACHER.bfloat16()
    loss = losses.asu_distillation_loss(student, teacher, LABELS)
    assert loss.dtype == torch.float32
    expected = hand_distillation(teacher.float(), student.float())
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_distillation_refuses_a_batch_without_answer_tokens():
    with pytest.raises(ValueError, match="no answer tokens"):
        losses.asu_distillation_loss(STUDENT, TEACHER, torch.full_like(LABELS, -100))
    only_prompt = LABELS.clone()
    only_prompt[:, 1:] = -100  # a label on position 0 is predicted by nothing
    only_prompt[:, 0] = 1
    with pytest.raises(ValueError, match="max_length"):
        losses.asu_distillation_loss(STUDENT, TEACHER, only_prompt)


def test_retain_kl_masked_uses_the_same_reduction():
    model = STUDENT.clone().requires_grad_(True)
    masked = losses.retain_kl_loss(model, TEACHER, LABELS)
    assert masked.item() == pytest.approx(hand_distillation(), rel=1e-6)
    masked.backward()
    assert model.grad[2].abs().sum() == 0 and model.grad[:, T - 1].abs().sum() == 0


def test_retain_kl_unmasked_is_the_harness_kl_over_all_positions():
    unmasked = losses.retain_kl_loss(STUDENT, TEACHER, LABELS, answer_tokens_only=False)
    # by hand: KL(reference ‖ model) at all B·T positions (no shift, no mask), averaged
    by_hand = sum(position_kl(TEACHER, STUDENT, b, t) for b in range(B) for t in range(T)) / (B * T)
    assert unmasked.item() == pytest.approx(by_hand, rel=1e-6)
    # the harness's compute_kl_divergence, written out: batchmean over the flattened positions
    harness = F.kl_div(
        F.log_softmax(STUDENT, dim=-1).view(-1, V),
        F.log_softmax(TEACHER, dim=-1).view(-1, V),
        reduction="batchmean",
        log_target=True,
    )
    assert unmasked.item() == pytest.approx(harness.item(), rel=1e-6)
    # the labels play no part: prompt, padding and the unshifted last position all count
    no_labels = torch.full_like(LABELS, -100)
    same = losses.retain_kl_loss(STUDENT, TEACHER, no_labels, answer_tokens_only=False)
    assert same.item() == unmasked.item()


def hand_sequence_nll(logits):
    totals = []
    for b in range(B):
        total = 0.0
        for t in answer_positions(b):
            total -= math.log(softmax(logits[b, t].tolist())[int(LABELS[b, t + 1])])
        totals.append(total)
    return totals


def test_sequence_nll_sums_answer_token_nll_per_sequence():
    nll = losses.sequence_nll(STUDENT, LABELS)
    torch.testing.assert_close(nll, torch.tensor(hand_sequence_nll(STUDENT)), rtol=1e-6, atol=1e-7)
    assert nll[2].item() == 0.0


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_npo_loss_matches_its_formula(beta):
    model_nll, reference_nll = hand_sequence_nll(STUDENT), hand_sequence_nll(TEACHER)
    # -(2/β)·mean_i log σ(−β·(log π_θ(y_i|x_i) − log π_ref(y_i|x_i))), log π = −NLL
    terms = []
    for nll, ref in zip(model_nll, reference_nll, strict=True):
        log_ratio = -nll + ref
        terms.append(math.log(1 / (1 + math.exp(beta * log_ratio))))
    expected = -2 / beta * sum(terms) / B
    assert losses.npo_loss(STUDENT, TEACHER, LABELS, beta).item() == pytest.approx(
        expected, rel=1e-6
    )
    # at the reference itself every term is log σ(0): the loss is (2/β)·log 2
    assert losses.npo_loss(TEACHER, TEACHER, LABELS, beta).item() == pytest.approx(
        2 / beta * math.log(2), rel=1e-6
    )


def test_masked_hidden_mse():
    hidden = torch.tensor(
        [[[1.0, 2.0], [3.0, 4.0], [5.0, 5.0]], [[0.0, 0.0], [9.0, 9.0], [7.0, 1.0]]],
        requires_grad=True,
    )
    target = torch.tensor(
        [[[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], [[1.0, -1.0], [0.0, 0.0], [0.0, 0.0]]],
        requires_grad=True,
    )
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    # seq 0: tokens (1+4)/2, (4+9)/2, (25+25)/2 = 2.5, 6.5, 25 -> 34/3; seq 1: token 0 only -> 1
    expected = (34 / 3 + 1.0) / 2
    loss = losses.masked_hidden_mse(hidden, target, mask)
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    loss.backward()
    assert target.grad is None  # the target is fixed
    assert hidden.grad[1, 1:].abs().sum() == 0  # padding positions get no gradient


# -- teacher_eos: suppress ------------------------------------------------------------------------
def test_suppress_end_of_answer_against_hand_renormalisation():
    """Word 2 plays the end token. Row 0's answer is (1, 2): the position predicting 1 (t=1) is
    suppressed, the one predicting the end token (t=2) is not. Row 1's answer (0, 2, 1) ends
    early: only t=0 (predicting 0) is before the end. Row 2 has no answer: unchanged."""
    suppressed = losses.suppress_end_of_answer(TEACHER, LABELS, [2])
    assert suppressed.shape == TEACHER.shape and suppressed.dtype == torch.float32
    changed = {(0, 1), (1, 0)}
    for b in range(B):
        for t in range(T):
            p = softmax(TEACHER[b, t].tolist())
            got = torch.softmax(suppressed[b, t], -1).tolist()
            if (b, t) in changed:
                expected = [p[0] / (1 - p[2]), p[1] / (1 - p[2]), 0.0]
            else:
                expected = p
            assert got == pytest.approx(expected, abs=1e-7), (b, t)

    # The ASU loss on the suppressed teacher: the hand KL with the renormalised distributions.
    def renormalised(b, t):
        p = softmax(TEACHER[b, t].tolist())
        return [p[0] / (1 - p[2]), p[1] / (1 - p[2]), 0.0] if (b, t) in changed else p

    def position_loss(b, t):
        q = softmax(STUDENT[b, t].tolist())
        return sum(
            pi * math.log(pi / qi) for pi, qi in zip(renormalised(b, t), q, strict=True) if pi > 0
        )

    per_sequence = [
        sum(position_loss(b, t) for t in answer_positions(b)) / len(answer_positions(b))
        for b in (0, 1)
    ]
    loss = losses.asu_distillation_loss(STUDENT, suppressed, LABELS)
    assert torch.isfinite(loss)
    assert loss.item() == pytest.approx(sum(per_sequence) / 2, rel=1e-6)


def test_suppress_end_of_answer_edge_cases():
    assert torch.equal(losses.suppress_end_of_answer(TEACHER, LABELS, []), TEACHER)
    # A teacher certain of the end token: after suppression the rest is renormalised and the
    # student's loss and gradient stay finite.
    certain = torch.tensor([[[0.0, 0.0, 60.0], [0.0, 0.0, 60.0], [0.0, 0.0, 0.0]]])
    labels = torch.tensor([[-100, 1, 2]])
    out = losses.suppress_end_of_answer(certain.bfloat16(), labels, torch.tensor([2]))
    assert torch.softmax(out[0, 0], -1).tolist() == pytest.approx([0.5, 0.5, 0.0])
    assert torch.softmax(out[0, 1], -1)[2] == pytest.approx(1.0)  # predicts the end: kept
    student = torch.zeros(1, 3, 3, requires_grad=True)
    loss = losses.asu_distillation_loss(student, out, labels)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(student.grad).all()
