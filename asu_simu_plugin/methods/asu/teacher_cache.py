"""ASU's teacher-output cache: the forget-teacher's answer-position distributions, computed once.

The teacher (frozen original, tempered) and the forget set never change during unlearning, so
the teacher's output on a forget example is the same every epoch. The cache stores, per forget
example, the teacher's log-probabilities over the vocabulary at the positions whose logits
predict an answer token (the only positions the ASU loss reads), and hands them back as a
logits tensor shaped like the batch, so every later transform of the teacher's logits (e.g.
`losses.suppress_end_of_answer`) applies to cached and fresh outputs alike.

Rows are keyed by their content (the attended input ids and the answer labels, padding
stripped), not by their place in a batch: the same example hits the cache whatever the shuffling,
padding side or batch composition, under gradient accumulation, on any DDP rank and after a
resume. (The harness's unlearning collator drops the dataset `index`, so it cannot be the key.)
A row missing from the cache is computed by the teacher and stored on the spot.

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
from tqdm.auto import tqdm

from asu_simu_plugin.losses import IGNORE_INDEX

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(name) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"teacher_cache_dtype={name!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[name]


def row_key(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> str:
    """A digest of one example's content, independent of its padding."""
    digest = hashlib.sha1()
    for tensor in (input_ids[attention_mask.bool()], labels[labels != IGNORE_INDEX]):
        digest.update(tensor.detach().to("cpu", torch.int64).numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits predict an answer token."""
    positions = torch.zeros_like(labels, dtype=torch.bool)
    positions[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return positions


class TeacherCache:
    """Teacher log-probabilities at answer positions, keyed by example content.

    `fingerprint` names what the stored outputs depend on besides the data (the model, τ, the
    tempered layers, ...); `check(fingerprint)` empties the cache when it changes.
    """

    def __init__(self, fingerprint, dtype: str = "float16"):
        self.fingerprint = fingerprint
        self.dtype = storage_dtype(dtype)
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
    def _store(self, keys, labels: torch.Tensor, teacher_logits: torch.Tensor) -> None:
        positions = answer_positions(labels)
        floor = torch.finfo(self.dtype).min  # keeps removed tokens at probability 0, finite
        for i, key in enumerate(keys):
            logprobs = torch.log_softmax(teacher_logits[i][positions[i]].float(), dim=-1)
            self.rows[key] = logprobs.clamp_min(floor).to("cpu", self.dtype)

    def build(self, dataset, collate, compute, batch_size: int, device, show_progress=True):
        """Fill the cache from every example of `dataset` (a forget set) in one pass.

        `compute(inputs)` returns the teacher's logits. Under torch.distributed each rank
        computes an interleaved share and the shares are exchanged, so every rank ends up with
        the whole cache.
        """
        rank, world = (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)
        mine = list(range(rank, len(dataset), world))
        # Every rank runs as many teacher forwards (DeepSpeed ZeRO-3 gathers weights collectively).
        mine += mine[:1] * (-(-len(dataset) // world) - len(mine))
        starts = range(0, len(mine), batch_size)
        for start in tqdm(
            starts, desc="ASU teacher cache", unit="batch", disable=not show_progress or rank != 0
        ):
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
    def teacher_logits(self, batch: dict, compute) -> torch.Tensor:
        """[B, T, V] fp32 teacher log-probabilities for `batch` (zeros off the answer positions),
        from the cache; rows it lacks are computed with `compute(inputs)` and stored first."""
        keys = self.keys(batch)
        missing = [i for i, key in enumerate(keys) if key not in self.rows]
        self.misses += len(missing)
        self.hits += len(keys) - len(missing)
        if missing:
            index = torch.tensor(missing, device=batch["input_ids"].device)
            inputs = {k: batch[k].index_select(0, index) for k in ("input_ids", "attention_mask")}
            labels = batch["labels"].index_select(0, index)
            self._store([keys[i] for i in missing], labels, compute(inputs))
        positions = answer_positions(batch["labels"])
        rows = [self.rows[key] for key in keys]
        for row, count in zip(rows, positions.sum(dim=1).tolist(), strict=True):
            if row.shape[0] != count:  # the same key with another answer length: a stale entry
                raise RuntimeError(
                    "teacher cache entry does not match its example (answer length "
                    f"{row.shape[0]} vs {count}); run with teacher_cache=false and report this"
                )
        vocab = rows[0].shape[-1]
        device = batch["input_ids"].device
        logits = torch.zeros((*positions.shape, vocab), dtype=torch.float32, device=device)
        logits[positions] = torch.cat(rows).to(device, torch.float32, non_blocking=True)
        return logits


_KEYS = ("input_ids", "attention_mask", "labels")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
