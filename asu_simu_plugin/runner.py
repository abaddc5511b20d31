"""Unlearning without the harness: question/answer files in, a `save_pretrained` model out.

The output directory holds a plain transformers model (loadable with `from_pretrained`, no extra
keys), its tokenizer, and `asu_simu_run.json` with everything needed to reproduce the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from asu_simu_plugin import __version__
from asu_simu_plugin.data import ForgetRetainDataset, PadCollator, QADataset

RUN_FILE = "asu_simu_run.json"
RESUME_FILE = "asu_simu_resume.json"  # in each checkpoint folder: what run wrote it

logger = logging.getLogger(__name__)

# Standalone methods: our trainers plus the harness's two classic baselines.
STANDALONE_METHODS = {
    "asu": "ASU",
    "simu": "SIMU",
    "sograddiff": "SOGradDiff",
    "sonpo": "SONPO",
    "graddiff": "StandaloneGradDiff",
    "npo": "StandaloneNPO",
}


@dataclass
class RunSettings:
    """Training settings of a standalone run (the harness's `trainer.args` analogue)."""

    epochs: float = 5.0
    learning_rate: float = 1e-5
    batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_scheduler_type: str = "linear"
    seed: int = 0
    logging_steps: int = 5
    save_strategy: str = "no"
    system_prompt: str | None = None
    extra: dict = field(default_factory=dict)  # any other TrainingArguments field

    def training_arguments(self, output_dir) -> TrainingArguments:
        return TrainingArguments(
            output_dir=str(output_dir),
            num_train_epochs=self.epochs,
            learning_rate=self.learning_rate,
            per_device_train_batch_size=self.batch_size,
            gradient_accumulation_steps=self.gradient_accumulation_steps,
            weight_decay=self.weight_decay,
            warmup_steps=self.warmup_steps,
            lr_scheduler_type=self.lr_scheduler_type,
            seed=self.seed,
            logging_steps=self.logging_steps,
            save_strategy=self.save_strategy,
            report_to=[],
            remove_unused_columns=False,
            # `extra` may override it: DeepSpeed on CPU needs use_cpu=False (True disables it)
            **{"use_cpu": not torch.cuda.is_available(), **self.extra},
        )


def trainer_class(method: str):
    from asu_simu_plugin import standalone

    key = method.lower()
    if key not in STANDALONE_METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(STANDALONE_METHODS)}"
        )
    return getattr(standalone, STANDALONE_METHODS[key])


def qa_datasets(tokenizer, forget_rows, retain_rows, settings: RunSettings):
    """Tokenised forget and retain sets, minus examples whose answer truncation removed (reported);
    an error when a set keeps no answer token at all."""
    forget = QADataset(forget_rows, tokenizer, settings.max_length, settings.system_prompt)
    retain = QADataset(retain_rows, tokenizer, settings.max_length, settings.system_prompt)
    return forget.without_empty_answers("forget"), retain.without_empty_answers("retain")


def build_trainer(
    method,
    model,
    tokenizer,
    forget_rows,
    retain_rows,
    output_dir,
    method_args,
    settings: RunSettings,
    callbacks=None,
):
    """The standalone trainer of `method`; rows may also be `QADataset`s already built."""
    if isinstance(forget_rows, QADataset) and isinstance(retain_rows, QADataset):
        forget, retain = forget_rows, retain_rows
    else:
        forget, retain = qa_datasets(tokenizer, forget_rows, retain_rows, settings)
    train_dataset = ForgetRetainDataset(forget, retain, seed=settings.seed)
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    return trainer_class(method)(
        model=model,
        args=settings.training_arguments(output_dir),
        train_dataset=train_dataset,
        data_collator=PadCollator(pad_id),
        tokenizer=tokenizer,
        callbacks=callbacks,
        **method_args,
    )


