"""The ASU paper's TOFU evaluation (Model Utility, Forget Efficacy and their per-split measures),
offered to the open-unlearning harness as metrics and one evaluator.

- `formulas`: the definitions, on plain numbers and strings;
- `scorers`: the NLI and sentence-embedding models (sentence-transformers: the `paper` extra);
- `paper`: the metric functions in the harness's form (reading the harness's own `probability`
  and `rouge` results as pre-computes);
- `evaluator`: `ASUPaperEvaluator`, which loads the scoring models before anything is generated.

This module only names them: the registry lists them, `asu_simu_plugin.harness` builds the
harness objects, `pyproject.toml` declares the entry points (`open_unlearning.metrics`,
`open_unlearning.evaluators`).
"""

from asu_simu_plugin.registry import register_component

# harness metric handler -> the function in `asu_simu_plugin.metrics.paper`
METRIC_FUNCTIONS = {
    "paper_truth_ratio": "truth_ratio",
    "token_entropy": "token_entropy",
    "cosine_similarity": "cosine_similarity",
    "entailment_score": "entailment_score",
    "paper_hmean": "hmean",
}
EVALUATORS = {"ASUPaperEvaluator": "asu_simu_plugin.metrics.evaluator:PaperEvaluatorMixin"}

for _name in METRIC_FUNCTIONS:
    register_component("metric", _name, f"asu_simu_plugin.harness:{_name}")
for _name in EVALUATORS:
    register_component("evaluator", _name, f"asu_simu_plugin.harness:{_name}")
