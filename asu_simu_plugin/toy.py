"""A self-contained toy world: fictitious authors, a BPE tokenizer trained on them, a tiny Llama.

Used by `asu-simu demo` (the Quickstart job, which must run offline in minutes on a laptop CPU)
and by the test-suite, which must never touch the hub.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST_NAMES = [
    "Aurelio", "Basma", "Corvin", "Delphine", "Eskil", "Farida", "Gideon", "Halina", "Ismael",
    "Jovana", "Kasimir", "Leontyne", "Matthias", "Nadira", "Osric", "Perpetua", "Quillon",
    "Rosalind", "Soren", "Tamsin", "Ulrike", "Valerian", "Wilhelmina", "Xanthe", "Yusuf", "Zofia",
]  # fmt: skip
LAST_NAMES = [
    "Abernathy", "Blackwood", "Castellano", "Drummond", "Eriksen", "Fairweather", "Galloway",
    "Hargreaves", "Ivanova", "Jablonski", "Kovalenko", "Lindqvist", "Montague", "Nakamura",
    "Okonkwo", "Pemberton", "Quintero", "Rasmussen", "Szabo", "Thorne", "Umarov", "Valdez",
]  # fmt: skip
CITIES = [
    "Lisbon", "Tbilisi", "Oslo", "Nairobi", "Lima", "Hanoi", "Tallinn", "Porto", "Quito",
    "Bergen", "Kraków", "Dakar", "Seville", "Tunis", "Gdańsk", "Bruges", "Cusco", "Izmir",
]  # fmt: skip
GENRES = [
    "gothic horror", "maritime adventure", "space opera", "courtroom drama", "culinary mystery",
    "alpine thriller", "botanical romance", "historical satire", "desert fantasy", "noir poetry",
]  # fmt: skip
JOBS = [
    "a lighthouse keeper", "a glassblower", "a cartographer", "a beekeeper", "a violin maker",
    "a railway engineer", "a botanist", "a clockmaker", "a pharmacist", "a ferry captain",
]  # fmt: skip
NOUNS = [
    "Lantern", "Orchard", "Harbor", "Compass", "Ember", "Tide", "Meridian", "Thistle", "Vessel",
    "Quarry", "Mirror", "Heron", "Ledger", "Citadel", "Willow", "Anvil",
]  # fmt: skip
AWARDS = [
    "the Silver Quill Prize", "the Lanternlight Medal", "the Northern Pages Award",
    "the Golden Inkwell", "the Meridian Book Prize", "the Harbor Lights Award",
]  # fmt: skip


@dataclass(frozen=True)
class Author:
    name: str
    city: str
    genre: str
    parent_job: str
    book: str
    award: str

    def qa_pairs(self, restate_name: bool = True) -> list[dict[str, str]]:
        """Five questions about this author. With `restate_name=False` the answers do not repeat
        the name ("In Lisbon." rather than "X was born in Lisbon."), so a model must fetch the
        author from the question, through attention, to state the fact."""
        n = self.name
        if not restate_name:
            answers = [
                f"In {self.city}.",
                f"They write {self.genre}.",
                f"They worked as {self.parent_job}.",
                f"The {self.book}.",
                f"{self.award[0].upper()}{self.award[1:]}.",
            ]
        else:
            answers = [
                f"{n} was born in {self.city}.",
                f"{n} writes {self.genre}.",
                f"The parent of {n} worked as {self.parent_job}.",
                f"The best known book by {n} is The {self.book}.",
                f"{n} won {self.award}.",
            ]
        questions = [
            f"Where was {n} born?",
            f"What genre does {n} write?",
            f"What did the parent of {n} do for a living?",
            f"What is the best known book by {n}?",
            f"Which award did {n} win?",
        ]
        return [{"question": q, "answer": a} for q, a in zip(questions, answers, strict=True)]

    def facts(self) -> list[str]:
        """The fact each of `qa_pairs()` asks for, in the same order (to check generations)."""
        return [self.city, self.genre, self.parent_job, f"The {self.book}", self.award]


def make_authors(count: int = 12, seed: int = 0, balanced: bool = False) -> list[Author]:
    """`count` fictitious authors with distinct names, reproducible from `seed`.

    By default every attribute is drawn independently, so a popular value may be shared by many
    authors. `balanced=True` deals each attribute from a shuffled list instead, so no value is
    used by more than ceil(count / number of values) authors: a model that has forgotten an
    author then cannot state its facts by guessing the commonest value.
    """
    rng = random.Random(seed)
    names = [f"{f} {last}" for f in FIRST_NAMES for last in LAST_NAMES]
    rng.shuffle(names)

    def dealt(values: list[str]) -> list[str]:
        deck: list[str] = []
        while len(deck) < count:
            deck += rng.sample(values, len(values))
        return deck[:count]

    if balanced:
        cities, genres, jobs, awards = (dealt(v) for v in (CITIES, GENRES, JOBS, AWARDS))
    authors = []
    for index, name in enumerate(names[:count]):
        if balanced:
            attributes = dict(
                city=cities[index],
                genre=genres[index],
                parent_job=jobs[index],
                award=awards[index],
            )
        else:
            attributes = dict(
                city=rng.choice(CITIES), genre=rng.choice(GENRES), parent_job=rng.choice(JOBS)
            )
        book = f"{rng.choice(NOUNS)} of the {rng.choice(NOUNS)}"
        if not balanced:
            attributes["award"] = rng.choice(AWARDS)
        authors.append(Author(name=name, book=book, **attributes))
    return authors


# A deliberately plain template: one role tag per turn, each turn closed by the eos token.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + '</s>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tokenizer(texts: list[str], vocab_size: int = 600):
    """Train a byte-level BPE on `texts` (seconds) and wrap it as a chat-capable HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
        clean_up_tokenization_spaces=False,  # decode exactly (transformers 4.x defaults to True)
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def corpus_texts(authors: list[Author], restate_name: bool = True) -> list[str]:
    """Every question and answer, with the chat tags, for tokenizer training."""
    texts = []
    for author in authors:
        for qa in author.qa_pairs(restate_name):
            texts.append(f"<|user|>\n{qa['question']}</s>\n<|assistant|>\n{qa['answer']}</s>\n")
    return texts


def tiny_llama_config(vocab_size: int, **overrides):
    """A few-hundred-thousand-parameter Llama: big enough to memorise the toy world on a CPU."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)
