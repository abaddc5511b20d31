"""Loading the mini benchmarks' run.py scripts in tests, and the stand-ins their tests share."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_benchmark(name):
    """benchmarks/<name>/run.py as a module (registered, so dataclasses resolve annotations)."""
    spec = importlib.util.spec_from_file_location(
        f"{name}_run", ROOT / "benchmarks" / name / "run.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def fake_harness(tmp_path):
    """A folder the scripts accept as an open-unlearning checkout (argument parsing only)."""
    harness = tmp_path / "ou"
    (harness / "src").mkdir(parents=True)
    (harness / "src" / "train.py").write_text("")
    return harness


class WordTokenizer:
    def tokenize(self, text):
        return text.split()
