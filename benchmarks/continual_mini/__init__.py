"""Continual-mini: TOFU authors unlearned task after task through the harness."""
