"""The continual tasks: a forget split cut along its entities, and what each step trains on.

TOFU's forget splits list each fictitious author's 20 questions in one block (forget10 = 20
authors), so an entity is a block of `entity_size` consecutive rows; data with a `task_id` column
is cut along that column instead. Step k unlearns task k; its retain set is the retain split plus
the forget rows of the tasks not yet unlearned (k+1, ..., K), as the ASU paper's official
continual code builds it (Salehzz/ASU-unlearning, `Right-to-be-forgotten/forget.py`,
`get_task_data`).

The harness reads TOFU through `load_dataset("locuslab/TOFU", name=...)` from its working
directory: `write_data_folder` lays out such a folder with the source files linked and each
step's sets written as new names (`forget_step3`, `retain_step3`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

TOFU = Path("locuslab") / "TOFU"
SUFFIXES = (".json", ".jsonl")


class TaskError(ValueError):
    """The tasks cannot be cut as asked (the message says what to change)."""


@dataclass(frozen=True)
class Task:
    number: int  # 1-based, the step that unlearns it
    rows: tuple[int, ...]  # row positions in the forget split
    entities: tuple[str, ...]  # e.g. ("entity 3", "entity 4") or ("task_id 2",)

    def to_dict(self) -> dict:
        return {"task": self.number, "rows": list(self.rows), "entities": list(self.entities)}


def split_file(folder: Path, name: str) -> Path:
    """`<folder>/<name>.json` or `.jsonl` (JSON lines either way)."""
    for suffix in SUFFIXES:
        path = Path(folder) / f"{name}{suffix}"
        if path.is_file():
            return path
    raise TaskError(f"{folder} has no {name}.json: pass --data DIR holding locuslab/TOFU/{name}")


def read_lines(path: Path) -> list[str]:
    """The non-empty lines of a JSON lines file, each checked to be one JSON object."""
    lines = [line for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise TaskError(f"{path} line {number} is not JSON ({error.msg})") from None
        if not isinstance(record, dict):
            raise TaskError(f"{path} line {number} is not a JSON object")
    return lines


def _groups(records: list[dict], entity_size: int, task_key: str) -> list[tuple[str, list[int]]]:
    """(label, row positions) of each entity, in the order the data lists them."""
    keyed = [task_key in r for r in records]
    if any(keyed):
        if not all(keyed):
            missing = keyed.index(False)
            raise TaskError(f"row {missing} has no {task_key!r} while others have one")
        groups: dict[str, list[int]] = {}
        for i, record in enumerate(records):
            groups.setdefault(str(record[task_key]), []).append(i)
        order = sorted(groups, key=lambda v: (0, int(v)) if v.lstrip("-").isdigit() else (1, v))
        return [(f"{task_key} {value}", groups[value]) for value in order]
    if entity_size < 1:
        raise TaskError(f"--entity-size {entity_size}: use a positive number of rows")
    if len(records) % entity_size:
        raise TaskError(
            f"the forget split has {len(records)} rows, not a multiple of --entity-size "
            f"{entity_size} (TOFU: 20 rows per author)"
        )
    return [
        (f"entity {i // entity_size + 1}", list(range(i, i + entity_size)))
        for i in range(0, len(records), entity_size)
    ]


def cut_tasks(
    records: list[dict], n_tasks: int | None, entity_size: int = 20, task_key: str = "task_id"
) -> list[Task]:
    """The forget rows cut into `n_tasks` tasks of consecutive whole entities, the first
    `len(entities) % n_tasks` tasks one entity larger; with a `task_key` column, one task per
    value (`n_tasks` None or equal to their number)."""
    if not records:
        raise TaskError("the forget split has no rows")
    groups = _groups(records, entity_size, task_key)
    by_column = task_key in records[0]
    if by_column:
        if n_tasks not in (None, len(groups)):
            raise TaskError(
                f"the data's {task_key!r} column defines {len(groups)} tasks: drop --tasks or "
                f"set it to {len(groups)}"
            )
        parts = [[g] for g in groups]
    else:
        if n_tasks is None or n_tasks < 1:
            raise TaskError(f"--tasks {n_tasks}: use a number of tasks >= 1")
        if n_tasks > len(groups):
            raise TaskError(
                f"--tasks {n_tasks} is more than the {len(groups)} entities of the forget split "
                f"({len(records)} rows / {entity_size}): use --tasks <= {len(groups)}"
            )
        size, extra = divmod(len(groups), n_tasks)
        parts, start = [], 0
        for i in range(n_tasks):
            end = start + size + (1 if i < extra else 0)
            parts.append(groups[start:end])
            start = end
    tasks = []
    for number, part in enumerate(parts, 1):
        rows = tuple(i for _, ids in part for i in ids)
        if not rows:
            raise TaskError(f"task {number} has no rows")
        tasks.append(Task(number, rows, tuple(label for label, _ in part)))
    return tasks


def retained_forget_rows(tasks: list[Task], step: int) -> list[int]:
    """The forget rows step `step` (1-based) keeps: those of the tasks not yet unlearned."""
    if not 1 <= step <= len(tasks):
        raise TaskError(f"step {step} is not among 1..{len(tasks)}")
    return [i for task in tasks[step:] for i in task.rows]


def describe(tasks: list[Task], n_retain: int) -> list[str]:
    """One line per task: its entities, rows, and the retain set of its step."""
    out = []
    for task in tasks:
        kept = len(retained_forget_rows(tasks, task.number))
        names = task.entities
        label = names[0] if len(names) == 1 else f"{names[0]} .. {names[-1].split()[-1]}"
        out.append(
            f"task {task.number}: {label} ({len(names)} entit{'y' if len(names) == 1 else 'ies'}, rows "
            f"{task.rows[0]}-{task.rows[-1]}, {len(task.rows)} rows); step {task.number} retains "
            f"{n_retain} retain + {kept} forget rows"
        )
    return out


def step_names(step: int) -> tuple[str, str]:
    """The data names (forget, retain) the harness reads at step `step`."""
    return f"forget_step{step}", f"retain_step{step}"


def write_data_folder(
    source: Path, dest: Path, forget_split: str, retain_split: str, tasks: list[Task]
) -> dict[str, int]:
    """`dest/locuslab/TOFU/`: every file of `source/locuslab/TOFU/` linked, each step's forget and
    retain sets written (`step_names`), and the README header `datasets` reads. Returns the row
    count of each written set."""
    src, out = Path(source) / TOFU, Path(dest) / TOFU
    forget = read_lines(split_file(src, forget_split))
    retain = read_lines(split_file(src, retain_split))
    out.mkdir(parents=True, exist_ok=True)
    configs = {}
    for path in sorted(src.iterdir()):
        if path.suffix in SUFFIXES and path.is_file():
            link = out / path.name
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(path.resolve())
            configs[path.stem] = path.name
    written = {}
    for task in tasks:
        forget_name, retain_name = step_names(task.number)
        kept = retained_forget_rows(tasks, task.number)
        sets = {
            forget_name: [forget[i] for i in task.rows],
            retain_name: retain + [forget[i] for i in kept],
        }
        for name, lines in sets.items():
            _write_text(out / f"{name}.json", "\n".join(lines) + "\n")
            configs[name] = f"{name}.json"
            written[name] = len(lines)
    header = ["---", "configs:"]
    for name, file in configs.items():
        header += [f"- config_name: {name}", f"  data_files: {file}"]
    _write_text(out / "README.md", "\n".join([*header, "---", ""]))
    return written


def _write_text(path: Path, text: str) -> None:
    # replaced whole: a reader never sees half a file, a link never has its target written
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    if path.is_symlink():
        path.unlink()
    os.replace(temporary, path)
