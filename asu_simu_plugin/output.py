"""The output folder of a standalone run: checked before anything loads, written safely.

A run writes into OUTPUT.partial and moves it into place when done (`OutputPlan`), so an
interrupted run never leaves a half-written model in OUTPUT; nothing the user has is replaced
unless asked (`--overwrite`), and no input (model, data files) lies inside what a run replaces;
one run at a time writes to OUTPUT (`OutputLock`, a lock on OUTPUT.lock held for the whole run);
a checkpoint is resumed only by the run that wrote it (its `run_identity`: method, arguments,
settings, data and model fingerprints), from the newest checkpoint whose write finished.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import struct
import sys
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

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
    kept = [f.name for f in fields(settings) if not f.metadata.get("resume_may_change")]
    return {
        "method": method,
        "method_args": method_args.to_dict() if hasattr(method_args, "to_dict") else method_args,
        "settings": {name: value for name, value in asdict(settings).items() if name in kept},
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
    """Writes the run identity into each checkpoint folder, so a resume can be checked.

    Written last (transformers calls `on_save` once every checkpoint file is written), and
    atomically, it also marks the checkpoint complete: a write that failed (disk full) leaves a
    checkpoint without it, which a resume passes over."""

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            if folder.is_dir():
                temporary = folder / f"{RESUME_FILE}.tmp"
                temporary.write_text(json.dumps(self.identity, indent=2, default=str))
                os.replace(temporary, folder / RESUME_FILE)


# -- files that must be intact before they are read ----------------------------------------------
def file_problem(path) -> str | None:
    """Why a weights / optimizer / state file cannot be read (truncated, corrupt), or None.

    Cheap checks, no tensor is read: a safetensors header and the length it announces; the zip
    directory of a `torch.save` file (.pt / .pth / .bin); a JSON file that parses."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if path.suffix == ".safetensors":
            with path.open("rb") as handle:
                prefix = handle.read(8)
                if len(prefix) < 8:
                    return f"it holds {size} bytes, not even a safetensors header"
                (length,) = struct.unpack("<Q", prefix)
                if length > size - 8:
                    return f"its header announces {length} bytes, the file holds {size}"
                header = json.loads(handle.read(length))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
            expected = 8 + length + max(ends, default=0)
            if size != expected:
                return f"it holds {size} bytes where its header announces {expected}"
        elif path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                last = max(archive.infolist(), key=lambda i: i.header_offset, default=None)
                if last is not None and last.header_offset + last.compress_size > size:
                    return "its last entry ends past the end of the file"
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except zipfile.BadZipFile:
        return "it is not a complete torch.save file (no zip directory: truncated?)"
    except (ValueError, KeyError, TypeError, IndexError) as error:
        return f"it does not parse ({type(error).__name__}: {str(error)[:80]})"
    except OSError as error:
        return f"it cannot be read ({error.strerror or error})"
    return None


def weight_files(folder) -> list[Path]:
    """The files of a model or checkpoint folder that `file_problem` can check."""
    suffixes = (".safetensors", ".pt", ".pth", ".bin")
    return sorted(p for p in Path(folder).iterdir() if p.suffix in suffixes and p.is_file())


# -- the output folder ---------------------------------------------------------------------------
class OutputError(ValueError):
    """The output folder cannot be used as asked (the message says what to do)."""


def _main_process() -> bool:
    # Before accelerate starts, torchrun's RANK says which process owns the output folder.
    return int(os.environ.get("RANK", "0")) == 0


