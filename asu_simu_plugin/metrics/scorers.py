"""The two models the paper's evaluation scores answers with: an NLI classifier (entailment) and
a sentence-embedding model (cosine similarity). Loaded once per path and process.

The embedding model needs sentence-transformers, which is an extra:
`pip install "asu-simu-plugin[paper]"`.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

NLI_DEFAULT = "sileod/deberta-v3-base-tasksource-nli"
EMBEDDING_DEFAULT = "paraphrase-MiniLM-L6-v2"
KINDS = {
    # kind: (what it is for, config key, default model)
    "nli": ("the entailment score", "nli_model", NLI_DEFAULT),
    "embedding": ("the cosine similarity", "embedding_model", EMBEDDING_DEFAULT),
}


class ScorerModelError(RuntimeError):
    """A scoring model (NLI or sentence embedding) cannot be loaded; the message names the model
    and the config key to set."""

    def __init__(self, kind: str, path: str, reason: str, key: str | None = None):
        purpose, name, default = KINDS[kind]
        self.kind, self.path, self.reason = kind, path, reason
        key = key or f"eval.asu_paper.{name}"
        super().__init__(
            f"{purpose} needs the {'NLI' if kind == 'nli' else 'sentence-embedding'} model "
            f"{path!r}, which could not be loaded ({reason}). Set {key}=/path/to/a/local/copy "
            f"(default: {default}), or {key}=null to leave {purpose} out (Model Utility and "
            "Forget Efficacy are then computed without it and say so)."
        )

    def with_key(self, key: str) -> ScorerModelError:
        return ScorerModelError(self.kind, self.path, self.reason, key)


@functools.cache
def nli_model(path: str):
    """(tokenizer, sequence classifier) of an NLI model, in eval mode."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except (OSError, ValueError) as error:
        raise ScorerModelError("nli", path, f"{type(error).__name__}: {error}") from error
    return tokenizer, model.eval()


@functools.cache
def embedding_model(path: str):
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as error:
        raise ScorerModelError(
            "embedding",
            path,
            'sentence-transformers is not installed: pip install "asu-simu-plugin[paper]"',
        ) from error
    try:
        return SentenceTransformer(path, device="cpu")
    except (OSError, ValueError) as error:
        raise ScorerModelError("embedding", path, f"{type(error).__name__}: {error}") from error


def load(kind: str, path: str):
    return nli_model(path) if kind == "nli" else embedding_model(path)


@torch.no_grad()
def nli_labels(
    path: str,
    premises: Sequence[str],
    hypotheses: Sequence[str],
    device=None,
    batch_size: int = 30,
) -> list[str]:
    """The NLI model's top label (its `id2label` name) for each (premise, hypothesis) pair:
    the pair is the classifier's (text, text_pair), as the `text-classification` pipeline of
    the official code feeds it. Inputs longer than the model takes are truncated."""
    tokenizer, model = nli_model(path)
    model.to(device or "cpu")
    labels = []
    for start in range(0, len(premises), batch_size):
        encoded = tokenizer(
            list(premises[start : start + batch_size]),
            list(hypotheses[start : start + batch_size]),
            padding=True,
            truncation=True,
            return_tensors="pt",
        ).to(model.device)
        predicted = model(**encoded).logits.argmax(dim=-1).tolist()
        labels.extend(model.config.id2label[i] for i in predicted)
    return labels


@torch.no_grad()
def embeddings(path: str, texts: Sequence[str], device=None, batch_size: int = 32) -> torch.Tensor:
    """Sentence embeddings [len(texts), dim], float32 on the CPU."""
    model = embedding_model(path)
    model.to(device or "cpu")
    vectors = model.encode(
        list(texts), batch_size=batch_size, convert_to_tensor=True, show_progress_bar=False
    )
    return vectors.float().cpu()