# -- what makes two runs the same run (checked before resuming) --------------------------------
def fingerprint(value) -> str:
    """sha256 of a JSON-serialisable value (rows, settings), stable across processes."""
    text = json.dumps(value, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_fingerprint(source) -> str | None:
    """A local model folder: sha256 of its config and of its weight files' names and sizes."""
    if source is None or not Path(str(source)).is_dir():
        return None
    folder = Path(str(source))
    config = folder / "config.json"
    weights = sorted(
        (p.name, p.stat().st_size)
        for p in folder.iterdir()
        if p.suffix in (".safetensors", ".bin", ".pt", ".pth")
    )
    text = config.read_text(encoding="utf-8") if config.is_file() else ""
    return fingerprint([text, weights])


def run_identity(method, method_args, settings: RunSettings, forget_rows, retain_rows, source):
    """Everything a checkpoint must share with the current run to be resumed by it."""
    return {
        "method": method,
        "method_args": method_args,
        "settings": asdict(settings),
        "forget_data": fingerprint([dict(r) for r in forget_rows]),
        "retain_data": fingerprint([dict(r) for r in retain_rows]),
        "model": str(Path(str(source)).resolve()) if _is_local(source) else source,
        "model_files": model_fingerprint(source),
    }


def _is_local(source) -> bool:
    return source is not None and Path(str(source)).exists()


def _differences(recorded: dict, current: dict) -> list[str]:
    """'key (recorded → now)' for each differing entry, nested one level (settings.lr, …)."""
    out = []
    for key in sorted(set(recorded) | set(current)):
        old, new = recorded.get(key), current.get(key)
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            out += [f"{key}.{d}" for d in _differences(old, new)]
        elif key.endswith("_data") or key == "model_files":
            out.append(f"{key} (the files changed)")
        else:
            out.append(f"{key} ({old!r} then, {new!r} now)")
    return out


class ResumeRecordCallback(TrainerCallback):
    """Writes the run identity into each checkpoint folder, so a resume can be checked."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                (folder / RESUME_FILE).write_text(json.dumps(self.identity, indent=2, default=str))


# -- the output folder ---------------------------------------------------------------------------
class OutputError(ValueError):
    """The output folder cannot be used as asked (the message says what to do)."""


def _main_process() -> bool:
    # Before accelerate starts, torchrun's RANK says which process owns the output folder.
    return int(os.environ.get("RANK", "0")) == 0


@dataclass
class OutputPlan:
    """Where a run writes: `work` (OUTPUT.partial: checkpoints, then the model) until `finish()`
    moves it into place as `output`. An interrupted run leaves only `work` behind."""

    output: Path
    work: Path
    checkpoint: str | None = None  # the checkpoint to resume from
    identity: dict | None = None  # what the checkpoints record (`run_identity`)
    finished: bool = False  # `output` already holds this very run (--resume of a done run)

    def finish(self) -> None:
        """Move the finished work folder into place (replacing an old output when asked)."""
        if not _main_process():
            return
        old = None
        if self.output.exists():
            old = self.output.with_name(f"{self.output.name}.replaced-{os.getpid()}")
            self.output.rename(old)
        self.work.rename(self.output)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
            if old.exists():
                logger.warning("the replaced output could not be removed entirely: %s", old)

    def abandon(self) -> None:
        """After a failure: remove the work folder unless it holds a checkpoint to resume."""
        if not _main_process() or not self.work.is_dir():
            return
        if not any(self.work.glob(f"{PREFIX_CHECKPOINT_DIR}-*")):
            shutil.rmtree(self.work, ignore_errors=True)


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def prepare_output(output, source=None, identity=None, overwrite=False, resume=False) -> OutputPlan:
    """Check and prepare the output folder before any model is loaded or trained.

    Refuses: `output` equal to, inside or holding the local model `source`; an existing file;
    an existing non-empty folder unless `overwrite` (replace it at the end) or `resume`
    (continue the interrupted run in OUTPUT.partial, only if its checkpoint records the same
    method, data and settings as `identity`); a folder that cannot be written.
    """
    if overwrite and resume:
        raise OutputError("--overwrite and --resume exclude each other: choose one")
    output = Path(output).expanduser().resolve()
    work = output.with_name(f"{output.name}.partial")
    plan = OutputPlan(output, work, identity=identity)
    cwd = Path.cwd().resolve()
    if output in (Path.home().resolve(), Path(output.anchor)) or _inside(cwd, output):
        raise OutputError(
            f"the output folder {output} is the working directory, an ancestor of it, home or "
            "a root: choose a dedicated --output folder (it is replaced when the run ends)"
        )
    if _is_local(source):
        model = Path(str(source)).expanduser().resolve()
        if _inside(output, model) or _inside(model, output):
            raise OutputError(
                f"the output folder {output} {'is' if output == model else 'overlaps'} the "
                f"model folder {model}: choose an --output outside it (the source model stays "
                "untouched)"
            )
    if not _main_process():
        if resume and work.is_dir():
            plan.checkpoint = get_last_checkpoint(str(work))
        return plan
    if output.exists() and not output.is_dir():
        raise OutputError(f"the output {output} is a file; choose a folder for --output")
    if _non_empty(output) and not overwrite:
        if resume and _finished_run_matches(output, identity):
            plan.finished = True
            return plan
        raise OutputError(
            f"the output folder {output} exists and is not empty: add --overwrite to replace it "
            "(at the end, once the new model is saved), or choose another --output"
            + (
                "; --resume continues only an interrupted run (OUTPUT.partial) or confirms a "
                "finished one with the same method, data and settings"
                if resume
                else ""
            )
        )
    if overwrite and output.is_dir() and not os.access(output, os.W_OK | os.X_OK):
        raise OutputError(f"cannot replace {output}: it is not writable (check its permissions)")
    if _non_empty(work):
        if resume:
            plan.checkpoint = _checked_checkpoint(work, identity)
        elif overwrite:
            shutil.rmtree(work)
        else:
            raise OutputError(
                f"{work} holds an interrupted run: add --resume to continue it (same method, "
                "data and settings) or --overwrite to start over"
            )
    _check_writable(work)
    return plan


def _finished_run_matches(output: Path, identity) -> bool:
    record_file = output / RUN_FILE
    if identity is None or not record_file.is_file():
        return False
    try:
        recorded = json.loads(record_file.read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(identity, default=str))


def _checked_checkpoint(work: Path, identity) -> str | None:
    checkpoint = get_last_checkpoint(str(work))
    if checkpoint is None:
        logger.warning("%s holds no checkpoint: starting from the beginning", work)
        shutil.rmtree(work)
        return None
    record_file = Path(checkpoint) / RESUME_FILE
    if not record_file.is_file():
        raise OutputError(
            f"{checkpoint} has no {RESUME_FILE}, so it cannot be checked against this run: "
            "add --overwrite to start over instead of --resume"
        )
    try:
        recorded = json.loads(record_file.read_text(encoding="utf-8"))
    except ValueError as error:
        raise OutputError(f"{record_file} is not valid JSON ({error}): use --overwrite") from None
    if identity is not None:
        differences = _differences(recorded, json.loads(json.dumps(identity, default=str)))
        if differences:
            raise OutputError(
                f"{checkpoint} belongs to a different run, so it is not resumed: "
                + "; ".join(differences)
                + ". Rerun with the same method, data and settings, or add --overwrite to "
                "start over"
            )
    print(f"resuming from {checkpoint} (same method, data and settings)", file=sys.stderr)
    return checkpoint


def _check_writable(folder: Path) -> None:
    """Create `folder` and write a file in it: fails now rather than after training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write the output next to {folder.parent}: {reason}; choose a writable --output"
        ) from None


