"""Stand-ins the mini benchmarks' tests share."""

from __future__ import annotations


def fake_harness(tmp_path):
    """A folder the scripts accept as an open-unlearning checkout (argument parsing only)."""
    harness = tmp_path / "ou"
    (harness / "src").mkdir(parents=True)
    (harness / "src" / "train.py").write_text("")
    return harness


class WordTokenizer:
    """One token per whitespace-separated word, ids in order of first appearance."""

    def __init__(self):
        self.vocab = {}

    def encode(self, text, add_special_tokens=True):
        return [self.vocab.setdefault(word, len(self.vocab)) for word in text.split()]
