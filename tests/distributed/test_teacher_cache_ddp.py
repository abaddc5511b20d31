"""ASU's teacher-output cache under DDP: every rank ends with the whole cache, same training."""

import pytest

from .distributed_support import torchrun

pytestmark = pytest.mark.distributed


def test_cached_two_process_run_matches_the_uncached_one(tmp_path):
    def spec(**cache):
        return {
            "method": "asu",
            "method_args": {"temperature": 2.0, **cache},
            "settings": {"epochs": 2, "batch_size": 2, "learning_rate": 1e-3},
        }

    (tmp_path / "live").mkdir()
    (tmp_path / "cached").mkdir()
    live = torchrun(tmp_path / "live", spec())
    cached = torchrun(tmp_path / "cached", spec(teacher_cache=True, teacher_cache_dtype="float32"))
    assert cached[0]["params"] == cached[1]["params"]  # the ranks stay in step
    losses_live = [h["loss"] for h in live[0]["log_history"] if "loss" in h]
    losses_cached = [h["loss"] for h in cached[0]["log_history"] if "loss" in h]
    assert len(losses_cached) == len(losses_live) >= 2
    assert losses_cached == pytest.approx(losses_live, rel=1e-5)
