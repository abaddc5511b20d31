"""The normalised unigram entropy of a token sequence, as the report measures generations."""

from __future__ import annotations

import math
from collections import Counter


def token_entropy(token_ids):
    """Entropy of the unigram distribution of `token_ids` over log n, for n ids: in [0, 1].

    1 when no token repeats; repetitive or degenerate output ("the the the") scores low; fewer
    than two tokens score 0. The base of the logarithm cancels (bits over log2 n alike).
    """
    n = len(token_ids)
    if n < 2:
        return 0.0
    counts = Counter(token_ids).values()
    return -sum(c / n * math.log(c / n) for c in counts) / math.log(n)
