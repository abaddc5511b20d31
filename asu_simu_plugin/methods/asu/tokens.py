"""Function and content answer tokens: the split the τ measurements score separately.

A token is a *function* token if its decoded text, stripped and lower-cased, is in `STOP_WORDS`
(a compact English stop-word list) or contains no letter or digit (punctuation, whitespace, eos
and other special tokens); every other answer token is a *content* token.
"""

from __future__ import annotations

import torch

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before
    being below between both but by can could did do does doing down during each few for from
    further had has have having he her here hers herself him himself his how i if in into is it
    its itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
    also known born named called write wrote writes written worked works one two many much""".split()
)


def is_function_token(text: str) -> bool:
    """The module's rule: a stop word, or no letter/digit at all (punctuation, whitespace)."""
    word = text.strip().lower()
    return not any(ch.isalnum() for ch in word) or word in STOP_WORDS


def function_token_ids(tokenizer, token_ids) -> torch.Tensor:
    """The ids among `token_ids` that are function tokens (special tokens always are)."""
    special = set(tokenizer.all_special_ids)
    unique = sorted({int(i) for i in token_ids})
    # Only the ids that occur are decoded: a 128k vocabulary would take seconds.
    return torch.tensor(
        [i for i in unique if i in special or is_function_token(tokenizer.decode([i]))],
        dtype=torch.long,
    )


# -- temperature: auto / layers: auto, and the collapse guard -------------------------------------
