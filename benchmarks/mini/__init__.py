"""The pipeline the mini benchmarks (TOFU-mini, MUSE-mini) share, split by role.

- `arguments`: the command-line options every benchmark has (rows, rates, seeds, device).
- `pipeline`: `Run` and `Pipeline`, the stages (marker files, harness calls, the model stage,
  finetune / unlearn / eval) and the plan (every row's grid, then the headline seeds).
- `rules`: the learning-rate selection rule, seed aggregation, the equal-forgetting comparison.
- `report`: the report stage (rows read from the work folder, token entropy, the JSON), with
  `markdown` and `plots` writing its text and figures.
- `embedding`: a stand-in for the ASU paper's sentence-embedding model, built from a PyPI wheel
  (WordLlama), for `--embedding-model` where the hub is out of reach.

A benchmark's `run.py` subclasses `Pipeline` with its data, harness experiments and metrics.
"""
