"""Unlearning without the harness: question/answer files in, a `save_pretrained` model out.

The output directory holds a plain transformers model (loadable with `from_pretrained`, no extra
keys), its tokenizer, and `asu_simu_run.json` with everything needed to reproduce the run.
"""

from __future__ import annotations

import json
import logging
import platform
from dataclasses import asdict, dataclass, field

import torch
import transformers
from transformers import TrainingArguments

from asu_simu_plugin import __version__
from asu_simu_plugin.data import ForgetRetainDataset, PadCollator, QADataset, check_answers
from asu_simu_plugin.output import (
    RUN_FILE,
    OutputPlan,
    ResumeRecordCallback,
    prepare_output,
    run_identity,
)
from asu_simu_plugin.registry import get_method, methods

logger = logging.getLogger(__name__)


def standalone_methods() -> dict[str, str]:
    """`--method` choice -> method name: every registered method (asu_simu_plugin.registry)."""
    return {m.cli_name: m.name for m in methods().values()}


def _setting(default, help: str, flag=None, check=None, resume_may_change=False, **kwargs):
    """A RunSettings field; `flag` / `check` (a `cli.checks` type) make it an `asu-simu unlearn`
    flag, with `help`; `resume_may_change`: left out of the run identity (it does not change
    the result, so a resume may set it anew)."""
    metadata = {"help": help, "flag": flag, "check": check}
    if resume_may_change:
        metadata["resume_may_change"] = True
    return field(default=default, metadata=metadata, **kwargs)


@dataclass
class RunSettings:
    """Training settings of a standalone run (the harness's `trainer.args` analogue); the fields
    with a flag are `asu-simu unlearn`'s training flags, with these defaults."""

    epochs: float = _setting(5.0, "training epochs", "--epochs", "positive_float")
    learning_rate: float = _setting(1e-5, "learning rate", "--lr", "positive_float")
    batch_size: int = _setting(
        4, "forget (and retain) examples per step", "--batch-size", "positive_int"
    )
    gradient_accumulation_steps: int = _setting(
        1, "gradient accumulation steps", "--grad-accum", "positive_int"
    )
    max_length: int = _setting(
        512,
        "tokens per example (truncation); at most the model's positions, and `asu-simu unlearn` "
        "lowers this default to them",
        "--max-length",
        "positive_int",
    )
    weight_decay: float = _setting(0.0, "AdamW/Sophia", "--weight-decay", "non_negative_float")
    warmup_steps: int = _setting(0, "learning-rate warmup steps")
    lr_scheduler_type: str = _setting("linear", "learning-rate schedule")
    seed: int = _setting(0, "random seed", "--seed", "seed")
    logging_steps: int = _setting(5, "log every N optimizer steps")
    save_steps: int = _setting(
        0,
        "checkpoint every N optimizer steps (0: none); --resume continues from the last",
        "--save-steps",
        "non_negative_int",
    )
    save_total_limit: int = _setting(
        2,
        "checkpoints kept, the newest ones (0: all); a resume may change it",
        "--save-total-limit",
        "non_negative_int",
        resume_may_change=True,
    )
    save_strategy: str | None = _setting(None, 'None: "steps" with save_steps, else "no"')
    system_prompt: str | None = _setting(
        None, "system prompt of the chat template", "--system-prompt"
    )
    extra: dict = field(  # any other TrainingArguments field
        default_factory=dict, metadata={"help": "any other TrainingArguments field"}
    )

    def training_arguments(self, output_dir) -> TrainingArguments:
        strategy = self.save_strategy or ("steps" if self.save_steps else "no")
        saving = {"save_steps": self.save_steps} if self.save_steps else {}
        saving["save_total_limit"] = self.save_total_limit or None
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
            save_strategy=strategy,
            report_to=[],
            remove_unused_columns=False,
            # `extra` may override it: DeepSpeed on CPU needs use_cpu=False (True disables it)
            **{"use_cpu": not torch.cuda.is_available(), **saving, **self.extra},
        )


def method_arguments(method: str, values=None):
    """`method`'s argument dataclass: `values` checked into it (a mapping), or as given."""
    cls = get_method(method).arguments
    if isinstance(values, cls):
        return values
    return cls.from_values(values or {}, get_method(method).name)


def trainer_class(method: str):
    from asu_simu_plugin import standalone

    choices = standalone_methods()
    key = method.lower()
    if key not in choices:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(choices)}")
    return getattr(standalone, choices[key])


def qa_datasets(tokenizer, forget_rows, retain_rows, settings: RunSettings):
    """Tokenised forget and retain sets, minus examples whose answer truncation removed (reported);
    an error when a set keeps no answer token at all, or holds an empty answer."""
    check_answers(forget_rows, "forget")
    check_answers(retain_rows, "retain")
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
    """The standalone trainer of `method`; rows may also be `QADataset`s already built, and
    `method_args` the method's argument dataclass or a mapping of its fields."""
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
        method_args=method_arguments(method, method_args),
    )


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
    `prepare_output`, which refuses unsafe outputs, locks OUTPUT for the run and chooses the
    checkpoint to resume); `plan`: one `prepare_output` returned already. Returns
    the trainer, or None when `resume` found this very run already finished.
    """
    settings = settings or RunSettings()
    method_args = method_arguments(method, method_args)
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
                "method_args": method_args.to_dict(),
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
