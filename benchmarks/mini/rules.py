"""The rules every row of a mini benchmark is scored by: the learning-rate selection, the
aggregation over seeds, and the comparison of two rows at equal forgetting.

A selection is a tuple (utility key, forget key[, -1]): both scores higher = better, unless the
third item -1 marks a forget score where lower is better (e.g. a ROUGE on the forget set).
"""

from __future__ import annotations

import itertools
import math
import statistics

SELECTION_RULE = (
    "of the grid rates whose {utility} (seed 0) is at least {floor:g} x the target's, the one with "
    "the {best} {forget} (ties: the higher {utility}); if none keeps that much, the one with the "
    "highest {utility}"
)

# a row's selection when it ran at one rate named with --lr (no grid, no rule)
GIVEN_RATE = "given on the command line (--lr)"


def select_rate(results, target, floor, keys):
    """The rule every row's rate is chosen by, from its grid runs (seed 0).

    `results` maps each rate to its summary. Among the rates whose utility is at least `floor` ×
    the target's, the one that forgets best (ties: higher utility); if none keeps that much
    utility, the rate with the highest utility. Returns (rate, why).
    """
    utility, forget, sign, best = selection_keys(keys)

    def forgetting(r):  # a missing score counts as forgetting nothing
        value = r.get(forget)
        if value is None:
            return 0.0 if sign > 0 else -math.inf
        return sign * value

    scored = {lr: (forgetting(r), r[utility]) for lr, r in results.items()}
    need = floor * target[utility]
    kept = {lr: score for lr, score in scored.items() if score[1] >= need}
    if kept:
        lr = max(kept, key=lambda k: kept[k])
        return lr, f"{best} {forget} with {utility} >= {floor:g} x target's ({need:.3f})"
    lr = max(scored, key=lambda k: scored[k][1])
    return lr, f"no rate kept {utility} >= {need:.3f}: highest {utility}"


def selection_keys(keys):
    """(utility key, forget key, +1 / -1: higher / lower forget score is better, "highest" /
    "lowest") of a selection tuple."""
    utility, forget, *rest = keys
    sign = rest[0] if rest else 1
    return utility, forget, sign, "highest" if sign > 0 else "lowest"


def aggregate(per_seed):
    """{"seeds": per-seed values, metric: {"mean", "std"}} (std: sample std, None for one seed)."""
    out = {"seeds": per_seed}
    keys = [k for k in per_seed[0] if k != "seed"]
    for key in keys:
        values = [v[key] for v in per_seed if isinstance(v.get(key), (int, float))]
        if not values:
            out[key] = None
            continue
        std = statistics.stdev(values) if len(values) > 1 else None
        out[key] = {"mean": statistics.mean(values), "std": std}
    return out


def interpolate(points, x):
    """y at x on the piecewise-linear curve through points (x, y) in log x; None outside it."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            if x1 == x0:
                return (y0 + y1) / 2
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def equal_forgetting(row, baseline, forget_key, utility_key):
    """`row` against `baseline` where their forgetting matches: each grid point of either is
    placed on the other's utility-vs-forget curve (its grid points joined piecewise-linearly in
    log forget score); points outside the other's range are left out."""

    def curve(r):
        return [(g[forget_key], g[utility_key]) for g in r["lr_grid"] if g[forget_key]]

    own, other = curve(row), curve(baseline)
    matches = []
    for label, points, against, sign in (
        (row["name"], own, other, 1),
        (baseline["name"], other, own, -1),
    ):
        for x, y in points:
            y_other = interpolate(against, x)
            if y_other is not None:
                difference = sign * (y - y_other)
                matches.append({"point_of": label, forget_key: x, "utility_difference": difference})
    diffs = [m["utility_difference"] for m in matches]
    return {
        "row": row["name"],
        "baseline": baseline["name"],
        "matched_on": forget_key,
        "utility": utility_key,
        "ranges": {
            row["name"]: [min(x for x, _ in own), max(x for x, _ in own)] if own else None,
            baseline["name"]: [min(x for x, _ in other), max(x for x, _ in other)]
            if other
            else None,
        },
        "matches": matches,
        "mean_utility_difference": statistics.mean(diffs) if diffs else None,
    }
