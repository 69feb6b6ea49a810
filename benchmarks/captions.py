"""Synthetic web-style captions for benchmarks: varied templates, ~11 words on average like alt-text corpora."""

from __future__ import annotations

import random

SUBJECTS = [
    "a brown dog",
    "two children",
    "an old man",
    "a red car",
    "the white cat",
    "a young woman",
    "a group of people",
    "a wooden table",
    "a small boat",
    "three horses",
    "a bowl of soup",
    "a vintage bicycle",
    "the city skyline",
    "a pair of shoes",
    "a glass of wine",
    "a black and white photo of a building",
]
VERBS = [
    "sitting on",
    "standing next to",
    "parked in front of",
    "running through",
    "lying on",
    "looking at",
    "floating on",
    "hanging above",
    "placed on",
    "walking along",
]
PLACES = [
    "a green field",
    "the beach at sunset",
    "a busy street",
    "a kitchen counter",
    "the snowy mountains",
    "a wooden bench in the park",
    "a lake with trees",
    "the living room floor",
    "an empty road",
    "the river",
]
EXTRAS = [
    "",
    "",
    "",
    " on a sunny day",
    " with a blue sky",
    ", stock photo",
    " - high quality print",
    " in the background",
    " and a lamp",
    " near the old bridge",
]


def make_captions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        caption = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(PLACES)}{rng.choice(EXTRAS)}"
        if rng.random() < 0.2:
            caption = caption.capitalize()
        if rng.random() < 0.1:
            caption = f"  {caption}\t"
        out.append(caption)
    return out
