"""ASU's `temperature: auto` / `layers: auto` under DDP: rank 0 chooses, every rank tempers alike."""

import json

import pytest

from .distributed_support import torchrun

pytestmark = pytest.mark.distributed


def test_every_rank_gets_rank_zeros_choice(tmp_path):
    spec = {
        "method": "asu",
        "method_args": {
            "temperature": "auto",
            "layers": "auto",
            "tau_sweep": {"sample": 4, "taus": [2.0, 4.0], "layer_parts": [2]},
            "collapse_guard": {"sample": 4},
        },
        "settings": {"epochs": 1, "batch_size": 2, "learning_rate": 1e-3},
    }
    ranks = torchrun(tmp_path, spec)
    chosen = json.loads((tmp_path / "asu_temperature.json").read_text())
    expected_layers = chosen["layers"] if chosen["layers"] is not None else [0, 1, 2, 3]
    for record in ranks:
        assert record["teacher"]["temperature"] == chosen["temperature"]
        assert record["teacher"]["layers"] == expected_layers
        assert record["teacher"]["collapse_stats"] == ranks[0]["teacher"]["collapse_stats"]
    assert ranks[0]["params"] == ranks[1]["params"]
    assert (tmp_path / "asu_tau_sweep.csv").is_file() and (tmp_path / "asu_tau_sweep.png").is_file()
