"""A stand-in sentence-embedding model for the ASU paper's cosine similarity, from PyPI alone.

The paper's model (`paraphrase-MiniLM-L6-v2`) comes from the Hugging Face hub. Where the hub is out
of reach, this builds a stand-in from the `wordllama` wheel, which ships its weights: WordLlama's
static token embeddings (`l2_supercat_256`: Llama-2's 32k tokens, 256 dimensions), mean-pooled
over a text's tokens without special tokens, as WordLlama pools them. It is saved as a
sentence-transformers directory (one StaticEmbedding module, whose EmbeddingBag takes that same
mean), so `eval.asu_paper.embedding_model=DEST` or a mini benchmark's `--embedding-model DEST`
loads it like any sentence-transformers model. A weaker encoder than the paper's: reports name it.

    pip install --no-deps wordllama "sentence-transformers>=5.2,<6"
    python -m benchmarks.mini.embedding /models/wordllama-l2_supercat_256
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

CONFIG, DIM = "l2_supercat", 256  # the one model the wheel ships
WEIGHTS = f"weights/{CONFIG}_{DIM}.safetensors"
TOKENIZER = f"tokenizers/{CONFIG}_tokenizer_config.json"


def wordllama_dir() -> Path:
    """The installed `wordllama` package's folder (found without importing it)."""
    spec = importlib.util.find_spec("wordllama")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("wordllama is not installed: pip install --no-deps wordllama")
    return Path(list(spec.submodule_search_locations)[0])


def build(dest: Path, package_dir: Path | None = None) -> Path:
    """Write the stand-in to `dest` (which must not exist) from WordLlama's files in
    `package_dir` (default: the installed package)."""
    package_dir = package_dir or wordllama_dir()
    weights, tokenizer_file = package_dir / WEIGHTS, package_dir / TOKENIZER
    missing = [str(p) for p in (weights, tokenizer_file) if not p.is_file()]
    if missing:
        raise SystemExit(
            f"{', '.join(missing)} not found: install wordllama 0.4 (its wheel ships them)"
        )
    if dest.exists():
        raise SystemExit(f"{dest} exists: remove it or pick another destination")
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise SystemExit(
            'sentence-transformers is not installed: pip install "sentence-transformers>=5.2,<6"'
        ) from None
    try:  # its home since sentence-transformers 5.4; the old path still works, with a warning
        from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    except ImportError:
        from sentence_transformers.models import StaticEmbedding
    from safetensors.torch import load_file
    from tokenizers import Tokenizer

    table = load_file(str(weights))["embedding.weight"].float()  # stored as float16
    module = StaticEmbedding(Tokenizer.from_file(str(tokenizer_file)), embedding_weights=table)
    SentenceTransformer(modules=[module], device="cpu").save(str(dest))
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("dest", type=Path, help="the sentence-transformers directory to write (new)")
    p.add_argument(
        "--package-dir",
        type=Path,
        default=None,
        help="wordllama's package folder (default: installed)",
    )
    args = p.parse_args(argv)
    print(f"wrote {build(args.dest, args.package_dir)}")


if __name__ == "__main__":
    sys.exit(main())