class OutputLock:
    """OUTPUT.lock, locked (`flock`) by the one run writing to OUTPUT, until it ends.

    The kernel drops the lock when its process exits, however it exits: a lock file left by a
    process that died blocks nobody. The file holds the owner's process id and host, for the
    message that a second run gets."""

    def __init__(self, output: Path):
        self.path = output.with_name(f"{output.name}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                owner = os.read(fd, 200).decode("utf-8", "replace").strip() or "unknown"
                os.close(fd)
                output = self.path.with_name(self.path.name[: -len(".lock")])
                raise OutputError(
                    f"the output folder {output} is in use by another run ({owner}; lock "
                    f"{self.path}): wait for it to end, or choose another --output"
                ) from None
            # Its previous owner may have removed the file between our open and our lock.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd

    def release(self) -> None:
        if getattr(self, "_fd", None) is None:
            return
        try:
            self.path.unlink()  # while still locked: nobody can hold this file meanwhile
        except OSError:
            pass
        os.close(self._fd)
        self._fd = None

    def __del__(self):  # a plan dropped without finish() or abandon(): nobody writes any more
        self.release()


@dataclass
class OutputPlan:
    """Where a run writes: `work` (OUTPUT.partial: checkpoints, then the model) until `finish()`
    moves it into place as `output`. An interrupted run leaves only `work` behind. The run holds
    OUTPUT's lock from `prepare_output` until `finish()` or `abandon()`."""

    output: Path
    work: Path
    checkpoint: str | None = None  # the checkpoint to resume from
    identity: dict | None = None  # what the checkpoints record (`run_identity`)
    finished: bool = False  # `output` already holds this very run (--resume of a done run)
    lock: OutputLock | None = field(default=None, repr=False)
    closed: bool = False  # finish() or abandon() ran: the folders are no longer this plan's

    def finish(self) -> None:
        """Move the finished work folder into place (replacing an old output when asked)."""
        if not _main_process():
            return
        self.closed = True
        try:
            old = None
            if self.output.exists():
                old = self.output.with_name(f"{self.output.name}.replaced-{os.getpid()}")
                self.output.rename(old)
            self.work.rename(self.output)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
                if old.exists():
                    logger.warning("the replaced output could not be removed entirely: %s", old)
        finally:
            self.release()

    def abandon(self) -> None:
        """After a failure: remove the work folder unless it holds a checkpoint to resume."""
        if not _main_process() or self.closed:
            return  # not ours, or already finished or abandoned
        self.closed = True
        try:
            if self.work.is_dir() and not _complete_checkpoints(self.work):
                shutil.rmtree(self.work, ignore_errors=True)
        finally:
            self.release()

    def release(self) -> None:
        """Let another run use OUTPUT (`finish` and `abandon` do it)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _non_empty(path: Path) -> bool:
    return path.is_dir() and any(path.iterdir())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _check_inputs(output: Path, work: Path, inputs: dict) -> None:
    """No input may be, hold or lie inside OUTPUT (or OUTPUT.partial): both may be deleted."""
    for label, source in inputs.items():
        if not _is_local(source):
            continue
        path = Path(str(source)).expanduser().resolve()
        for target in (output, work):
            if _inside(target, path) or _inside(path, target):
                raise OutputError(
                    f"the output folder {target} {'is' if target == path else 'overlaps'} the "
                    f"{label} {path}: choose an --output outside it (the inputs stay untouched)"
                )


def prepare_output(
    output, source=None, identity=None, overwrite=False, resume=False, inputs=None
) -> OutputPlan:
    """Check and prepare the output folder before any model is loaded or trained.

    Refuses: `output` equal to, inside or holding the local model `source` or any path of
    `inputs` ({what it is: path}, e.g. the data files); an output another run is writing to
    (it stays locked for this run until `finish()` / `abandon()`); an existing file; an
    existing non-empty folder unless `overwrite` (replace it at the end) or `resume` (continue
    the interrupted run in OUTPUT.partial from its newest complete checkpoint, only if it
    records the same method, data and settings as `identity`); a folder that cannot be written.
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
    _check_inputs(output, work, {"model folder": source, **(inputs or {})})
    if not _main_process():
        if resume and work.is_dir():
            complete = _complete_checkpoints(work)
            plan.checkpoint = str(complete[0]) if complete else None
        return plan
    if output.exists() and not output.is_dir():
        raise OutputError(f"the output {output} is a file; choose a folder for --output")
    plan.lock = OutputLock(output)
    try:
        _check_writable(output.parent, output.parent)
        plan.lock.acquire()
        _prepare_locked(plan, identity, overwrite, resume)
    except BaseException:
        plan.release()
        raise
    if plan.finished:
        plan.release()  # nothing will be written
        plan.closed = True
    return plan


def _prepare_locked(plan: OutputPlan, identity, overwrite: bool, resume: bool) -> None:
    output, work = plan.output, plan.work
    if _non_empty(output) and not overwrite:
        if resume and _finished_run_matches(output, identity):
            plan.finished = True
            return
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
    _check_writable(work, work.parent)


def _finished_run_matches(output: Path, identity) -> bool:
    record_file = output / RUN_FILE
    if identity is None or not record_file.is_file():
        return False
    try:
        recorded = json.loads(record_file.read_text(encoding="utf-8")).get("identity")
    except (OSError, ValueError):
        return False
    return recorded == json.loads(json.dumps(identity, default=str))


# -- resuming --------------------------------------------------------------------------------------
def _checkpoints(work: Path) -> list[Path]:
    """checkpoint-N folders of `work`, newest (highest N) first."""
    pattern = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
    found = [(int(m.group(1)), p) for p in work.iterdir() if (m := pattern.match(p.name))]
    return [p for _, p in sorted(found, reverse=True) if p.is_dir()]


def _complete_checkpoints(work: Path) -> list[Path]:
    """Those whose write finished (`ResumeRecordCallback` writes its record last)."""
    return [p for p in _checkpoints(work) if (p / RESUME_FILE).is_file()]


def _checked_checkpoint(work: Path, identity) -> str | None:
    folders = _checkpoints(work)
    if not folders:
        logger.warning("%s holds no checkpoint: starting from the beginning", work)
        shutil.rmtree(work)
        return None
    complete = _complete_checkpoints(work)
    if not complete:
        names = ", ".join(p.name for p in folders)
        have = "has" if len(folders) == 1 else "have"
        raise OutputError(
            f"no checkpoint in {work} can be resumed: {names} {have} no {RESUME_FILE} (its "
            "write did not finish, or another program wrote it): add --overwrite to start over "
            "instead of --resume"
        )
    checkpoint = complete[0]
    record_file = checkpoint / RESUME_FILE
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
    _check_checkpoint_files(checkpoint, complete[1:])
    incomplete = folders[: folders.index(checkpoint)]
    note = ""
    if incomplete:
        names = ", ".join(p.name for p in incomplete)
        note = f"; {names} did not finish writing: removed"
        for folder in incomplete:
            shutil.rmtree(folder)
    print(
        f"resuming from {checkpoint}, the newest complete checkpoint (same method, data and "
        f"settings){note}",
        file=sys.stderr,
    )
    return str(checkpoint)


def _check_checkpoint_files(checkpoint: Path, older: list[Path]) -> None:
    for path in [*weight_files(checkpoint), checkpoint / "trainer_state.json"]:
        problem = file_problem(path) if path.exists() else "it is missing"
        if problem:
            fix = (
                f"delete {checkpoint.name} to resume from {older[0].name}, or add --overwrite "
                "to start over"
                if older
                else "add --overwrite to start over"
            )
            raise OutputError(f"{path} is damaged ({problem}): {fix}")


def _check_writable(folder: Path, near: Path) -> None:
    """Create `folder` and write a file in it: fails now rather than after training."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or str(error)
        raise OutputError(
            f"cannot write the output next to {near}: {reason}; choose a writable --output"
        ) from None
