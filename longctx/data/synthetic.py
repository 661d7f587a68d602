"""A generated corpus whose documents plant facts early and ask for them much later.

Each document states `facts` facts "The code of <name> is <code>." together and, after a
controlled number of characters of filler text, asks for every one of them in a shuffled order:
"Question: what is the code of <name>? Answer: the code of <name> is <code>." Predicting an
answer needs context reaching back at least `distance` characters (from a character of the
answer to the same character of the fact). Filler sentences may state codes of *other* names
(`distractor_rate`), so copying the latest code does not work. The text is ASCII, so
characters, UTF-8 bytes and byte-tokenizer tokens coincide. Everything is a function of the seed.

How much of a document rewards retrieval is a setting: a few short codes among filler reward
it on under 1% of the tokens, one long code asked right after it is stated on 40%
(`data=synthetic_copy`). Measured with model=mini on a 2-core CPU, in-context copying appears
only after about 1500-2100 steps even then (docs/results/README.md).
"""

import random
from collections.abc import Iterator
from dataclasses import dataclass

SYLLABLES = [
    "ka",
    "lo",
    "mi",
    "ren",
    "tu",
    "sa",
    "vor",
    "el",
    "dan",
    "qui",
    "zo",
    "bar",
    "nel",
    "ti",
    "gra",
    "fen",
]
SUBJECTS = [
    "the miller",
    "a farmer",
    "the old clerk",
    "the river",
    "a stranger",
    "the baker",
    "her cousin",
    "the captain",
]
VERBS = ["carried", "watched", "forgot", "painted", "counted", "followed", "mended", "sold"]
OBJECTS = [
    "a basket of apples",
    "the grey stones",
    "three letters",
    "the narrow bridge",
    "a silver bell",
    "the long road",
]
PLACES = [
    "near the market",
    "before dawn",
    "in the valley",
    "by the harbour",
    "after the storm",
    "under the elms",
]
# `alnum` codes draw distinct characters while the alphabet allows it.
ALPHABETS = {"digits": "0123456789", "alnum": "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"}


@dataclass(frozen=True)
class FactSettings:
    facts: int = 1  # stated together per document, all asked after the distance
    code_length: int = 4
    alphabet: str = "digits"
    distractor_rate: float = 0.2  # share of filler sentences stating another name's code

    def __post_init__(self):
        if self.facts < 1 or self.code_length < 1:
            raise ValueError(
                f"synthetic corpus: facts={self.facts} and code_length={self.code_length} "
                "must be >= 1"
            )
        if self.alphabet not in ALPHABETS:
            raise ValueError(
                f"synthetic corpus: alphabet={self.alphabet!r}; choose one of {sorted(ALPHABETS)}"
            )
        if not 0 <= self.distractor_rate < 1:
            raise ValueError(
                f"synthetic corpus: distractor_rate={self.distractor_rate} must lie in [0, 1)"
            )

    def code(self, rng: random.Random) -> str:
        symbols = ALPHABETS[self.alphabet]
        if self.alphabet == "alnum" and self.code_length <= len(symbols):
            return "".join(rng.sample(symbols, self.code_length))
        return "".join(rng.choice(symbols) for _ in range(self.code_length))


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def _filler(rng: random.Random, n_chars: int, avoid_names: set[str], settings: FactSettings) -> str:
    """About n_chars of plain sentences, some of them (distractor_rate) facts about other names."""
    sentences, length = [], 0
    while length < n_chars:
        if rng.random() < settings.distractor_rate:
            other = _name(rng)
            while other in avoid_names:
                other = _name(rng)
            sentence = f"The code of {other} is {settings.code(rng)}."
        else:
            sentence = (
                f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} "
                f"{rng.choice(OBJECTS)} {rng.choice(PLACES)}."
            )
        sentences.append(sentence)
        length += len(sentence) + 1
    return " ".join(sentences)


def _question(name: str) -> str:
    return f"\nQuestion: what is the code of {name}? Answer: the code of {name} is "


def synthetic_document(
    rng: random.Random,
    index: int,
    distance: int,
    prefix_chars: int,
    settings: FactSettings = FactSettings(),
) -> dict:
    """One document; every answer starts at least `distance` characters
    after its fact's code starts.

    `fact_char_spans[i]` and `answer_char_spans[i]` hold the same code; `distance` is the
    smallest of the per-fact gaps (the first question follows the last fact by it, every other
    gap is longer).
    """
    names = []
    while len(names) < settings.facts:
        name = _name(rng)
        if name not in names:
            names.append(name)
    codes = {name: settings.code(rng) for name in names}
    text = _filler(rng, prefix_chars, set(names), settings) + " " if prefix_chars else ""
    fact_spans = {}
    for name in names:
        if fact_spans:
            text += " "
        text += f"The code of {name} is "
        fact_spans[name] = [len(text), len(text) + settings.code_length]
        text += codes[name] + "."
    asked = rng.sample(names, len(names))
    # Size the filler so the first answer starts at least `distance` after the last fact's code.
    gap_without_filler = settings.code_length + len(". ") + len(_question(asked[0]))
    filler = _filler(rng, distance - gap_without_filler, set(names), settings)
    text += " " + filler if filler else ""
    answer_spans = []
    for name in asked:
        text += _question(name)
        answer_spans.append([len(text), len(text) + settings.code_length])
        text += codes[name] + "."
    return {
        "text": text + "\n",
        "title": f"synthetic-{index:06d}",
        "distance": min(a[0] - fact_spans[name][0] for name, a in zip(asked, answer_spans)),
        "fact_char_spans": [fact_spans[name] for name in asked],
        "answer_char_spans": answer_spans,
    }


def generate_synthetic_documents(
    num_docs: int,
    distances: tuple[int, ...],
    seed: int,
    prefix_chars: int = 200,
    settings: FactSettings = FactSettings(),
) -> Iterator[dict]:
    """Yield num_docs documents; document i uses distances[i % len(distances)]
    so every distance is equally common."""
    rng = random.Random(seed)
    for index in range(num_docs):
        yield synthetic_document(
            rng, index, int(distances[index % len(distances)]), prefix_chars, settings
        )
