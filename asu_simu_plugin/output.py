"""The output folder of a standalone run: checked before anything loads, written safely.

A run writes into OUTPUT.partial and moves it into place when done (`OutputPlan`), so an
interrupted run never leaves a half-written model in OUTPUT; nothing the user has is replaced
unless asked (`--overwrite`); a checkpoint is resumed only by the run that wrote it (its
`run_identity`: method, arguments, settings, data and model fingerprints).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

RUN_FILE = "asu_simu_run.json"
RESUME_FILE = "asu_simu_resume.json"  # in each checkpoint folder: what run wrote it

logger = logging.getLogger(__name__)


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


def run_identity(method, method_args, settings, forget_rows, retain_rows, source):
    """Everything a checkpoint must share with the current run to be resumed by it
    (`settings`: the run's `runner.RunSettings`)."""
    return {
        "method": method,
        "method_args": method_args.to_dict() if hasattr(method_args, "to_dict") else method_args,
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
