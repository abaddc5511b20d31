"""LUME rows: reading the public files, selecting by task, kind and membership, and the harness
dataset handler `LUMEDataset` (`asu_simu_plugin.harness` puts `LUMEDatasetMixin` in front of the
harness's `CompletionDataset`, whose tokenisation it reuses: `input` is the prefix, `output` the
text with the loss).

The files are `<data_dir>/<split>.jsonl` (JSON lines with id, input, output, task), by default
`data/lume/` under the harness's working directory, as the harness reads WMDP from `data/wmdp/`.
"""

from __future__ import annotations

import json
from pathlib import Path

from asu_simu_plugin.lume import formulas

DEFAULT_DATA_DIR = "data/lume"
KEYS = ("id", "input", "output", "task")
SOURCE = "github.com/amazon-science/lume-llm-unlearning (data/forget.jsonl, data/retain.jsonl)"


class LUMEDataError(ValueError):
    """The LUME files are missing or malformed, or a selection is empty."""


def lume_file(data_dir: str | Path, split: str) -> Path:
    path = Path(data_dir) / f"{split}.jsonl"
    if not path.is_file():
        raise LUMEDataError(
            f"LUME file {path} not found (from {Path.cwd()}): put the public forget.jsonl and "
            f"retain.jsonl from {SOURCE} in {data_dir}/, or set the dataset's data_dir "
            "(experiments: lume_data_dir=DIR)"
        )
    return path


def read_rows(data_dir: str | Path, split: str) -> list[dict]:
    """Every row of `<data_dir>/<split>.jsonl`, checked for the four keys and a known id kind."""
    path = lume_file(data_dir, split)
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in KEYS if k not in row]
            if missing:
                raise LUMEDataError(
                    f"{path}:{number}: no {', '.join(missing)} (LUME rows have {KEYS})"
                )
            try:
                row["kind"] = formulas.row_kind(row["id"])
            except ValueError as error:
                raise LUMEDataError(f"{path}:{number}: {error}") from None
            rows.append(row)
    return rows


def _names(values, known: tuple[str, ...], what: str) -> tuple[str, ...]:
    if values is None:
        return known
    values = (values,) if isinstance(values, str) else tuple(values)
    unknown = [v for v in values if v not in known]
    if unknown or not values:
        raise LUMEDataError(f"{what} must be among {', '.join(known)} (got {list(values)})")
    return values


def select(
    rows: list[dict],
    tasks=None,
    kinds=None,
    members: bool | None = None,
    holdout_fraction: float = 0.0,
    documents_per_task: int | None = None,
) -> list[dict]:
    """The rows of the chosen tasks and kinds; `members` True keeps documents not held out,
    False only held-out ones (`formulas.held_out`), None all; `documents_per_task` keeps the
    first N documents of each task (file order) among those."""
    tasks = _names(tasks, formulas.TASKS, "tasks")
    kinds = _names(kinds, formulas.KINDS, "kinds")
    if members is not None and holdout_fraction == 0.0:
        raise LUMEDataError("members: true/false needs holdout_fraction > 0 (documents held out)")
    chosen, documents = [], {task: [] for task in tasks}
    for row in rows:
        if row["task"] not in tasks or row["kind"] not in kinds:
            continue
        document = formulas.document_id(row["id"])
        if members is not None and formulas.held_out(document, holdout_fraction) == members:
            continue
        seen = documents[row["task"]]
        if document not in seen:
            if documents_per_task is not None and len(seen) >= documents_per_task:
                continue
            seen.append(document)
        chosen.append(row)
    return chosen


def load_selection(data_dir, split, **selection) -> list[dict]:
    """`select` over one or several files (`split`: forget, retain or a list); never empty."""
    splits = [split] if isinstance(split, str) else list(split)
    rows = [row for name in splits for row in select(read_rows(data_dir, name), **selection)]
    if not rows:
        raise LUMEDataError(f"no LUME rows in {splits} with {selection}")
    return rows


class LUMEDatasetMixin:
    """LUME rows for the harness: `input` + `output` with the loss on `output` (loss_on: output),
    or the whole row as one document with the loss on every token but the first (loss_on:
    document, the challenge's MIA); an end-of-text token closes training rows (append_eos), so
    that a greedy answer stops where `output` does, as exact match requires."""

    def __init__(
        self,
        tokenizer,
        template_args=None,
        split="forget",
        data_dir=DEFAULT_DATA_DIR,
        tasks=None,
        kinds=None,
        members=None,
        holdout_fraction=0.0,
        documents_per_task=None,
        loss_on="output",
        append_eos=True,
        max_length=512,
        predict_with_generate=False,
    ):
        import datasets

        if loss_on not in ("output", "document"):
            raise LUMEDataError(f"loss_on must be output or document (got {loss_on!r})")
        rows = load_selection(
            data_dir,
            split,
            tasks=tasks,
            kinds=kinds,
            members=members,
            holdout_fraction=holdout_fraction,
            documents_per_task=documents_per_task,
        )
        for index, row in enumerate(rows):
            whole = loss_on == "document"
            row.update(index=index, prefix="" if whole else row["input"])
            row["text"] = row["input"] + row["output"] if whole else row["output"]
        # the harness's CompletionDataset attributes, set here (it would read hf_args)
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.data = datasets.Dataset.from_list(rows)
        self.prefix_key, self.text_key = "prefix", "text"
        self.predict_with_generate = predict_with_generate
        self.insert_space = False
        self.append_eos = append_eos

    def _process_sample(self, prefix, text_content, index=-1):
        item = super()._process_sample(prefix, text_content, index)
        eos = self.tokenizer.eos_token_id
        if self.append_eos and not self.predict_with_generate and item["input_ids"][-1] != eos:
            import torch

            one = torch.tensor([eos])
            item["input_ids"] = torch.cat([item["input_ids"], one])
            item["labels"] = torch.cat([item["labels"], one])
            item["attention_mask"] = torch.cat([item["attention_mask"], torch.ones_like(one)])
        return item
