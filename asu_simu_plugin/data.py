"""Question/answer data for the standalone runner and the diagnostics (no harness needed).

Examples are tokenised the way the harness tokenises TOFU: the prompt (chat template with the
generation prompt, or a plain "Question/Answer" layout for tokenizers without a template) gets
label -100, the answer (closed by the eos token) keeps its labels.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import torch
from torch.utils.data import Dataset

from asu_simu_plugin.losses import IGNORE_INDEX

logger = logging.getLogger(__name__)


class DataFormatError(ValueError):
    """A question/answer file that cannot be read as JSON lines (the message names file:line)."""


def _text(value, path, number, key):
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a numeric answer ("1987") is text to the tokenizer
    kind = "null" if value is None else type(value).__name__
    raise DataFormatError(f"{path}:{number}: {key!r} is {kind}; expected text")


def load_qa_jsonl(path, question_key="question", answer_key="answer") -> list[dict[str, str]]:
    """Read question/answer JSON lines; refuses anything else with the file and line named.

    One JSON object per line holding `question_key` and `answer_key` with text (numbers are
    turned into text; null, booleans, lists and objects are refused, and so is an empty
    answer); blank lines are skipped.
    """
    path = Path(path)
    expected = f"JSON lines with {question_key!r} and {answer_key!r}"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (expected {expected})")
    if not path.is_file():
        raise DataFormatError(f"{path} is not a file (expected {expected})")
    try:
        text = path.read_text(encoding="utf-8")
    except PermissionError:
        raise PermissionError(f"{path} is not readable (check its permissions)") from None
    except UnicodeDecodeError as error:
        raise DataFormatError(
            f"{path}: not UTF-8 text (byte {error.start}); save it as UTF-8 JSON lines"
        ) from None
    if text.lstrip().startswith("["):
        raise DataFormatError(
            f"{path}:1: a JSON array; expected {expected}, one object per line "
            f"(convert it with: jq -c '.[]' {path} > {path.with_suffix('.jsonl')})"
        )
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataFormatError(
                f"{path}:{number}: not valid JSON ({error.msg} at column {error.colno}); "
                f"expected {expected}, one object per line"
            ) from None
        if not isinstance(row, dict):
            raise DataFormatError(
                f"{path}:{number}: a JSON {type(row).__name__}; expected an object with "
                f"{question_key!r} and {answer_key!r}"
            )
        missing = [k for k in (question_key, answer_key) if k not in row]
        if missing:
            raise KeyError(
                f"{path}:{number} lacks {missing}; keys present: {sorted(row)} "
                "(other names: --question-key / --answer-key)"
            )
        rows.append(
            {
                "question": _text(row[question_key], path, number, question_key),
                "answer": _text(row[answer_key], path, number, answer_key),
            }
        )
        if not rows[-1]["answer"].strip():
            raise DataFormatError(f"{path}:{number}: {answer_key!r} is empty; {EMPTY_ANSWER}")
    if not rows:
        raise ValueError(f"{path} holds no examples: an empty forget/retain set cannot be used")
    return rows


EMPTY_ANSWER = (
    "training and attribution would see only the template's closing tokens: give every "
    "question its answer, or leave the row out"
)


def check_answers(rows, name: str = "question/answer") -> None:
    """Refuses an example whose answer is empty or only spaces (see EMPTY_ANSWER)."""
    for index, row in enumerate(rows):
        if not str(row["answer"]).strip():
            raise DataFormatError(
                f"{name} example {index} (0-based) has an empty answer; {EMPTY_ANSWER}"
            )


def prompt_and_answer_text(
    tokenizer, question: str, answer: str, system_prompt: str | None = None
) -> tuple[str, str]:
    """Split one example into the prompt text and the answer text that follows it."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": question}]
        if system_prompt:
            user.insert(0, {"role": "system", "content": system_prompt})
        prompt = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": answer}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    eos = tokenizer.eos_token or ""
    preamble = f"{system_prompt}\n" if system_prompt else ""
    return f"{preamble}Question: {question}\nAnswer: ", f"{answer}{eos}"


def encode_qa(
    tokenizer, question: str, answer: str, max_length: int = 512, system_prompt: str | None = None
) -> dict:
    prompt, answer_text = prompt_and_answer_text(tokenizer, question, answer, system_prompt)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(answer_text, add_special_tokens=False)["input_ids"]
    if not getattr(tokenizer, "chat_template", None) and tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]  # chat templates carry their own
    input_ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt_ids) + answer_ids)[:max_length]
    return {
        "input_ids": torch.tensor(input_ids),
        "attention_mask": torch.ones(len(input_ids), dtype=torch.long),
        "labels": torch.tensor(labels),
    }


class QADataset(Dataset):
    """Tokenised question/answer pairs."""

    def __init__(
        self,
        rows: list[dict[str, str]],
        tokenizer,
        max_length: int = 512,
        system_prompt: str | None = None,
    ):
        if not rows:
            raise ValueError("empty question/answer set")
        self.rows = rows
        self.max_length = max_length
        self.items = [
            encode_qa(tokenizer, r["question"], r["answer"], max_length, system_prompt)
            for r in rows
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]

    def answer_token_counts(self) -> list[int]:
        """Answer tokens (labels other than -100) each example keeps after truncation."""
        return [int((item["labels"] != IGNORE_INDEX).sum()) for item in self.items]

    def without_empty_answers(self, name: str = "data") -> QADataset:
        """This set minus the examples whose answer truncation removed entirely (reported).

        Such an example has no token to score: a batch made of them only gives a NaN loss.
        Raises when no example keeps an answer token.
        """
        counts = self.answer_token_counts()
        keep = [i for i, count in enumerate(counts) if count > 0]
        if len(keep) == len(counts):
            return self
        if not keep:
            raise ValueError(
                f"no {name} example keeps an answer token after truncation to {self.max_length} "
                "tokens (the prompts fill it): raise the maximum length (--max-length)"
            )
        logger.warning(
            "%d of %d %s examples have no answer token left after truncation to %d tokens and "
            "are left out (raise --max-length to keep them)",
            len(counts) - len(keep),
            len(counts),
            name,
            self.max_length,
        )
        subset = copy.copy(self)
        subset.rows = [self.rows[i] for i in keep]
        subset.items = [self.items[i] for i in keep]
        return subset


class ForgetRetainDataset(Dataset):
    """One item per forget example, each paired with a random retain example (as the harness)."""

    def __init__(self, forget: Dataset, retain: Dataset, seed: int = 0):
        if len(forget) == 0:
            raise ValueError("the forget set is empty: nothing to unlearn")
        if len(retain) == 0:
            raise ValueError("the retain set is empty")
        self.forget, self.retain = forget, retain
        generator = torch.Generator().manual_seed(seed)
        self.retain_index = torch.randint(len(retain), (len(forget),), generator=generator)

    def __len__(self):
        return len(self.forget)

    def __getitem__(self, index):
        return {
            "forget": self.forget[index],
            "retain": self.retain[int(self.retain_index[index])],
        }


class PadCollator:
    """Right-pads `input_ids` / `attention_mask` / `labels`, recursing into nested batches."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict]) -> dict:
        first = features[0]
        if "input_ids" not in first:
            return {key: self([f[key] for f in features]) for key in first}
        pad_values = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
        return {
            key: torch.nn.utils.rnn.pad_sequence(
                [f[key] for f in features], batch_first=True, padding_value=value
            )
            for key, value in pad_values.items()
            if key in first
        }
