"""A generated corpus whose documents plant a fact early and ask for it much later.

Each document states "The code of <name> is <4 digits>." and, after a
controlled number of characters of distractor text (which itself states codes
of *other* names, so copying the latest number does not work), ends with
"Question: what is the code of <name>? Answer: the code of <name> is <digits>."
Predicting those answer digits needs context reaching back `distance`
characters. The text is ASCII, so characters, UTF-8 bytes and byte-tokenizer
tokens coincide. Everything is a function of the seed.
"""

import random
from collections.abc import Iterator

SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vor", "el", "dan", "qui", "zo", "bar", "nel", "ti", "gra", "fen"]
SUBJECTS = ["the miller", "a farmer", "the old clerk", "the river", "a stranger", "the baker", "her cousin", "the captain"]
VERBS = ["carried", "watched", "forgot", "painted", "counted", "followed", "mended", "sold"]
OBJECTS = ["a basket of apples", "the grey stones", "three letters", "the narrow bridge", "a silver bell", "the long road"]
PLACES = ["near the market", "before dawn", "in the valley", "by the harbour", "after the storm", "under the elms"]


def _name(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(3)).capitalize()


def _code(rng: random.Random) -> str:
    return f"{rng.randrange(10_000):04d}"


def _filler(rng: random.Random, n_chars: int, avoid_name: str) -> str:
    """About n_chars of plain sentences, one in five a distractor fact about another name."""
    sentences, length = [], 0
    while length < n_chars:
        if rng.random() < 0.2:
            other = _name(rng)
            while other == avoid_name:
                other = _name(rng)
            sentence = f"The code of {other} is {_code(rng)}."
        else:
            sentence = f"{rng.choice(SUBJECTS).capitalize()} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(PLACES)}."
        sentences.append(sentence)
        length += len(sentence) + 1
    return " ".join(sentences)


def synthetic_document(rng: random.Random, index: int, distance: int, prefix_chars: int) -> dict:
    """One document; `distance` is the minimum gap in characters between the fact's digits and the answer's."""
    name, code = _name(rng), _code(rng)
    fact = f"The code of {name} is {code}."
    head = _filler(rng, prefix_chars, name) + " " if prefix_chars else ""
    fact_start = len(head) + fact.index(code)
    query = f"\nQuestion: what is the code of {name}? Answer: the code of {name} is "
    # Size the filler so the gap from the fact's digits to the answer's is at least `distance`.
    gap_without_filler = len(". ") + len(query)
    body = head + fact + " " + _filler(rng, distance - gap_without_filler, name)
    answer_start = len(body) + len(query)
    text = body + query + code + ".\n"
    return {
        "text": text,
        "title": f"synthetic-{index:06d}",
        "distance": answer_start - (fact_start + len(code)),
        "fact_char_spans": [[fact_start, fact_start + len(code)]],
        "answer_char_spans": [[answer_start, answer_start + len(code)]],
    }


def generate_synthetic_documents(num_docs: int, distances: tuple[int, ...], seed: int, prefix_chars: int = 200) -> Iterator[dict]:
    """Yield num_docs documents; document i uses distances[i % len(distances)] so every distance is equally common."""
    rng = random.Random(seed)
    for index in range(num_docs):
        yield synthetic_document(rng, index, int(distances[index % len(distances)]), prefix_chars)
