"""Continual unlearning through the open-unlearning harness (`asu-simu continual`).

- `tasks`: the forget split cut into tasks along its entities, each step's retain set, and the
  data folder the harness reads them from;
- `driver`: the checks, then per step `src/train.py` from the previous step's model and
  `src/eval.py` on every task, with resumable step folders and progress lines;
- `report`: per-task scores from the harness's per-row values, the CSV, markdown and PNG.

docs/continual.md describes the protocol and how it follows the ASU paper's official code.
"""
