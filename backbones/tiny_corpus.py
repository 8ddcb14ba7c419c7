"""The project's own instruction tasks: small fact tables a tiny LLaMA-2 can learn in a few hundred CPU steps.

They seed both the tiny tokenizer's training corpus and the bundled SFT dataset (`launch.bundled_data`).
"""

from __future__ import annotations

import random
import string

CAPITALS = {
    "France": "Paris",
    "Spain": "Madrid",
    "Italy": "Rome",
    "Germany": "Berlin",
    "Japan": "Tokyo",
    "Egypt": "Cairo",
    "Peru": "Lima",
    "Kenya": "Nairobi",
    "Norway": "Oslo",
    "Chile": "Santiago",
    "Cuba": "Havana",
    "Greece": "Athens",
    "Poland": "Warsaw",
    "Canada": "Ottawa",
    "Ireland": "Dublin",
    "Portugal": "Lisbon",
}
COLORS = {
    "a banana": "yellow",
    "the sky": "blue",
    "grass": "green",
    "snow": "white",
    "coal": "black",
    "a tomato": "red",
    "an orange": "orange",
    "a plum": "purple",
    "chocolate": "brown",
    "milk": "white",
}
OPPOSITES = {
    "hot": "cold",
    "up": "down",
    "big": "small",
    "fast": "slow",
    "old": "new",
    "early": "late",
    "happy": "sad",
    "open": "closed",
    "light": "dark",
    "wet": "dry",
}
OPPOSITES.update({v: k for k, v in list(OPPOSITES.items())})
LETTERS = string.ascii_lowercase
SYSTEM_PROMPTS = ["You are a helpful assistant.", "Answer with one word."]


def sample_task(rng: random.Random) -> tuple[str, str, str]:
    """One (instruction, input, output) triple; `input` is empty for self-contained questions."""
    kind = rng.randrange(6)
    if kind == 0:
        c = rng.choice(LETTERS[:-1])
        return f"What letter comes after {c}?", "", LETTERS[LETTERS.index(c) + 1]
    if kind == 1:
        c = rng.choice(LETTERS[1:])
        return f"What letter comes before {c}?", "", LETTERS[LETTERS.index(c) - 1]
    if kind == 2:
        a, b = rng.randrange(10), rng.randrange(10)
        return "Add the two numbers.", f"{a} {b}", str(a + b)
    if kind == 3:
        country = rng.choice(sorted(CAPITALS))
        return f"What is the capital of {country}?", "", CAPITALS[country]
    if kind == 4:
        thing = rng.choice(sorted(COLORS))
        return f"What color is {thing}?", "", COLORS[thing]
    word = rng.choice(sorted(OPPOSITES))
    return f"What is the opposite of {word}?", "", OPPOSITES[word]


def corpus_lines(seed: int = 0, n: int = 4000) -> list[str]:
    """Text for training the tiny tokenizer: task questions and answers plus the words of every prompt format."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        instruction, inp, output = sample_task(rng)
        lines.append(f"{instruction} {inp} {output}".strip())
    lines += SYSTEM_PROMPTS + [
        "In: Out: USER: ASSISTANT: [INST] [/INST] <<SYS>> <</SYS>>",
        "A chat between a curious user and an artificial intelligence assistant. "
        "The assistant gives helpful, detailed, and polite answers to the user's questions.",
        " ".join(LETTERS) + " " + " ".join(str(i) for i in range(100)),
    ]
    return lines
