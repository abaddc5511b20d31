"""The evaluator of the ASU paper's measures (`eval.asu_paper`, handler `ASUPaperEvaluator`).

It is the harness's plain `Evaluator` (metrics run in config order, logs in
`ASU_PAPER_EVAL.json`, values in `ASU_PAPER_SUMMARY.json`) that, when it is built, before the
model generates anything, loads the NLI and sentence-embedding models its metrics name, so that a
missing one stops the run at once with the model and the key to set, and (`reuse_scores`, on by
default) shares per-batch scores with the evaluators before it (`asu_simu_plugin.metrics.reuse`).
`asu_simu_plugin.harness` puts this mixin in front of the harness's `Evaluator`.
"""

from __future__ import annotations

import logging

from asu_simu_plugin.metrics import scorers

logger = logging.getLogger(__name__)

NAME = "ASU_PAPER"
# metric handler -> (scorer kind, the metric's key naming the model)
SCORER_METRICS = {
    "entailment_score": ("nli", "nli_model"),
    "cosine_similarity": ("embedding", "embedding_model"),
}


def scorer_models(metrics_cfg) -> dict[tuple[str, str], str]:
    """(kind, model path) -> the config key that set it, for every scorer metric in the tree
    (pre-computes included); metrics whose model is null are left out by design."""
    found = {}

    def visit(node):
        if not hasattr(node, "items"):
            return
        handler = node.get("handler")
        if handler in SCORER_METRICS:
            kind, key = SCORER_METRICS[handler]
            path = node.get(key)
            if path is not None:
                found.setdefault((kind, str(path)), key)
        for value in node.values():
            visit(value)

    visit(metrics_cfg)
    return found


def _full_key(eval_cfg, key: str) -> str:
    """The dotted key of `eval_cfg.<key>` in the whole config (eval.asu_paper.nli_model)."""
    try:
        return eval_cfg._get_full_key(key) or key
    except AttributeError:  # a plain mapping
        return f"eval.asu_paper.{key}"


def check_scorer_models(eval_cfg) -> list[str]:
    """Load every scoring model the metrics need; raise `ScorerModelError` naming the model and
    the key to set for the first that cannot be loaded. Returns the paths loaded."""
    loaded = []
    for (kind, path), key in scorer_models(eval_cfg.get("metrics") or {}).items():
        try:
            scorers.load(kind, path)
        except scorers.ScorerModelError as error:
            raise error.with_key(_full_key(eval_cfg, key)) from error
        loaded.append(path)
    return loaded


class PaperEvaluatorMixin:
    def __init__(self, eval_cfg, **kwargs):
        check_scorer_models(eval_cfg)
        super().__init__(NAME, eval_cfg, **kwargs)
        # built before any evaluator runs (src/eval.py, src/train.py), so the evaluators before
        # this one record what they score, and this one reuses it
        self.shared_scores = None
        if eval_cfg.get("reuse_scores", True):
            from asu_simu_plugin import harness

            self.shared_scores = harness.share_batch_scores()

    def evaluate(self, *args, **kwargs):
        before = self.shared_scores.counts() if self.shared_scores else None
        result = super().evaluate(*args, **kwargs)
        if before is not None:
            hits, calls = (n - b for n, b in zip(self.shared_scores.counts(), before, strict=True))
            logger.info(
                "%s: %d of %d scored batches reused from earlier evaluations (reuse_scores)",
                NAME,
                hits,
                calls,
            )
        return result
