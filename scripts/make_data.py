#!/usr/bin/env python3
"""Regenerate the shipped toy data sets and the tokenizer-training corpus.

The outputs are committed; this script only documents where they came from and
lets them be rebuilt byte-identically (every random choice goes through a
seeded ``random.Random``). All text is written here from scratch: short
factual, arithmetic and procedural sentences built from small hand-written
tables, so a tiny model can learn the recurring patterns and its validation
loss falls quickly.

Outputs (relative to the repository root):

* ``recipes/data/{train,valid,test}.jsonl``             -- ``{"text": ...}``
* ``recipes/data/chat/{train,valid,test}.jsonl``        -- ``{"messages": [...]}``
* ``recipes/data/completions/{train,valid,test}.jsonl`` -- ``{"prompt", "completion"}``
* ``adamw_lm/data/tiny_corpus.txt``                     -- plain text for tokenizer training

Usage: ``python scripts/make_data.py [--check]``; ``--check`` exits non-zero
when a committed file differs from what the script would write.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]

CAPITALS = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"),
    ("Portugal", "Lisbon"), ("Greece", "Athens"), ("Norway", "Oslo"), ("Sweden", "Stockholm"),
    ("Finland", "Helsinki"), ("Denmark", "Copenhagen"), ("Poland", "Warsaw"),
    ("Austria", "Vienna"), ("Hungary", "Budapest"), ("Ireland", "Dublin"),
    ("Belgium", "Brussels"), ("the Netherlands", "Amsterdam"), ("Egypt", "Cairo"),
    ("Kenya", "Nairobi"), ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"),
    ("Thailand", "Bangkok"), ("Canada", "Ottawa"), ("Mexico", "Mexico City"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Argentina", "Buenos Aires"),
    ("Australia", "Canberra"), ("Turkey", "Ankara"), ("Iceland", "Reykjavik"),
]

ANIMALS = [
    # (animal, sound, young, group)
    ("cow", "moo", "calf", "herd"), ("dog", "woof", "puppy", "pack"),
    ("cat", "meow", "kitten", "clowder"), ("sheep", "baa", "lamb", "flock"),
    ("horse", "neigh", "foal", "herd"), ("duck", "quack", "duckling", "flock"),
    ("lion", "roar", "cub", "pride"), ("pig", "oink", "piglet", "drove"),
    ("owl", "hoot", "owlet", "parliament"), ("goat", "bleat", "kid", "herd"),
    ("frog", "croak", "tadpole", "army"), ("bee", "buzz", "larva", "swarm"),
    ("wolf", "howl", "pup", "pack"), ("hen", "cluck", "chick", "brood"),
]

COLORS = [
    ("the sky on a clear day", "blue"), ("fresh grass", "green"), ("a ripe banana", "yellow"),
    ("snow", "white"), ("coal", "black"), ("a ripe tomato", "red"), ("an orange", "orange"),
    ("a lemon", "yellow"), ("a carrot", "orange"), ("a lime", "green"),
    ("milk", "white"), ("a plum", "purple"), ("chocolate", "brown"), ("a strawberry", "red"),
]

OPPOSITES = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("open", "closed"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("happy", "sad"), ("wet", "dry"),
    ("old", "new"), ("high", "low"), ("hard", "soft"), ("loud", "quiet"), ("near", "far"),
    ("strong", "weak"), ("thick", "thin"), ("left", "right"), ("day", "night"), ("in", "out"),
]

PLURALS = [
    ("cat", "cats"), ("box", "boxes"), ("mouse", "mice"), ("child", "children"),
    ("foot", "feet"), ("tooth", "teeth"), ("leaf", "leaves"), ("city", "cities"),
    ("bus", "buses"), ("man", "men"), ("woman", "women"), ("goose", "geese"),
    ("knife", "knives"), ("baby", "babies"), ("wolf", "wolves"), ("dish", "dishes"),
]

UNITS = [
    "There are 60 seconds in a minute.", "There are 60 minutes in an hour.",
    "There are 24 hours in a day.", "There are 7 days in a week.",
    "There are 12 months in a year.", "There are 100 centimeters in a meter.",
    "There are 1000 meters in a kilometer.", "There are 1000 grams in a kilogram.",
    "Water freezes at 0 degrees Celsius.", "Water boils at 100 degrees Celsius at sea level.",
    "A triangle has 3 sides.", "A square has 4 equal sides.", "A hexagon has 6 sides.",
    "A spider has 8 legs.", "An insect has 6 legs.", "A week starts again after Sunday.",
    "The Earth goes around the Sun once a year.", "The Moon goes around the Earth.",
    "Plants need light, water and air to grow.", "Ice is frozen water.",
]

SIZES = [
    ("an elephant", "a mouse"), ("a whale", "a fish"), ("a house", "a chair"),
    ("a mountain", "a hill"), ("the Sun", "the Moon"), ("a bus", "a bicycle"),
    ("a tree", "a flower"), ("a horse", "a dog"), ("an ocean", "a lake"),
    ("a city", "a village"), ("a melon", "a grape"), ("a giraffe", "a goat"),
]

DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = [
    "January", "February", "March", "April", "May", "June", "July", "August",
    "September", "October", "November", "December",
]
NUMBER_WORDS = [
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen",
    "eighteen", "nineteen", "twenty",
]
SPELL_WORDS = [
    "cat", "dog", "sun", "tree", "book", "fish", "milk", "rain", "star", "bird", "cake",
    "door", "hand", "lamp", "moon", "ship", "road", "salt", "wind", "frog",
]

PROCEDURES = [
    ("make tea", ["boil some water", "put a tea bag in a cup", "pour the hot water into the cup",
                  "wait three minutes", "take out the tea bag"]),
    ("wash your hands", ["wet your hands", "add soap", "rub your hands for twenty seconds",
                         "rinse them with water", "dry them with a towel"]),
    ("plant a seed", ["fill a pot with soil", "make a small hole", "drop the seed in the hole",
                      "cover it with soil", "water it gently"]),
    ("make toast", ["take a slice of bread", "put it in the toaster", "press the lever",
                    "wait until it pops up", "spread some butter on it"]),
    ("brush your teeth", ["wet the brush", "add a little toothpaste",
                          "brush every tooth for two minutes", "spit out the foam",
                          "rinse your mouth"]),
    ("send a letter", ["write the letter", "fold it", "put it in an envelope",
                       "write the address", "add a stamp", "drop it in a mailbox"]),
    ("boil an egg", ["fill a pot with water", "bring the water to a boil",
                     "lower the egg into the pot", "cook it for nine minutes",
                     "cool it in cold water"]),
    ("tie a shoe", ["cross the laces", "pull one lace under the other", "make a loop",
                    "wrap the other lace around it", "pull the second loop through"]),
    ("cross the street", ["stop at the curb", "look left", "look right", "look left again",
                          "walk across when the road is clear"]),
    ("water a plant", ["fill a watering can", "check that the soil is dry",
                       "pour water slowly around the stem", "let the extra water drain"]),
    ("make a sandwich", ["take two slices of bread", "spread butter on one side",
                         "add cheese and lettuce", "put the other slice on top",
                         "cut it in half"]),
    ("clean a window", ["mix soap and water", "wipe the glass with a wet cloth",
                        "remove the water with a squeegee", "dry the edges with a towel"]),
    ("pack a bag", ["make a list", "lay out your clothes", "fold them neatly",
                    "put heavy things at the bottom", "close the bag"]),
    ("read a map", ["find north", "find where you are", "find where you want to go",
                    "trace a path between them", "check the scale for the distance"]),
    ("light a candle", ["place the candle on a safe plate", "strike a match",
                        "hold the flame to the wick", "blow out the match"]),
    ("make rice", ["rinse one cup of rice", "add two cups of water", "bring it to a boil",
                   "cover the pot and lower the heat", "cook for fifteen minutes"]),
]

ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh"]

# A fact is (question, answer, sentence): the plain-text, chat and completions
# sets are all rendered from the same facts, so each format teaches the same
# content.
Fact = tuple[str, str, str]


def _cap(s: str) -> str:
    # str.capitalize() would lowercase the rest ("the Moon" -> "The moon").
    return s[:1].upper() + s[1:]


def _arith(rng: random.Random) -> Fact:
    op = rng.choice(["plus", "minus", "times"])
    a, b = rng.randint(0, 12), rng.randint(0, 12)
    if op == "minus" and b > a:
        a, b = b, a
    r = {"plus": a + b, "minus": a - b, "times": a * b}[op]
    return (f"What is {a} {op} {b}?", f"{r}.", f"{a} {op} {b} is {r}.")


def _capital(rng: random.Random) -> Fact:
    c, cap = rng.choice(CAPITALS)
    return (f"What is the capital of {c}?", f"{cap}.", f"The capital of {c} is {cap}.")


def _animal(rng: random.Random) -> Fact:
    animal, sound, young, group = rng.choice(ANIMALS)
    kind = rng.randrange(3)
    if kind == 0:
        return (f"What sound does a {animal} make?", f"{_cap(sound)}.",
                f"A {animal} says {sound}.")
    if kind == 1:
        return (f"What is a young {animal} called?", f"A {young}.",
                f"A young {animal} is called a {young}.")
    return (f"What is a group of {animal}s called?", f"A {group}.",
            f"A group of {animal}s is called a {group}.")


def _color(rng: random.Random) -> Fact:
    thing, color = rng.choice(COLORS)
    return (f"What color is {thing}?", _cap(color) + ".",
            f"The color of {thing} is {color}.")


def _opposite(rng: random.Random) -> Fact:
    a, b = rng.choice(OPPOSITES)
    if rng.random() < 0.5:
        a, b = b, a
    return (f"What is the opposite of {a}?", f"{_cap(b)}.",
            f"The opposite of {a} is {b}.")


def _plural(rng: random.Random) -> Fact:
    s, p = rng.choice(PLURALS)
    return (f"What is the plural of {s}?", f"{_cap(p)}.", f"One {s}, two {p}.")


def _unit(rng: random.Random) -> Fact:
    s = rng.choice(UNITS)
    return ("Tell me a fact.", s, s)


def _size(rng: random.Random) -> Fact:
    big, small = rng.choice(SIZES)
    if rng.random() < 0.5:
        return (f"Which is bigger, {big} or {small}?", f"{_cap(big)} is bigger.",
                f"{_cap(big)} is bigger than {small}.")
    return (f"Which is smaller, {small} or {big}?", f"{_cap(small)} is smaller.",
            f"{_cap(small)} is smaller than {big}.")


def _sequence(rng: random.Random) -> Fact:
    kind = rng.randrange(4)
    if kind == 0:
        i = rng.randrange(7)
        a, b = DAYS[i], DAYS[(i + 1) % 7]
        return (f"What day comes after {a}?", f"{b}.", f"After {a} comes {b}.")
    if kind == 1:
        i = rng.randrange(12)
        a, b = MONTHS[i], MONTHS[(i + 1) % 12]
        return (f"What month comes after {a}?", f"{b}.", f"After {a} comes {b}.")
    if kind == 2:
        start = rng.randint(0, 15)
        seq = ", ".join(str(n) for n in range(start, start + 5))
        return (f"Count up from {start}.", f"{seq}.", f"Counting up from {start}: {seq}.")
    n = rng.randint(0, 20)
    return (f"How do you write {n} in words?", f"{_cap(NUMBER_WORDS[n])}.",
            f"The number {n} is written {NUMBER_WORDS[n]}.")


def _spell(rng: random.Random) -> Fact:
    w = rng.choice(SPELL_WORDS)
    s = "-".join(w)
    return (f"How do you spell {w}?", f"{s}.", f"The word {w} is spelled {s}.")


def _procedure(rng: random.Random) -> Fact:
    task, steps = rng.choice(PROCEDURES)
    if rng.random() < 0.5:
        body = ", ".join(steps[:-1]) + ", and " + steps[-1]
        answer = f"To {task}, {body}."
    else:
        answer = " ".join(
            f"{_cap(ORDINALS[i])}, {st}." for i, st in enumerate(steps)
        )
    return (f"How do I {task}?", answer, answer)


GENERATORS: list[Callable[[random.Random], Fact]] = [
    _arith, _capital, _animal, _color, _opposite, _plural, _unit, _size, _sequence,
    _spell, _procedure,
]

SYSTEM_PROMPTS = [
    "You are a helpful assistant.",
    "Answer briefly and correctly.",
    "You are a patient teacher.",
]


def _fact(rng: random.Random) -> Fact:
    return rng.choice(GENERATORS)(rng)


def _text_line(rng: random.Random) -> dict:
    # Mix plain sentences with "Question: ... Answer: ..." pairs so the text
    # format also carries the Q&A pattern the chat sets use.
    parts = []
    for _ in range(rng.randint(3, 6)):
        q, a, s = _fact(rng)
        parts.append(f"Question: {q} Answer: {a}" if rng.random() < 0.3 else s)
    return {"text": " ".join(parts)}


def _chat_line(rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    for _ in range(1 if rng.random() < 0.75 else 2):
        q, a, _s = _fact(rng)
        messages.append({"role": "user", "content": q})
        messages.append({"role": "assistant", "content": a})
    return {"messages": messages}


def _completion_line(rng: random.Random) -> dict:
    q, a, _s = _fact(rng)
    return {"prompt": q, "completion": a}


def _dedup_lines(make: Callable[[random.Random], dict], rng: random.Random, n: int) -> list[str]:
    # Unique lines, so valid/test never repeat a training line verbatim.
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        line = json.dumps(make(rng), ensure_ascii=True)
        if line not in seen:
            seen.add(line)
            out.append(line)
    return out


def build() -> dict[Path, str]:
    """Return {path: content} for every generated file."""
    files: dict[Path, str] = {}
    splits = (("train", "valid", "test"))

    def add_jsonl(folder: Path, make: Callable[[random.Random], dict], counts, seed: int):
        lines = _dedup_lines(make, random.Random(seed), sum(counts))
        start = 0
        for name, n in zip(splits, counts):
            files[folder / f"{name}.jsonl"] = "\n".join(lines[start:start + n]) + "\n"
            start += n

    data = ROOT / "recipes" / "data"
    add_jsonl(data, _text_line, (400, 60, 60), seed=1)
    add_jsonl(data / "chat", _chat_line, (100, 20, 20), seed=2)
    add_jsonl(data / "completions", _completion_line, (100, 20, 20), seed=3)

    # Separate seed from the data sets: the tokenizer sees the same kind of
    # text, not the exact evaluation lines.
    # Lines shaped like the text set (several sentences each), so merges such
    # as " The" that only occur mid-line are learnt too.
    rng = random.Random(4)
    corpus = [_text_line(rng)["text"] for _ in range(800)]
    files[ROOT / "adamw_lm" / "data" / "tiny_corpus.txt"] = "\n".join(corpus) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare, write nothing")
    args = ap.parse_args(argv)
    stale = []
    for path, content in build().items():
        old = path.read_text(encoding="utf-8") if path.exists() else None
        if old == content:
            continue
        stale.append(path)
        if not args.check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content, encoding="utf-8")
    for p in stale:
        print(("differs: " if args.check else "wrote: ") + str(p.relative_to(ROOT)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
