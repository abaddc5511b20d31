"""Small measurements shared by the demo, the τ sweep and the tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from asu_simu_plugin.data import PadCollator, QADataset
from asu_simu_plugin.losses import IGNORE_INDEX


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-position NLL [B, T-1] of the next token; 0 where the label is -100."""
    shifted = labels[:, 1:]
    return F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none"
    )


def batches(dataset: QADataset, batch_size: int, pad_token_id: int):
    collate = PadCollator(pad_token_id)
    for start in range(0, len(dataset), batch_size):
        yield collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])


@torch.no_grad()
def answer_probability(model, dataset: QADataset, pad_token_id: int, batch_size: int = 16) -> float:
    """The harness's TOFU "Probability": exp(−mean answer-token NLL), averaged over examples."""
    model.eval()
    device = next(model.parameters()).device
    probabilities = []
    for batch in batches(dataset, batch_size, pad_token_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = token_nll(logits, batch["labels"])
        counts = (batch["labels"][:, 1:] != IGNORE_INDEX).sum(dim=1).clamp_min(1)
        probabilities += torch.exp(-nll.sum(dim=1) / counts).tolist()
    return sum(probabilities) / len(probabilities)


def end_token_ids(tokenizer, model=None, label_ids=()) -> list[int]:
    """The tokens that end an answer: eos (tokenizer, config, generation config) and every special
    token occurring in the answers' labels (a chat template's end-of-turn, e.g. `<|im_end|>`)."""
    ids: set[int] = set()

    def add(value):
        if isinstance(value, int) and not isinstance(value, bool):
            ids.add(value)
        elif isinstance(value, list | tuple):
            for item in value:
                add(item)

    if tokenizer is not None:
        add(tokenizer.eos_token_id)
        special = set(tokenizer.all_special_ids)
        add([int(i) for i in set(map(int, label_ids)) if int(i) in special])
    if model is not None:
        add(getattr(model.config, "eos_token_id", None))
        add(getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    return sorted(ids)


def first_answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B] index of the position whose logits predict each sequence's first answer token (-1:
    no answer)."""
    answer = labels[:, 1:] != IGNORE_INDEX
    first = answer.float().argmax(dim=1)
    return torch.where(answer.any(dim=1), first, torch.full_like(first, -1))


def end_probability_at_first_answer_token(logits, labels, end_ids) -> torch.Tensor:
    """[N] probability the model puts on ending the answer where the answer should begin
    (sequences without an answer are left out)."""
    position = first_answer_positions(labels)
    rows = torch.nonzero(position >= 0).squeeze(1)
    probs = torch.softmax(logits[rows, position[rows]].float(), dim=-1)
    ids = torch.as_tensor(list(end_ids), dtype=torch.long, device=probs.device)
    return probs[:, ids].sum(dim=-1)


@torch.no_grad()
def greedy_continuations(model, items, end_ids, max_new_tokens: int = 8) -> list[list[int]]:
    """Greedy answer token ids for tokenised examples (their prompt = the tokens before the first
    answer label), stopping at an end token (not included)."""
    model.eval()
    device = next(model.parameters()).device
    outputs = []
    for item in items:
        labels = item["labels"]
        answer = torch.nonzero(labels != IGNORE_INDEX)
        start = int(answer[0]) if len(answer) else int(item["attention_mask"].sum())
        ids = item["input_ids"][:start].unsqueeze(0).to(device)
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=list(end_ids) or None,
            pad_token_id=(list(end_ids) or [0])[0],
            # callers may run this on one rank only: under ZeRO-3 transformers would otherwise
            # wait for the other ranks at every generated token (synced_gpus)
            synced_gpus=False,
        )
        tokens = out[0, ids.shape[1] :].tolist()
        for index, token in enumerate(tokens):
            if token in end_ids:
                tokens = tokens[:index]
                break
        outputs.append(tokens)
    return outputs


def is_empty_answer(tokens: list[int], tokenizer=None) -> bool:
    """No visible text: nothing before the end token, or only special tokens and whitespace."""
    if tokenizer is None:
        return not tokens
    return not tokenizer.decode(tokens, skip_special_tokens=True).strip()


def token_entropy(token_ids) -> float:
    """Normalised token entropy of a generated answer (the ASU paper's / "closer look" measure):
    the entropy of its unigram token distribution divided by its maximum, log(n) for n tokens;
    1 when no token repeats, 0 for a single token repeated (or n <= 1). Low = repetitive."""
    ids = list(token_ids)
    total = len(ids)
    if total <= 1:
        return 0.0
    counts: dict[int, int] = {}
    for token in ids:
        counts[token] = counts.get(token, 0) + 1
    entropy = -sum(c / total * math.log(c / total) for c in counts.values())
    return entropy / math.log(total)


def machine_info() -> dict:
    """What a measurement ran on: CPU model and cores, torch threads, GPU, OS, Python."""
    import os
    import platform
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:  # not Linux
        pass
    info = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
