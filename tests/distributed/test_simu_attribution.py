"""SIMU attribution shared across ranks: each rank attributes its share of the forget set and the
scores are summed, so 2 processes derive exactly the masks of 1 process."""

from __future__ import annotations

import json

import pytest

from .distributed_support import torchrun

pytestmark = pytest.mark.distributed


def test_two_processes_make_the_masks_of_one(tmp_path):
    def spec(batch_size):
        return {
            "method": "simu",
            # Attribution batches of 1 row: 2 ranks attribute alternate rows of the forget set.
            "method_args": {"steps": 2, "threshold": 0.3, "attribution_batch_size": 1},
            "settings": {"epochs": 1, "batch_size": batch_size, "max_steps": 1},
        }

    two = torchrun(tmp_path / "two", spec(1), processes=2)
    one = torchrun(tmp_path / "one", spec(2), processes=1)
    assert any(any(row) for row in one[0]["masks"].values())
    assert two[0]["masks"] == two[1]["masks"] == one[0]["masks"]
    made = json.loads((tmp_path / "two" / "simu_masks.json").read_text())
    assert made["processes"] == 2 and made["attribution"] == "per_token"
    assert (
        made["forget_rows"]
        == json.loads((tmp_path / "one" / "simu_masks.json").read_text())["forget_rows"]
    )
