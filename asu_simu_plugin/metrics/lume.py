"""LUME's measures as open-unlearning metric functions, and its evaluator (`eval=lume`,
handler `LUMEEvaluator`). Definitions: `asu_simu_plugin.lume.formulas`.

What the harness computes itself, by configuration (`configs/eval/lume.yaml`): regurgitation is
its `rouge` metric (`rougeL_recall`) on completion rows; the MIA AUC its `mia_loss` (forget rows
against non-members); the task aggregate our `paper_hmean` with the forget terms complemented.
Here: knowledge (exact match, needing the raw `output`), the MIA score, and the final score with
MMLU, which the evaluator adds when `mmlu` is configured.
"""

from __future__ import annotations

import logging

from asu_simu_plugin.lume import formulas
from asu_simu_plugin.lume.data import lume_file
from asu_simu_plugin.metrics import paper

logger = logging.getLogger(__name__)
NAME = "LUME"
MMLU_KEY = "mmlu/acc"


def knowledge(model, **kwargs):
    """Exact match of each greedy answer (pre-computed `generations` of the harness's `rouge`)
    and the row's raw `output` (`datasets`: the same rows); the mean is the knowledge score."""
    generations = paper._rows(kwargs, "generations")
    references, _ = paper._references({**kwargs, "reference_key": "output"}, generations)
    by_index = {
        idx: {"exact_match": formulas.exact_match(entry["generation"], references[idx])}
        for idx, entry in generations.items()
    }
    return paper._summary(by_index, "exact_match")


def mia_score(model, **kwargs):
    """1 − 2·|AUC − 0.5| of the pre-computed `auc` (the harness's `mia_loss`)."""
    result = (kwargs.get("pre_compute") or {}).get("auc") or {}
    if result.get("agg_value") is None:
        raise ValueError("lume_mia_score needs a pre_compute mia_loss entry with access_key: auc")
    auc = float(result["agg_value"])
    return {"agg_value": formulas.mia_score(float(auc)), "auc": float(auc)}


class LUMEEvaluatorMixin:
    """The harness's plain `Evaluator` (logs in LUME_EVAL.json, values in LUME_SUMMARY.json)
    that checks the LUME files before the model generates anything and, with `mmlu` set (an
    lm_eval evaluator config), runs MMLU through the harness's `LMEvalEvaluator` afterwards and
    adds `final_score`."""

    def __init__(self, eval_cfg, **kwargs):
        for split in formulas.SPLITS:
            lume_file(eval_cfg.data_dir, split)
        super().__init__(NAME, eval_cfg, **kwargs)

    def evaluate(self, model, output_dir=None, overwrite=None, **kwargs):
        summary = super().evaluate(model, output_dir=output_dir, overwrite=overwrite, **kwargs)
        mmlu_cfg = self.eval_cfg.get("mmlu")
        if not mmlu_cfg:
            return summary
        from asu_simu_plugin.harness import import_harness

        lm_eval = import_harness("evals.lm_eval").LMEvalEvaluator(
            mmlu_cfg, simple_evaluate_args=mmlu_cfg.get("simple_evaluate_args") or {}
        )
        summary.update(
            lm_eval.evaluate(model, output_dir=output_dir, overwrite=overwrite, **kwargs)
        )
        summary["final_score"] = formulas.final_score(
            summary["task_aggregate"], summary["mia_score"], summary[MMLU_KEY]
        )
        path = self.get_logs_file_path(output_dir or self.eval_cfg.output_dir, suffix="SUMMARY")
        self.save_logs(summary, path)
        return summary
