"""Argument types and checks shared by the subcommands (all run before a model is loaded).

The `type=` callables raise `argparse.ArgumentTypeError`, which argparse reports as
"argument --flag: ..." (a usage error, exit status 2).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path


def _number(text: str, convert, kind: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {kind}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = _number(text, float, "a number")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def non_negative_int(text: str) -> int:
    value = _number(text, int, "an integer")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def number_list(text: str, flag: str, convert=float, check=None) -> list:
    """'1,2,2.5' -> [1.0, 2.0, 2.5]; each item converted and checked (ValueError names `flag`)."""
    kind = "integers" if convert is int else "numbers"
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError(f"{flag} is empty: give comma-separated {kind}")
    values = []
    for item in items:
        try:
            value = convert(item)
        except ValueError:
            raise ValueError(
                f"{flag} must be comma-separated {kind}, e.g. "
                f"{'0,1,2' if convert is int else '0.1,0.3,0.5'} (got {item!r} in {text!r})"
            ) from None
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{flag}: {item!r} is not a finite number")
        if check is not None:
            check(value)
        values.append(value)
    return values


def model_source(text: str) -> str:
    """A local model folder (with config.json) or, when online, a hub id such as org/name."""
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise argparse.ArgumentTypeError(f"{text} is a file; give the model's folder")
        if not (path / "config.json").is_file():
            raise argparse.ArgumentTypeError(
                f"{text} has no config.json: not a transformers model folder"
            )
        return text
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    hub_like = text.count("/") <= 1 and not text.startswith((".", "/", "~"))
    if offline or not hub_like:
        raise argparse.ArgumentTypeError(f"{text}: no such model folder")
    return text


# A tokenizer saved by transformers has at least one of these.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "spiece.model",
)


def check_model_folder(text: str) -> None:
    """A local model folder holds tokenizer files and intact weight files (a hub id: nothing to
    check). ValueError names the file and the fix; nothing is loaded."""
    from asu_simu_plugin.output import file_problem, weight_files

    path = Path(text).expanduser()
    if not path.is_dir():
        return
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(
            f"{text} has no tokenizer files ({', '.join(TOKENIZER_FILES)}): save the tokenizer "
            f"into it (tokenizer.save_pretrained({str(text)!r})) or copy its files there"
        )
    for index in sorted(path.glob("*.index.json")):
        problem = file_problem(index)
        if problem:
            raise ValueError(f"{index} is damaged ({problem}): copy or download the model again")
        shards = set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values())
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ValueError(
                f"{index} lists {', '.join(missing)}, missing from {text}: copy or download "
                "the model again"
            )
    for file in weight_files(path):
        problem = file_problem(file)
        if problem:
            raise ValueError(
                f"{file} is damaged ({problem}): copy or download the model again (or save it "
                "again with save_pretrained)"
            )


def output_folder(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("empty path")
    return text


def seed(text: str) -> int:
    """A random seed numpy accepts: 0 <= seed < 2**32."""
    value = non_negative_int(text)
    if value >= 2**32:
        raise argparse.ArgumentTypeError(f"must be < 2**32 (numpy's range), got {text}")
    return value
