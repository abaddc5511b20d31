"""Unlearning without the harness: question/answer files in, a `save_pretrained` model out.

The output directory holds a plain transformers model (loadable with `from_pretrained`, no extra
keys), its tokenizer, and `asu_simu_run.json` with everything needed to reproduce the run.
"""

from __future__ import annotations

import gc
import json
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import TrainingArguments

from asu_simu_plugin import __version__
from asu_simu_plugin.data import ForgetRetainDataset, PadCollator, QADataset

RUN_FILE = "asu_simu_run.json"

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
            use_cpu=not torch.cuda.is_available(),
            **self.extra,
        )


def trainer_class(method: str):
    from asu_simu_plugin import standalone

    key = method.lower()
    if key not in STANDALONE_METHODS:
        raise ValueError(
            f"unknown method {method!r}; choose one of {', '.join(STANDALONE_METHODS)}"
        )
    return getattr(standalone, STANDALONE_METHODS[key])


def build_trainer(
    method,
    model,
    tokenizer,
    forget_rows,
    retain_rows,
    output_dir,
    method_args,
    settings: RunSettings,
):
    forget = QADataset(forget_rows, tokenizer, settings.max_length, settings.system_prompt)
    retain = QADataset(retain_rows, tokenizer, settings.max_length, settings.system_prompt)
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
        **method_args,
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
):
    """Unlearn `forget_rows` from `model`, save it with its tokenizer and the run record."""
    settings = settings or RunSettings()
    method_args = dict(method_args or {})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    transformers.set_seed(settings.seed)
    trainer = build_trainer(
        method, model, tokenizer, forget_rows, retain_rows, output_dir, method_args, settings
    )
    resume = settings.save_strategy != "no" and any(output_dir.glob("checkpoint-*"))
    trainer.train(resume_from_checkpoint=True if resume else None)
    trainer.save_model(str(output_dir))
    tokenizer.save_pretrained(str(output_dir))
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
    }
    if trainer.is_world_process_zero():
        (output_dir / RUN_FILE).write_text(json.dumps(record, indent=2, default=str))
    return trainer


def close_distributed() -> None:
    """Tear down the process group a torchrun launch opened, once every rank is done.

    Call it after the trainer is released. Left to interpreter shutdown, gloo's worker
    thread can free a finished collective's tensors after Python stopped serving the GIL,
    which aborts the process ("terminate called without an active exception") after the
    model was saved.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    gc.collect()  # drop trainer/DDP references so the group really closes below
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
