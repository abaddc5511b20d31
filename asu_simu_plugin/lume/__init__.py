"""LUME (SemEval-2025 Task 4: unlearning creative documents, synthetic biographies with PII and
real biographies) for the open-unlearning harness: its rows (`data`), its definitions
(`formulas`), and the dataset handler `LUMEDataset` (selected in `configs/data/datasets/LUME_*`).
The metrics and the evaluator are in `asu_simu_plugin.metrics.lume` (`eval=lume`).
"""

from asu_simu_plugin.registry import register_component

# harness dataset handler -> (our mixin, the harness class it goes in front of)
DATASETS = {
    "LUMEDataset": (
        "asu_simu_plugin.lume.data:LUMEDatasetMixin",
        "data.pretraining:CompletionDataset",
    )
}

for _name in DATASETS:
    register_component("dataset", _name, f"asu_simu_plugin.harness:{_name}")
