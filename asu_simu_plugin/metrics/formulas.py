"""The ASU paper's TOFU measures as plain functions of numbers and strings (no model, no harness).

Definitions: the official evaluation of the ASU paper (`Right-to-be-forgotten/metrics/metrics.py`
of Salehzz/ASU-unlearning, the "closer look" evaluation of sail-sg/closer-look-LLM-unlearning
with a harmonic-mean Forget Efficacy). Per split, over its rows:

- truth ratio: r = exp(mean perturbed NLL − paraphrased NLL) per row (NLLs per answer token);
  forget split: 1 − mean(min(r, 1/r)); other splits: mean(max(0, 1 − 1/r));
- token entropy of a generated answer: its unigram token entropy / log2(n), 0 for n <= 1;
- cosine similarity of two sentence embeddings, clipped at 0;
- entailment score: the share of answers labelled entailment, an answer whose ROUGE-L recall is
  below 0.1 counted as not entailed;
- Model Utility / Forget Efficacy: harmonic means of per-split values (`harmonic_mean`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from asu_simu_plugin.diagnostics import token_entropy

ROUGE_FLOOR = 0.1  # below this ROUGE-L recall an answer counts as factually wrong (not entailed)
ENTAILMENT = "entailment"

__all__ = [
    "ENTAILMENT",
    "ROUGE_FLOOR",
    "clipped_cosine",
    "entailed",
    "harmonic_mean",
    "mean",
    "perturbation_ratio",
    "token_entropy",
    "truth_ratio",
]


def mean(values: Iterable[float]) -> float:
    values = list(values)
    if not values:
        raise ValueError("no values to average (every row was skipped)")
    return math.fsum(values) / len(values)


def perturbation_ratio(paraphrased_nll: float, perturbed_nlls: Sequence[float] | float) -> float:
    """r = exp(mean perturbed NLL − paraphrased NLL), NLLs averaged over answer tokens.

    r > 1: the model prefers the paraphrased (true) answer to the perturbed (false) ones.
    """
    if isinstance(perturbed_nlls, int | float):
        perturbed_nlls = [perturbed_nlls]
    return math.exp(mean(perturbed_nlls) - paraphrased_nll)


def truth_ratio(ratios: Iterable[float], forget: bool) -> float:
    """The official split value from per-row ratios r (`perturbation_ratio`).

    forget: 1 − mean(min(r, 1/r)) (0 when true and false answers are equally likely);
    other splits: mean(max(0, 1 − 1/r)) (high when the true answer is preferred).
    """
    ratios = list(ratios)
    if forget:
        return 1.0 - mean(min(r, 1.0 / r) for r in ratios)
    return mean(max(0.0, 1.0 - 1.0 / r) for r in ratios)


def clipped_cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """max(0, cos(a, b)); 0 when either vector is zero."""
    dot = math.fsum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(math.fsum(x * x for x in a)) * math.sqrt(math.fsum(y * y for y in b))
    return max(0.0, dot / norm) if norm > 0 else 0.0


def entailed(
    label: str,
    rouge_recall: float,
    entailment_label: str = ENTAILMENT,
    rouge_floor: float = ROUGE_FLOOR,
) -> bool:
    """An answer counts as entailed when the NLI label says so and its ROUGE-L recall against
    the reference is at least `rouge_floor` (official: 0.1)."""
    return rouge_recall >= rouge_floor and label == entailment_label


def harmonic_mean(values: Iterable[float]) -> float:
    """n / Σ 1/x over non-negative values; 0 as soon as one value is 0 (scipy's `hmean`, which
    the official code uses, gives 0 there too)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("harmonic mean of no values")
    if any(v < 0 or math.isnan(v) for v in values):
        raise ValueError(f"harmonic mean needs values >= 0 (got {values})")
    if any(v == 0 for v in values):
        return 0.0
    return len(values) / math.fsum(1.0 / v for v in values)
