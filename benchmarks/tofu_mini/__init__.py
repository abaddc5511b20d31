"""TOFU-mini: `python -m benchmarks.tofu_mini.run` (see its README)."""
