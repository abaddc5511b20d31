"""Question/answer data for the standalone runner and the diagnostics (no harness needed).

Examples are tokenised the way the harness tokenises TOFU: the prompt (chat template with the
generation prompt, or a plain "Question/Answer" layout for tokenizers without a template) gets
label -100, the answer (closed by the eos token) keeps its labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

from asu_simu_plugin.losses import IGNORE_INDEX


def load_qa_jsonl(path, question_key="question", answer_key="answer") -> list[dict[str, str]]:
    """Read question/answer JSON lines; refuses files that are empty or lack the keys."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file (expected JSON lines with {question_key!r} and {answer_key!r})"
        )
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            missing = [k for k in (question_key, answer_key) if k not in row]
            if missing:
                raise KeyError(f"{path}:{number} lacks {missing}; keys present: {sorted(row)}")
            rows.append({"question": str(row[question_key]), "answer": str(row[answer_key])})
    if not rows:
        raise ValueError(f"{path} holds no examples: an empty forget/retain set cannot be used")
    return rows


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
        self.items = [
            encode_qa(tokenizer, r["question"], r["answer"], max_length, system_prompt)
            for r in rows
        ]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        return self.items[index]


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
