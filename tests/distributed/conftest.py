"""The distributed tier: 2 CPU processes (gloo) under DDP and DeepSpeed ZeRO.

These tests launch several processes each and take minutes, so they run only when selected:
`pytest -m distributed tests/distributed` (as `.ci/run` does). The accelerate configs of the
DeepSpeed route live beside them (zero2.yaml, zero3.yaml and their DeepSpeed JSON).
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    if "distributed" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="distributed tier: run with `pytest -m distributed`")
    for item in items:
        if "distributed" in item.keywords:
            item.add_marker(skip)
