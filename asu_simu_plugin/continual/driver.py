"""Continual unlearning through the harness: step k runs `src/train.py` on task k from step k−1's
saved model, then `src/eval.py` scores it on every task and on utility.

Everything is checked before the first subprocess starts (`plan`). Each step lives in
`<work>/step_NN/` (`model/`, `eval/`, `train.log`, `eval.log`) and is finished only when its
marker `step.json` exists — written last, atomically — and records the settings hash of this run
up to that step (`step_hash`: the run's settings and the step number, chained through the
previous step's hash). A rerun skips finished steps; a step folder without a matching marker is
an interrupted step and is done again from scratch (never a half model). A finished step made
with other settings is never replaced unless asked (`overwrite`). Step 0 scores the starting
model.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from asu_simu_plugin import config_dir
from asu_simu_plugin.continual import report
from asu_simu_plugin.continual import tasks as tasks_module
from asu_simu_plugin.continual.tasks import TOFU, TaskError
from asu_simu_plugin.harness import RECORD_ENV, REFERENCE_ENV  # (the harness loads lazily)

SETTINGS_FILE = "continual.json"
REFERENCE_FILE = "reference.json"  # --reference original: the override's record (harness.py)
TASKS_FILE = "tasks.json"
REFERENCES = ("previous", "original")
# the official continual scripts pass `fix_ref_model=$fix_ref_model` with that shell variable
# never set: Hydra reads `fix_ref_model=` as '' (false), so forget.py takes the previous step's
# checkpoint as the reference (and ASU's teacher); tofu.yaml's own default is the original
DEFAULT_REFERENCE = "previous"
# harness overrides every training step needs: the driver scores each step itself
TRAIN_FIXED = [
    "trainer.args.eval_strategy=no",
    "trainer.args.eval_on_start=false",
    "trainer.args.do_eval=false",
    "trainer.args.save_strategy=no",
    "trainer.args.report_to=none",
]
# the harness's documented CPU settings (float32, no bf16, no warm-up epochs: it divides by the
# CUDA device count)
TRAIN_CPU = [
    "model.model_args.torch_dtype=float32",
    "trainer.args.bf16=false",
    "trainer.args.bf16_full_eval=false",
    "trainer.args.optim=adamw_torch",
    "++trainer.args.warmup_epochs=0",
]


class ContinualError(ValueError):
    """The run cannot start or go on as asked (one line, saying what to change)."""


@dataclasses.dataclass
class Settings:
    harness: Path  # an open-unlearning checkout
    data: Path  # a folder holding locuslab/TOFU/
    model: Path  # the starting (finetuned) model
    work: Path
    tasks: int | None = None  # None: one per value of the task_key column
    forget_split: str = "forget10"
    retain_split: str = "retain90"
    holdout_split: str | None = None  # default: the forget split's (forget10 -> holdout10)
    entity_size: int = 20
    task_key: str = "task_id"
    experiment: str = "unlearn/tofu/default"
    trainer: str | None = None  # None: the experiment's
    model_config: str = "Llama-3.2-1B-Instruct"
    train_overrides: list[str] = dataclasses.field(default_factory=list)
    eval_overrides: list[str] = dataclasses.field(default_factory=list)
    reference: str = DEFAULT_REFERENCE
    retain_logs: Path | None = None  # the retain model's TOFU_EVAL.json (forget_quality)
    start_eval: Path | None = None  # step 0's scores, already made with the same evaluation
    device: str = "cpu"
    python: str = sys.executable
    overwrite: bool = False
    title: str | None = None


@dataclasses.dataclass
class Plan:
    settings: Settings
    tasks: list[tasks_module.Task]
    retain_rows: int
    identity: dict  # what every step's hash covers

    @property
    def work(self) -> Path:
        return self.settings.work


def _config_known(harness: Path, group_path: str) -> bool:
    """A config the harness composes: its own or ours (our Hydra plugin adds ours)."""
    return any(
        (root / f"{group_path}.yaml").is_file() for root in (harness / "configs", config_dir())
    )


def _config_text(harness: Path, group_path: str) -> str:
    for root in (harness / "configs", config_dir()):
        if (root / f"{group_path}.yaml").is_file():
            return (root / f"{group_path}.yaml").read_text(encoding="utf-8")
    return ""


def plan(s: Settings) -> Plan:
    """Check everything the run needs, before any model is loaded or trained."""
    from asu_simu_plugin.output import fingerprint, model_fingerprint

    s.harness, s.data, s.model, s.work = (Path(p).expanduser().resolve() for p in
                                          (s.harness, s.data, s.model, s.work))  # fmt: skip
    for script in ("train.py", "eval.py"):
        if not (s.harness / "src" / script).is_file():
            raise ContinualError(
                f"{s.harness} has no src/{script}: pass --harness (or set OPEN_UNLEARNING_SRC to) "
                "an open-unlearning checkout"
            )
    if shutil.which(s.python) is None and not Path(s.python).is_file():
        raise ContinualError(f"--python {s.python} not found: name the harness's Python")
    if not (s.model / "config.json").is_file():
        raise ContinualError(f"--model {s.model} is not a saved model folder (no config.json)")
    if s.reference not in REFERENCES:
        raise ContinualError(f"--reference {s.reference}: use one of {', '.join(REFERENCES)}")
    if s.reference == "original" and any("LoRACausalLM" in o for o in s.train_overrides):
        raise ContinualError(
            "--reference original with LoRA: the LoRA reference is the step's own base weights "
            "(adapters off); use --reference previous"
        )
    if s.trainer is not None and not _config_known(s.harness, f"trainer/{s.trainer}"):
        raise ContinualError(
            f"--trainer {s.trainer}: the harness knows no trainer config {s.trainer}.yaml "
            f"(neither {s.harness / 'configs' / 'trainer'} nor this plugin's configs)"
        )
    if not _config_known(s.harness, f"experiment/{s.experiment}"):
        raise ContinualError(f"--experiment {s.experiment}: no such harness experiment config")
    if not _config_known(s.harness, f"model/{s.model_config}"):
        raise ContinualError(f"--model-config {s.model_config}: no such harness model config")
    for label, path in (("--retain-logs", s.retain_logs), ("--start-eval", s.start_eval)):
        if path is not None and not Path(path).exists():
            raise ContinualError(f"{label} {path} does not exist")
    if s.retain_logs is not None and importlib.util.find_spec("scipy") is None:
        raise ContinualError(
            "--retain-logs: per-task forget_quality needs scipy (the harness's requirements have "
            "it): run with the harness's Python, or pip install scipy"
        )
    if s.start_eval is not None and not (Path(s.start_eval) / report.TOFU_EVAL).is_file():
        raise ContinualError(f"--start-eval {s.start_eval} has no {report.TOFU_EVAL}")
    s.holdout_split = s.holdout_split or s.forget_split.replace("forget", "holdout")
    folder = s.data / TOFU
    try:
        forget = tasks_module.read_lines(tasks_module.split_file(folder, s.forget_split))
        retain = tasks_module.read_lines(tasks_module.split_file(folder, s.retain_split))
        tasks_module.split_file(folder, s.holdout_split)
        tasks_module.split_file(folder, f"{s.forget_split}_perturbed")
        cut = tasks_module.cut_tasks(
            [json.loads(line) for line in forget], s.tasks, s.entity_size, s.task_key
        )
    except TaskError as error:
        raise ContinualError(str(error)) from None
    if s.work == s.model or s.work in s.model.parents:
        raise ContinualError(f"--work {s.work} holds the starting model: choose another folder")
    identity = {
        "model": str(s.model),
        "model_files": model_fingerprint(s.model),
        "forget": fingerprint(forget),
        "retain": fingerprint(retain),
        "tasks": [t.to_dict() for t in cut],
        **{
            k: getattr(s, k)
            for k in (
                "forget_split",
                "retain_split",
                "holdout_split",
                "experiment",
                "trainer",
                "model_config",
                "train_overrides",
                "eval_overrides",
                "reference",
                "device",
            )
        },  # fmt: skip
        "retain_logs": None
        if s.retain_logs is None
        else fingerprint(Path(s.retain_logs).read_text(encoding="utf-8")),
        "harness": str(s.harness),
    }
    p = Plan(s, cut, len(retain), identity)
    _check_work(p)
    return p


def step_hash(p: Plan, step: int) -> str:
    from asu_simu_plugin.output import fingerprint

    previous = step_hash(p, step - 1) if step > 0 else None
    return fingerprint([p.identity, step, previous])


def finished(p: Plan, step: int) -> bool:
    marker = report.step_folder(p.work, step) / report.STEP_FILE
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text())["settings_hash"] == step_hash(p, step)
    except (ValueError, KeyError):
        return False


def _check_work(p: Plan) -> None:
    """A work folder holding finished steps of other settings is refused (unless overwrite)."""
    recorded = p.work / SETTINGS_FILE
    if not recorded.is_file():
        if p.work.is_dir() and any(p.work.iterdir()) and not p.settings.overwrite:
            raise ContinualError(
                f"--work {p.work} is not empty and holds no continual run: choose an empty "
                "folder (or --overwrite)"
            )
        return
    old = json.loads(recorded.read_text())
    if old != p.identity and not p.settings.overwrite:
        changed = sorted(k for k in set(old) | set(p.identity) if old.get(k) != p.identity.get(k))
        raise ContinualError(
            f"--work {p.work} holds a continual run with other settings ({', '.join(changed)}): "
            "choose another --work, or --overwrite to start again"
        )


def _write_json(path: Path, value) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(value, indent=2, default=str) + "\n")
    os.replace(temporary, path)


class Driver:
    def __init__(self, p: Plan):
        self.p, self.s = p, p.settings
        self.data_dir = self.s.work / "data"
        self.times: list[float] = []

    # -- harness calls -------------------------------------------------------------------------
    def harness(self, script: str, overrides: list[str], log: Path, env=None) -> None:
        cmd = [self.s.python, str(self.s.harness / "src" / script), *overrides]
        environment = {
            **os.environ,
            "OPEN_UNLEARNING_SRC": str(self.s.harness),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            # datasets 3.0 caches a local folder by config name: private to this run
            "HF_DATASETS_CACHE": str(self.s.work / "datasets_cache"),
            **(env or {}),
        }
        with open(log, "w") as fh:
            fh.write(" ".join(cmd) + "\n\n")
            fh.flush()
            result = subprocess.run(
                cmd, cwd=self.data_dir, env=environment, stdout=fh, stderr=subprocess.STDOUT
            )
        if result.returncode != 0:
            tail = "".join(log.read_text().splitlines(keepends=True)[-20:])
            raise RuntimeError(
                f"src/{script} failed (exit {result.returncode}); log {log}:\n{tail}"
            )

    def model_overrides(self, path: Path) -> list[str]:
        out = [
            f"model={self.s.model_config}",
            f"model.model_args.pretrained_model_name_or_path={path}",
            # the tokenizer never changes: always the starting model's
            f"model.tokenizer_args.pretrained_model_name_or_path={self.s.model}",
        ]
        return out + (["model.model_args.attn_implementation=sdpa"] if self._no_flash() else [])

    def _no_flash(self) -> bool:
        """On a CPU, a model config asking for flash-attention 2 (every harness one) runs with
        SDPA instead, unless the experiment sets its own (ASU's: eager)."""
        model, experiment = (_config_text(self.s.harness, f"{g}/{n}") for g, n in
                             (("model", self.s.model_config), ("experiment", self.s.experiment)))  # fmt: skip
        return (
            self.s.device == "cpu"
            and "flash_attention_2" in model
            and "attn_implementation" not in experiment
        )

    def train_overrides(self, step: int, start: Path, out: Path) -> list[str]:
        forget_name, retain_name = tasks_module.step_names(step)
        return [
            "--config-name=unlearn.yaml",
            f"experiment={self.s.experiment}",
            *([f"trainer={self.s.trainer}"] if self.s.trainer else []),
            *self.model_overrides(start),
            f"forget_split={forget_name}",
            f"retain_split={retain_name}",
            f"holdout_split={self.s.holdout_split}",
            f"task_name=continual_step{step}",
            f"paths.output_dir={out}",
            *merge([*TRAIN_FIXED, *(TRAIN_CPU if self.s.device == "cpu" else [])],
                   self.s.train_overrides),
        ]  # fmt: skip

    def eval_overrides(self, model: Path, out: Path, step: int) -> list[str]:
        logs = self.s.retain_logs
        return [
            "experiment=eval/tofu/default",
            *self.model_overrides(model),
            f"++model.model_args.device_map={self.s.device}",
            *(["model.model_args.torch_dtype=float32"] if self.s.device == "cpu" else []),
            f"forget_split={self.s.forget_split}",
            f"holdout_split={self.s.holdout_split}",
            f"retain_logs_path={Path(logs).resolve() if logs else 'null'}",
            f"task_name=continual_eval{step}",
            f"paths.output_dir={out}",
            *self.s.eval_overrides,
        ]

    # -- steps ---------------------------------------------------------------------------------
    def model_of(self, step: int) -> Path:
        return self.s.model if step == 0 else report.step_folder(self.s.work, step) / "model"

    def run_step(self, step: int) -> None:
        folder = report.step_folder(self.s.work, step)
        if folder.exists():  # an interrupted step, or (asked) one of other settings
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        started = time.perf_counter()
        if step == 0 and self.s.start_eval is not None:
            shutil.copytree(self.s.start_eval, folder / "eval")
        else:
            if step > 0:
                self.train(step, folder)
            self.harness("eval.py", self.eval_overrides(self.model_of(step), folder / "eval",
                         step), folder / "eval.log")  # fmt: skip
        if not (folder / "eval" / report.TOFU_EVAL).is_file():
            raise RuntimeError(f"step {step}: src/eval.py wrote no {report.TOFU_EVAL}")
        seconds = round(time.perf_counter() - started, 1)
        _write_json(
            folder / report.STEP_FILE,
            {
                "step": step,
                "settings_hash": step_hash(self.p, step),
                "seconds": seconds,
                "finished": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
        if step > 0:
            self.times.append(seconds)

    def train(self, step: int, folder: Path) -> None:
        out, record = folder / "model", folder / REFERENCE_FILE
        env = {}
        if self.s.reference == "original" and step > 1:
            env = {REFERENCE_ENV: str(self.s.model), RECORD_ENV: str(record)}
        self.harness("train.py", self.train_overrides(step, self.model_of(step - 1), out),
                     folder / "train.log", env)  # fmt: skip
        if not (out / "config.json").is_file():
            raise RuntimeError(f"step {step}: src/train.py saved no model in {out}")
        if env and not record.is_file():
            raise RuntimeError(
                f"step {step}: the reference could not be set to the original model (no "
                f"{record}): install asu-simu-plugin into the harness's Python and leave "
                "ASU_SIMU_PLUGIN_REGISTER on"
            )

    def progress(self, step: int, total: float) -> str:
        k = len(self.p.tasks)
        task = self.p.tasks[step - 1] if step else None
        what = (
            "the starting model scored"
            if task is None
            else (f"task {step} ({len(task.rows)} rows) unlearned, every task scored")
        )
        line = f"[step {step}/{k}] {what}; elapsed {_duration(total)}"
        if self.times and step < k:
            left = sum(self.times) / len(self.times) * (k - step)
            line += f", about {_duration(left)} left"
        return line

    def run(self) -> dict:
        from asu_simu_plugin.output import OutputLock

        s = self.s
        s.work.mkdir(parents=True, exist_ok=True)
        lock = OutputLock(s.work)
        lock.acquire()
        try:
            if s.overwrite and (s.work / SETTINGS_FILE).is_file():
                old = json.loads((s.work / SETTINGS_FILE).read_text())
                if old != self.p.identity:  # asked: the old run's steps go, its data too
                    for path in [*s.work.glob("step_*"), self.data_dir, s.work / "datasets_cache"]:
                        shutil.rmtree(path, ignore_errors=True)
            _write_json(s.work / SETTINGS_FILE, self.p.identity)
            _write_json(s.work / TASKS_FILE, {"tasks": [t.to_dict() for t in self.p.tasks]})
            print("\n".join(tasks_module.describe(self.p.tasks, self.p.retain_rows)), flush=True)
            tasks_module.write_data_folder(
                s.data, self.data_dir, s.forget_split, s.retain_split, self.p.tasks
            )
            idk = s.harness / "data"  # harness paths (data/idk.jsonl) resolve from the run folder
            if idk.is_dir() and not (self.data_dir / "data").exists():
                (self.data_dir / "data").symlink_to(idk)
            started, redone = time.perf_counter(), False
            for step in range(len(self.p.tasks) + 1):
                # after a step is redone, every later one starts from its new model
                if not redone and finished(self.p, step):
                    print(f"[step {step}/{len(self.p.tasks)}] done before: skipped", flush=True)
                    continue
                redone = step > 0
                self.run_step(step)
                print(self.progress(step, time.perf_counter() - started), flush=True)
            title = s.title or f"continual unlearning: {s.trainer or s.experiment}"
            return report.write_report(s.work, title, s.retain_logs, self.notes())
        finally:
            lock.release()

    def notes(self) -> list[str]:
        s = self.s
        return [
            f"{len(self.p.tasks)} tasks of {s.forget_split} (tasks.json), experiment "
            f"{s.experiment}" + (f", trainer {s.trainer}" if s.trainer else "") + f"; reference "
            f"model: {s.reference}; step k retains {s.retain_split} plus the forget rows of tasks "
            "k+1..K. Each step's src/eval.py scores every task (per-task values from the "
            "harness's per-row ones)."
            + ("" if s.retain_logs else " No --retain-logs: forget_quality is not computed.")
        ]


def _key(override: str) -> str:
    return override.partition("=")[0].lstrip("+~")


def merge(defaults: list[str], given: list[str]) -> list[str]:
    """The driver's defaults, less those whose key the user's overrides set, then the user's
    (Hydra refuses a key given twice in some forms)."""
    taken = {_key(o) for o in given}
    return [o for o in defaults if _key(o) not in taken] + list(given)


def _duration(seconds: float) -> str:
    minutes, sec = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{sec:02d}s"


def run(settings: Settings) -> dict:
    return Driver(plan(settings)).run()
