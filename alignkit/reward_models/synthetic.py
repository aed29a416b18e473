"""Synthetic preference pairs where the truth is known (tests, benchmarks, smoke runs).

Each completion is a short sentence that holds one of two marker words; the pair
differs only in the marker. A user of group 0 prefers `markers[0]`, group 1 prefers
`markers[1]` (opposite preferences), so a single reward model cannot exceed ~50% on
a balanced two-group set while a per-user model can reach 100%. `noise` flips the label
of that share of pairs (marked in `meta.flipped`). Deterministic in `seed`.
"""
from __future__ import annotations

import random

TOPICS = ("rice", "tomatoes", "python", "money", "sleep", "music", "space", "ocean",
          "travel", "health", "sport", "art", "math", "history", "science")
PHRASES = ("Here is a short answer", "Use bullet points", "Give three tips",
           "Explain it in simple words", "Write a title", "Answer in at most fifty words",
           "Thanks for the question", "Please read this")
MARKERS = ("good", "bad")
# Antonym pairs for a harder task (`markers=ANTONYMS`): each pair draws one of them, so a
# model must learn every pair's direction from its own few examples.
ANTONYMS = (("good", "bad"), ("great", "poor"), ("happy", "sad"), ("clear", "vague"),
            ("kind", "rude"), ("safe", "risky"), ("calm", "angry"), ("true", "false"),
            ("warm", "cold"), ("bright", "dull"), ("fast", "slow"), ("clean", "dirty"),
            ("rich", "thin"), ("brave", "timid"), ("fresh", "stale"), ("smart", "silly"),
            ("strong", "weak"), ("gentle", "harsh"), ("tidy", "messy"), ("sweet", "bitter"),
            ("honest", "sly"), ("useful", "useless"), ("polite", "crude"), ("exact", "rough"))


def marker_pairs(n: int, *, seed: int = 0, noise: float = 0.0,
                 user_groups: list[int] | None = None, markers=MARKERS,
                 subsets: list[str] | None = None, id_prefix: str = "s") -> list[dict]:
    """`n` pair records. `markers` is one (preferred, other) word pair, or a sequence of
    them (each record draws one). With `user_groups` (group per user, users `u0`, `u1`,
    ...), the pairs are dealt round-robin to the users and carry `meta.user`; with
    `subsets`, round-robin `meta.subset` names."""
    rng = random.Random(seed)
    choices = [markers] if isinstance(markers[0], str) else list(markers)
    out = []
    for i in range(n):
        prompt = f"Tell me about {rng.choice(TOPICS)}."
        a, b = rng.sample(PHRASES, 2)
        pair = choices[rng.randrange(len(choices))] if len(choices) > 1 else choices[0]
        texts = [f"{a} about it, {m}, {b}." for m in pair]
        meta: dict = {}
        group = 0
        if user_groups:
            u = i % len(user_groups)
            meta["user"] = f"u{u}"
            group = user_groups[u]
        if subsets:
            meta["subset"] = subsets[i % len(subsets)]
        flipped = rng.random() < noise
        win = group ^ int(flipped)
        meta["flipped"] = flipped
        out.append({"id": f"{id_prefix}{i}", "prompt": prompt, "chosen": texts[win],
                    "rejected": texts[1 - win], "meta": meta})
    return out
