"""The stand-in sentence-embedding model (benchmarks/mini/embedding.py): WordLlama's token table,
mean-pooled, as a sentence-transformers directory. Built on the harness's Python, which has
sentence-transformers (the `paper` extra), from a WordLlama-shaped package folder made here."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from harness_support import harness_paths
from safetensors.numpy import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

pytestmark = pytest.mark.harness

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["[UNK]", "the", "author", "was", "born", "in", "paris", "i", "don't", "know"]
TEXTS = ["the author was born in paris", "i don't know", "paris paris unknownword", ""]


def fake_wordllama(folder: Path, seed: int = 0) -> np.ndarray:
    """A folder laid out as the wordllama wheel: its weights (float16) and tokenizer files."""
    (folder / "weights").mkdir(parents=True)
    (folder / "tokenizers").mkdir()
    table = np.random.default_rng(seed).normal(size=(len(WORDS), 8)).astype(np.float16)
    save_file({"embedding.weight": table}, str(folder / "weights" / "l2_supercat_256.safetensors"))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizers" / "l2_supercat_tokenizer_config.json"))
    return table


def run_python(python, *args):
    return subprocess.run(
        [python, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def build(python, dest, package_dir):
    return run_python(
        python, "-m", "benchmarks.mini.embedding", str(dest), "--package-dir", str(package_dir)
    )


def test_the_stand_in_is_the_mean_of_the_token_rows_and_loads_as_sentence_transformers(tmp_path):
    _, python = harness_paths()
    table = fake_wordllama(tmp_path / "wordllama").astype(np.float32)
    dest = tmp_path / "standin"
    built = build(python, dest, tmp_path / "wordllama")
    assert built.returncode == 0, built.stderr[-2000:]
    encode = (
        "import json, sys; from sentence_transformers import SentenceTransformer; "
        "m = SentenceTransformer(sys.argv[1], device='cpu'); "
        "print(json.dumps(m.encode(json.loads(sys.argv[2])).tolist()))"
    )
    out = run_python(python, "-c", encode, str(dest), json.dumps(TEXTS))
    assert out.returncode == 0, out.stderr[-2000:]
    got = np.array(json.loads(out.stdout.strip().splitlines()[-1]))
    index = {w: i for i, w in enumerate(WORDS)}
    for text, vector in zip(TEXTS, got, strict=True):
        ids = [index.get(w, 0) for w in text.split()]  # no special tokens added
        want = table[ids].mean(axis=0) if ids else np.zeros(table.shape[1])
        np.testing.assert_allclose(vector, want, rtol=1e-6, atol=1e-6)
    # nothing overwritten; a folder without WordLlama's files named
    again = build(python, dest, tmp_path / "wordllama")
    assert again.returncode != 0 and f"{dest} exists: remove it" in again.stderr
    empty = build(python, tmp_path / "x", tmp_path)
    assert empty.returncode != 0 and "l2_supercat_256.safetensors" in empty.stderr
    assert "install wordllama" in empty.stderr and not (tmp_path / "x").exists()
