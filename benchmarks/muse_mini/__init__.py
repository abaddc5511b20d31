"""MUSE-mini: `python -m benchmarks.muse_mini.run` (see its README)."""
