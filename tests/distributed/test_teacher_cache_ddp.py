"""ASU's output caches under DDP: every rank ends with the whole cache, the same training, no
frozen copy; a row missing on one rank never leaves the other waiting."""

import json
import os
import sys
from pathlib import Path

import pytest

from .distributed_support import free_port, run, torchrun

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def spec(**method_args):
    return {
        "method": "asu",
        "method_args": {"temperature": 2.0, **method_args},
        "settings": {"epochs": 2, "batch_size": 2, "learning_rate": 1e-3},
    }


def losses(records, key="loss"):
    return [h[key] for h in records[0]["log_history"] if key in h]


def test_cached_two_process_run_matches_the_uncached_one(tmp_path):
    """The cache is filled from the student on both ranks (each its share), without a copy."""
    (tmp_path / "live").mkdir()
    (tmp_path / "cached").mkdir()
    live = torchrun(tmp_path / "live", spec())
    cached = torchrun(tmp_path / "cached", spec(teacher_cache=True, teacher_cache_dtype="float32"))
    assert cached[0]["params"] == cached[1]["params"]  # the ranks stay in step
    assert len(losses(cached)) == len(losses(live)) >= 2
    assert losses(cached) == pytest.approx(losses(live), rel=1e-5)


def test_ASU_KL_without_a_copy_matches_the_live_run(tmp_path):
    kl = {"retain_loss_type": "KL"}
    caches = {"teacher_cache": True, "reference_cache": True, "teacher_cache_dtype": "float32"}
    runs = {}
    for name, method_args in (("live", kl), ("cached", {**kl, **caches})):
        (tmp_path / name).mkdir()
        settings = {"epochs": 2, "batch_size": 2, "learning_rate": 0.05, "optim": "sgd"}
        runs[name] = torchrun(tmp_path / name, {**spec(**method_args), "settings": settings})
    assert runs["cached"][0]["params"] == runs["cached"][1]["params"]
    for key in ("loss", "asu/forget_loss", "asu/retain_loss"):
        assert len(losses(runs["cached"], key)) == len(losses(runs["live"], key)) >= 4
        # (this toy teacher is barely smoothed: forget losses ~5e-7, float noise ~3e-8)
        expected = pytest.approx(losses(runs["live"], key), rel=1e-5, abs=1e-7)
        assert losses(runs["cached"], key) == expected


def test_a_miss_on_one_rank_is_run_by_every_rank_or_fails_on_every_rank(tmp_path):
    """Rank 1 lacks a row, rank 0 none: with `collective` (ZeRO-3) both run the model once; with
    no model left both raise the same error (neither waits for the other)."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={free_port()}",
        "-m",
        "tests.distributed.test_teacher_cache_ddp",
        str(tmp_path),
    ]
    records = run_from_repo(command, tmp_path)
    for rank, record in enumerate(records):
        # the fill: 3 rows over 2 ranks, each rank 2 forwards of one row, the whole cache on both
        assert record["fill_calls"] == [1, 1] and record["rows"] == 3
        assert record["collective_calls"] == [1]  # rank 0: a stand-in row; rank 1: its miss
        assert record["local_calls"] == ([] if rank == 0 else [1])
        assert record["error"].startswith("ASU's forget cache lacks rows of a training batch")


def run_from_repo(command, out):
    cwd = os.getcwd()
    os.chdir(REPO)  # `-m tests.distributed...` is imported from the repository root
    try:
        return run(command, out, 2, timeout=300)
    finally:
        os.chdir(cwd)


def miss_worker(out: str) -> None:
    import torch
    import torch.distributed as dist

    from asu_simu_plugin.methods.asu.teacher_cache import MissingRowsError, TeacherCache

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    vocabulary = 11
    rows = [
        {
            "input_ids": torch.tensor([4, 5 + i, 6, 7]),
            "attention_mask": torch.ones(4, dtype=torch.long),
            "labels": torch.tensor([-100, -100, 6, 7]),
        }
        for i in range(4)
    ]

    def collate(items):
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def counted(calls):
        def compute(inputs):
            calls.append(inputs["input_ids"].shape[0])
            ids = inputs["input_ids"] % vocabulary
            return torch.nn.functional.one_hot(ids, vocabulary).float() * 3

        return compute

    record = {"fill_calls": [], "collective_calls": [], "local_calls": []}
    cache = TeacherCache(None, "float32")
    cache.build(rows[:3], collate, counted(record["fill_calls"]), 1, "cpu", show_progress=False)
    record["rows"] = len(cache)
    batch = collate([rows[0], rows[3] if rank == 1 else rows[1]])  # row 3: not in the cache
    cache.collective = True
    cache.lookup(batch, counted(record["collective_calls"]))
    missing = cache.keys(collate([rows[3]]))[0]
    cache.rows.pop(missing, None)  # rank 1 misses it again
    cache.collective = False
    cache.lookup(batch, counted(record["local_calls"]))
    cache.rows.pop(missing, None)
    try:
        cache.lookup(batch, None)
        record["error"] = ""
    except MissingRowsError as error:
        record["error"] = str(error)
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    miss_worker(sys.argv[1])
