"""The ASU paper's TOFU evaluation (Model Utility, Forget Efficacy and their per-split measures)
and LUME's (SemEval-2025 Task 4: knowledge, MIA score, final score), offered to the
open-unlearning harness as metrics and evaluators.

- `formulas`: the definitions, on plain numbers and strings;
- `scorers`: the NLI and sentence-embedding models (sentence-transformers: the `paper` extra);
- `paper`: the metric functions in the harness's form (reading the harness's own `probability`
  and `rouge` results as pre-computes);
- `evaluator`: `ASUPaperEvaluator`, which loads the scoring models before anything is generated;
- `lume`: LUME's metric functions and `LUMEEvaluator` (definitions: `asu_simu_plugin.lume`).

This module only names them: the registry lists them, `asu_simu_plugin.harness` builds the
harness objects, `pyproject.toml` declares the entry points (`open_unlearning.metrics`,
`open_unlearning.evaluators`).
"""

from asu_simu_plugin.registry import register_component

# harness metric handler -> our function ("module:function"), wrapped in the harness's metric
METRIC_FUNCTIONS = {
    "paper_truth_ratio": "asu_simu_plugin.metrics.paper:truth_ratio",
    "token_entropy": "asu_simu_plugin.metrics.paper:token_entropy",
    "cosine_similarity": "asu_simu_plugin.metrics.paper:cosine_similarity",
    "entailment_score": "asu_simu_plugin.metrics.paper:entailment_score",
    "paper_hmean": "asu_simu_plugin.metrics.paper:hmean",
    "lume_knowledge": "asu_simu_plugin.metrics.lume:knowledge",
    "lume_mia_score": "asu_simu_plugin.metrics.lume:mia_score",
}
# harness evaluator handler -> (our mixin, the harness class it goes in front of)
EVALUATORS = {
    "ASUPaperEvaluator": (
        "asu_simu_plugin.metrics.evaluator:PaperEvaluatorMixin",
        "evals.base:Evaluator",
    ),
    "LUMEEvaluator": ("asu_simu_plugin.metrics.lume:LUMEEvaluatorMixin", "evals.base:Evaluator"),
}

for _name in METRIC_FUNCTIONS:
    register_component("metric", _name, f"asu_simu_plugin.harness:{_name}")
for _name in EVALUATORS:
    register_component("evaluator", _name, f"asu_simu_plugin.harness:{_name}")
