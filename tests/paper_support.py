"""Tiny local stand-ins for the paper's scoring models, built in the tests (never the hub):
an NLI classifier (a 1-layer BERT with the labels entailment / neutral / contradiction) and a
sentence-transformers model (the same kind of BERT, mean-pooled).

Run as a script with the harness's Python, so the directories are written by the transformers
that reads them: `python tests/paper_support.py OUT_DIR [--no-embedding]`.
"""

from __future__ import annotations

import sys
from pathlib import Path

NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
WORDS = (
    "the a an is was in of and to by who what where which when born wrote book author "
    "writer novel play famous known city country paris tower eiffel shakespeare william "
    "romeo juliet orwell george 1984 award won prize his her their father mother worked"
).split()


def word_tokenizer(words=WORDS):
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate([*SPECIAL, *dict.fromkeys(words)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=128,
    )


def bert_config(vocab_size: int, **extra):
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        initializer_range=0.5,  # large random weights: labels that vary with the input
        **extra,
    )


def save_nli_model(path: Path, seed: int = 0) -> Path:
    import torch
    from transformers import BertForSequenceClassification

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    config = bert_config(
        len(tokenizer),
        num_labels=3,
        id2label=NLI_LABELS,
        label2id={v: k for k, v in NLI_LABELS.items()},
    )
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_embedding_model(path: Path, seed: int = 0) -> Path:
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import BertModel

    tokenizer = word_tokenizer()
    torch.manual_seed(seed)
    encoder_dir = path.parent / f"{path.name}_encoder"
    BertModel(bert_config(len(tokenizer))).save_pretrained(encoder_dir)
    tokenizer.save_pretrained(encoder_dir)
    encoder = models.Transformer(str(encoder_dir), max_seq_length=128)
    dimension = getattr(encoder, "get_embedding_dimension", None) or (
        encoder.get_word_embedding_dimension  # sentence-transformers < 5.3
    )
    pooling = models.Pooling(dimension(), pooling_mode="mean")
    SentenceTransformer(modules=[encoder, pooling], device="cpu").save(str(path))
    return path


if __name__ == "__main__":
    out = Path(sys.argv[1])
    save_nli_model(out / "nli")
    if "--no-embedding" not in sys.argv:
        save_embedding_model(out / "embedding")
