"""ASU, SIMU and Sophia unlearning for the open-unlearning harness (and plain transformers)."""

__version__ = "0.1.0"