def run_unlearning(
    method,
    model,
    tokenizer,
    forget_rows,
    retain_rows,
    output_dir,
    method_args=None,
    settings: RunSettings | None = None,
    source=None,
    command=None,
    overwrite=False,
    resume=False,
    plan: OutputPlan | None = None,
):
    """Unlearn `forget_rows` from `model`; save it with its tokenizer and the run record.

    The run writes into OUTPUT.partial and moves it to `output_dir` when done (see
    `prepare_output`, which refuses unsafe outputs and checks a resumed checkpoint). Returns
    the trainer, or None when `resume` found this very run already finished.
    """
    settings = settings or RunSettings()
    method_args = dict(method_args or {})
    if plan is None:
        identity = run_identity(
            method, method_args, settings, _rows(forget_rows), _rows(retain_rows), source
        )
        plan = prepare_output(output_dir, source, identity, overwrite, resume)
    identity = plan.identity or run_identity(
        method, method_args, settings, _rows(forget_rows), _rows(retain_rows), source
    )
    if plan.finished:
        return None
    try:
        transformers.set_seed(settings.seed)
        trainer = build_trainer(
            method,
            model,
            tokenizer,
            forget_rows,
            retain_rows,
            plan.work,
            method_args,
            settings,
            callbacks=[ResumeRecordCallback(identity)],
        )
        trainer.train(resume_from_checkpoint=plan.checkpoint)
        trainer.save_model(str(plan.work))
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(str(plan.work))
            record = {
                "method": method,
                "method_args": method_args,
                "settings": asdict(settings),
                "model": str(source) if source is not None else None,
                "forget_examples": len(forget_rows),
                "retain_examples": len(retain_rows),
                "log_history": trainer.state.log_history,
                "versions": {
                    "asu_simu_plugin": __version__,
                    "transformers": transformers.__version__,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                },
                "command": command,
                "identity": identity,
            }
            (plan.work / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))
    except BaseException:
        plan.abandon()
        raise
    plan.finish()
    return trainer


def _rows(rows):
    return rows.rows if isinstance(rows, QADataset) else rows
