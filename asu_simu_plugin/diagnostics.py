"""Small measurements shared by the demo, the τ sweep and the tests."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from asu_simu_plugin.data import PadCollator, QADataset, prompt_and_answer_text
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


@torch.no_grad()
def greedy_answer(
    model, tokenizer, question: str, system_prompt: str | None = None, max_new_tokens: int = 24
) -> str:
    """Greedy continuation of the prompt for `question`, decoded without special tokens."""
    model.eval()
    prompt, _ = prompt_and_answer_text(tokenizer, question, "", system_prompt)
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    ids = ids.to(next(model.parameters()).device)
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def token_entropy(token_ids: list[int]) -> float:
    """Entropy (nats) of the empirical token distribution of a generation: low = repetitive."""
    if not token_ids:
        return 0.0
    counts: dict[int, int] = {}
    for token in token_ids:
        counts[token] = counts.get(token, 0) + 1
    total = len(token_ids)
    return -sum(c / total * math.log(c / total) for c in counts.values())


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
