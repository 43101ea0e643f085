"""The zoo's own instruction set: templates × word lists, held out by template.

Held-out templates are never seen in training (neither their wording nor their prompts), so a rule rate
on them measures whether a skill generalises to new instructions, not whether it memorised a phrasing.
Fact questions (capitals, small sums) carry the fact string an answer must contain.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["CAPITALS", "UNSEEN_CAPITALS", "Prompt", "build_prompts"]

TOPICS = [
    "sleep", "exercise", "recycling", "music", "reading", "gardening", "cooking", "friendship", "history",
    "mathematics", "the ocean", "rain", "volcanoes", "bees", "the moon", "electricity", "photography",
    "chess", "swimming", "saving money", "climate", "forests", "birds", "travel", "coffee", "tea", "bread",
    "painting", "honesty", "teamwork",
]
OBJECTS = [
    "a bicycle", "a hammer", "a compass", "a refrigerator", "a telescope", "a kettle", "an umbrella",
    "a candle", "a ladder", "a microscope", "a clock", "a map", "a pencil", "a lamp", "a backpack",
    "a thermometer", "a magnet", "a piano", "a camera", "a bridge", "a boat", "a tent", "a key", "a mirror",
    "a battery", "a calculator", "a spoon", "a wheel", "a rope", "a window",
]
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "Russia": "Moscow", "Egypt": "Cairo", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasília", "Argentina": "Buenos Aires", "Mexico": "Mexico City", "India": "New Delhi",
    "the United Kingdom": "London", "Ireland": "Dublin", "Portugal": "Lisbon", "Greece": "Athens",
    "Norway": "Oslo", "Sweden": "Stockholm", "Finland": "Helsinki", "Denmark": "Copenhagen",
    "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest", "the Netherlands": "Amsterdam",
    "Belgium": "Brussels", "Switzerland": "Bern", "Turkey": "Ankara", "Kenya": "Nairobi", "Peru": "Lima",
    "Chile": "Santiago", "Thailand": "Bangkok", "Vietnam": "Hanoi", "South Korea": "Seoul",
    "Indonesia": "Jakarta", "Cuba": "Havana", "Iran": "Tehran", "Iraq": "Baghdad", "Ukraine": "Kyiv",
}
COUNTRIES = list(CAPITALS)
# Countries that appear in no training prompt: every capital above is also asked in training (in another
# phrasing), so these measure whether a skill keeps facts it never rehearsed in its own form.
UNSEEN_CAPITALS = {
    "Nigeria": "Abuja", "Pakistan": "Islamabad", "Morocco": "Rabat", "Colombia": "Bogotá", "Venezuela": "Caracas",
    "the Philippines": "Manila", "Malaysia": "Kuala Lumpur", "Saudi Arabia": "Riyadh", "the Czech Republic": "Prague",
    "Romania": "Bucharest", "Bulgaria": "Sofia", "Serbia": "Belgrade", "Croatia": "Zagreb", "New Zealand": "Wellington",
    "Ethiopia": "Addis Ababa", "Ghana": "Accra", "Qatar": "Doha", "Nepal": "Kathmandu", "Bangladesh": "Dhaka",
    "Afghanistan": "Kabul", "Syria": "Damascus", "Lebanon": "Beirut", "Jordan": "Amman", "Iceland": "Reykjavik",
    "Estonia": "Tallinn", "Latvia": "Riga", "Lithuania": "Vilnius", "Uruguay": "Montevideo", "Ecuador": "Quito",
    "Mongolia": "Ulaanbaatar",
}

# (template, the word list it draws from)
TRAIN_TEMPLATES = [
    ("Explain what {x} is used for.", "objects"),
    ("Tell me something about {x}.", "countries"),
    ("Why is {x} important?", "topics"),
    ("Describe {x} briefly.", "objects"),
    ("What do you know about {x}?", "topics"),
    ("Give me a tip about {x}.", "topics"),
    ("What is {x} famous for?", "countries"),
    ("How does {x} work?", "objects"),
]
HELDOUT_TEMPLATES = [
    ("Write one sentence about {x}.", "topics"),
    ("What is special about {x}?", "countries"),
    ("Can you describe {x} for a child?", "objects"),
    ("Share a fact about {x}.", "topics"),
    ("What should I know about {x}?", "objects"),
]
TRAIN_FACT_TEMPLATES = ["What is the capital of {country}?", "What is {a} + {b}?"]
# More phrasings of the same training facts (an exploration: does template variety keep facts?).
EXTRA_TRAIN_FACT_TEMPLATES = [("Tell me the capital of {country}.", "Add {a} and {b}."),
                              ("What's the capital city of {country}?", "Calculate {a} + {b}.")]
HELDOUT_FACT_TEMPLATES = ["Which city is the capital of {country}?", "What is {a} plus {b}?"]

_LISTS = {"topics": TOPICS, "objects": OBJECTS, "countries": COUNTRIES}


@dataclass(frozen=True)
class Prompt:
    """One instruction; ``fact`` is the string a right answer contains ("" for open instructions)."""

    text: str
    template: str
    split: str  # "train" or "heldout"
    fact: str = ""


def _instructions(templates, split: str, per_template: int, rng: random.Random) -> list[Prompt]:
    out = []
    for template, source in templates:
        items = rng.sample(_LISTS[source], min(per_template, len(_LISTS[source])))
        out += [Prompt(template.format(x=x), template, split) for x in items]
    return out


def _facts(templates, split: str, n_sums: int, rng: random.Random) -> list[Prompt]:
    capital_t, sum_t = templates
    out = [Prompt(capital_t.format(country=c), capital_t, split, CAPITALS[c]) for c in COUNTRIES]
    pairs = set()
    while len(pairs) < n_sums:
        pairs.add((rng.randint(2, 20), rng.randint(2, 20)))
    out += [Prompt(sum_t.format(a=a, b=b), sum_t, split, str(a + b)) for a, b in sorted(pairs)]
    return out


def _unseen(template: str) -> list[Prompt]:
    return [Prompt(template.format(country=c), template, "heldout", capital) for c, capital in UNSEEN_CAPITALS.items()]


def build_prompts(seed: int = 0, extra_train_facts: bool = False) -> dict[str, list[Prompt]]:
    """Train and held-out prompts, seeded.

    Train: 8 templates × 14 items + 40 capitals + 30 sums = 182. Held-out: 5 templates × 24 items +
    40 capitals + 40 sums + 30 capitals of countries no training prompt names = 230, so that the
    instructions alone (120) and all held-out prompts both count over 100. ``extra_train_facts`` adds the same kinds of facts under ``EXTRA_TRAIN_FACT_TEMPLATES`` to
    train (+140); the other prompts stay the same. Train prompts are drawn first, so the held-out sizes
    never change them.
    """
    rng = random.Random(seed)
    prompts = {
        "train": _instructions(TRAIN_TEMPLATES, "train", 14, rng) + _facts(TRAIN_FACT_TEMPLATES, "train", 30, rng),
        "heldout": _instructions(HELDOUT_TEMPLATES, "heldout", 24, rng)
        + _facts(HELDOUT_FACT_TEMPLATES, "heldout", 40, rng) + _unseen(HELDOUT_FACT_TEMPLATES[0]),
    }
    if extra_train_facts:  # a generator of their own, so the held-out sizes never change them either
        extra_rng = random.Random(seed + 1)
        prompts["train"] += [p for pair in EXTRA_TRAIN_FACT_TEMPLATES for p in _facts(pair, "train", 30, extra_rng)]
    return prompts
