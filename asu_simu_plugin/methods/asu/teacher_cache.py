"""ASU's output caches: a fixed model's answer-position distributions, computed once.

The forget-teacher (the original model, tempered) and the forget set never change during
unlearning, so the teacher's output on a forget example is the same every epoch; the same holds
for the original model's output on a retain example (the reference of the KL retain loss). A
`TeacherCache` stores, per example, those log-probabilities over the vocabulary at the positions
whose logits predict an answer token (the only positions the losses read).

Both can be filled before the student's first update from the student itself: at that moment it
*is* the original model (`ASUMixin` then never builds a frozen copy).

Rows are keyed by their content: the attended input ids, and the answer labels with their
positions counted from the first attended token (padding stripped). The same example hits the
cache whatever the shuffling, padding side or batch composition, under gradient accumulation, on
any rank and after a resume; the same text split differently between question and answer does
not. (The harness's unlearning collator drops the dataset `index`, so it cannot be the key.)

A row missing from the cache is computed on the spot when its model still exists (a frozen copy,
LoRA's adapter-disabled base, or the student before its first update); otherwise the lookup
raises `MissingRowsError` on every rank. Under torch.distributed the ranks agree on the number
of missing rows first, so they fail together instead of waiting on each other; with `collective`
(DeepSpeed ZeRO-3, whose forward gathers weights from every rank) every rank then runs the model
once, on its own missing rows or on a stand-in row.

Precision: log-probabilities are stored in `dtype` (float16 by default: 2 bytes × vocabulary per
answer token, on the CPU). Measured on a toy model, the forget loss of a batch differs from the
live teacher's by <= 1.1e-6 relative with float32 storage (float rounding), <= 1.7e-4 with
float16 and <= 1.9e-3 with bfloat16; over two epochs of training the logged losses differ by 0
(float32) and <= 1.4e-5 (float16). See `tests/test_teacher_cache.py`.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm.auto import tqdm

from asu_simu_plugin.losses import IGNORE_INDEX, mean_over_answer_tokens

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_KEYS = ("input_ids", "attention_mask", "labels")


class MissingRowsError(RuntimeError):
    """Rows a cache lacks, and the model that would compute them no longer exists."""


def storage_dtype(name) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"teacher_cache_dtype={name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def row_key(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of one example's content, independent of its padding."""
    attended = attention_mask.bool()
    first = int(attended.nonzero()[0]) if bool(attended.any()) else 0
    answer = labels != IGNORE_INDEX
    digest = hashlib.sha1()
    for tensor in (input_ids[attended], answer.nonzero().flatten() - first, labels[answer]):
        digest.update(tensor.detach().to("cpu", torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits predict an answer token."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


def cached_kl_loss(
    model_logits: torch.Tensor,
    positions: torch.Tensor,
    target_logprobs: torch.Tensor,
    labels: torch.Tensor,
) -> torch.Tensor:
    """KL(cached target ‖ model) on the answer positions, reduced as
    `losses.asu_distillation_loss` / `losses.retain_kl_loss` (mean over each sequence's answer
    tokens, then over sequences): the same value, computed on the answer rows only."""
    target = F.log_softmax(target_logprobs.float(), dim=-1)  # renormalised after rounding
    model = F.log_softmax(model_logits[positions].float(), dim=-1)
    per_row = F.kl_div(model, target, reduction="none", log_target=True).sum(dim=-1)
    per_token = torch.zeros(positions.shape, dtype=per_row.dtype, device=per_row.device)
    per_token[positions] = per_row
    return mean_over_answer_tokens(per_token[:, :-1], labels)


class TeacherCache:
    """A fixed model's log-probabilities at answer positions, keyed by example content.

    `fingerprint` names what the stored outputs depend on besides the data (the model, τ, the
    tempered layers, ...); `check(fingerprint)` empties the cache when it changes. `kind` and
    `option` name the rows and the setting in error messages. `collective`: every rank runs the
    model whenever any rank misses a row (see the module docstring).
    """

    def __init__(self, fingerprint, dtype="float16", kind="forget", option="teacher_cache"):
        self.fingerprint = fingerprint
        self.dtype = storage_dtype(dtype)
        self.kind = kind
        self.option = option
        self.collective = False
        self.rows: dict[str, torch.Tensor] = {}
        self.built = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self.rows)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.rows.values())

    def check(self, fingerprint) -> None:
        if fingerprint != self.fingerprint:
            self.rows.clear()
            self.built = False
            self.fingerprint = fingerprint

    # -- filling -------------------------------------------------------------------------------
    def _store(self, keys, labels: torch.Tensor, logits: torch.Tensor) -> None:
        positions = answer_positions(labels)
        floor = torch.finfo(self.dtype).min  # keeps removed tokens at probability 0, finite
        for i, key in enumerate(keys):
            logprobs = torch.log_softmax(logits[i][positions[i]].float(), dim=-1)
            self.rows[key] = logprobs.clamp_min(floor).to("cpu", self.dtype)

    def build(
        self, dataset, collate, compute, batch_size: int, device, show_progress=True, indices=None
    ):
        """Fill the cache from the examples `indices` of `dataset` (default: all) in one pass.

        `compute(inputs)` returns the model's logits. Under torch.distributed each rank
        computes an interleaved share and the shares are exchanged, so every rank ends up with
        the whole cache.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        indices = list(range(len(dataset))) if indices is None else list(indices)
        mine = indices[rank::world] or indices[:1]
        # Every rank runs as many forwards (DeepSpeed ZeRO-3 gathers weights collectively).
        mine += mine[:1] * (-(-len(indices) // world) - len(mine))
        starts = range(0, len(mine), batch_size)
        label = f"ASU {self.kind} cache"
        for start in tqdm(starts, desc=label, unit="batch", disable=not show_progress or rank):
            batch = collate([dataset[i] for i in mine[start : start + batch_size]])
            batch = {k: v.to(device) for k, v in batch.items() if k in _KEYS}
            keys = self.keys(batch)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
            self._store(keys, batch["labels"], compute(inputs))
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, self.rows)
            for share in shares:
                self.rows.update(share)
        self.built = True

    @staticmethod
    def keys(batch: dict) -> list[str]:
        return [
            row_key(ids, mask, labels)
            for ids, mask, labels in zip(
                batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
            )
        ]

    # -- reading -------------------------------------------------------------------------------
    def lookup(self, batch: dict, compute) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions [B, T] bool, log-probabilities [answer positions, V] fp32) for `batch`,
        on its device, from the cache. Missing rows are computed with `compute(inputs)` (the
        model's logits) and stored first; `compute=None`: the model is gone, a miss is an
        error."""
        keys = self.keys(batch)
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        device = batch["input_ids"].device
        wanted = _most_on_any_rank(len(missing), device) if _distributed() else len(missing)
        if wanted:
            self._fill_missing(batch, keys, missing, compute)
        positions = answer_positions(batch["labels"])
        rows = [self.rows[key] for key in keys]
        for row, count in zip(rows, positions.sum(dim=1).tolist(), strict=True):
            if row.shape[0] != count:  # the same key with another answer length: a stale entry
                raise RuntimeError(
                    f"{self.option} entry does not match its example (answer length "
                    f"{row.shape[0]} vs {count}); run with {self.option}=false and report this"
                )
        return positions, torch.cat(rows).to(device, torch.float32, non_blocking=True)

    def _fill_missing(self, batch, keys, missing, compute) -> None:
        """Rows some rank lacks: computed here (a stand-in row under `collective` when this rank
        lacks none), or the same error on every rank when no model can compute them."""
        if compute is None:
            raise MissingRowsError(
                f"ASU's {self.kind} cache lacks rows of a training batch ({len(missing)} here), "
                "and the model they come from (the student before its first update) is gone. "
                f"The cache holds the {self.kind} set as it was before training, so the "
                "training batches hold other rows (a dataset or collator that changes examples "
                f"between epochs?). Run with {self.option}=false."
            )
        if not missing and not self.collective:
            return
        index = torch.tensor(missing or [0], device=batch["input_ids"].device)
        inputs = {k: batch[k].index_select(0, index) for k in ("input_ids", "attention_mask")}
        logits = compute(inputs)
        if missing:
            self._store([keys[i] for i in missing], batch["labels"].index_select(0, index), logits)

    def teacher_logits(self, batch: dict, compute) -> torch.Tensor:
        """[B, T, V] fp32 log-probabilities for `batch` (zeros off the answer positions), for
        transforms of whole logits such as `losses.suppress_end_of_answer`."""
        positions, rows = self.lookup(batch, compute)
        logits = torch.zeros((*positions.shape, rows.shape[-1]), device=rows.device)
        logits[positions] = rows
        return logits


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _most_on_any_rank(count: int, device) -> int:
    """The largest `count` over the ranks (a collective: every rank calls it as often)."""
    if dist.get_backend() == "nccl" and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    value = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item())
