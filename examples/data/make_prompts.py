"""Generate the demo prompt set: examples/data/train.jsonl and examples/data/eval.jsonl.

Each line is a prompt record (DESIGN.md)::

    {"id": "train-00001", "prompt": "<task>. <instructions>",
     "meta": {"checks": [...], "topic": "...", "task": "..."}}

The task is a topic phrase put into a task form ("Explain ...", "Write a short poem
about ..."); the instructions are ``alignkit.checks.describe_check`` sentences of one to
three verifiable checks. Checks are drawn from a broad mix of the family (not `exact`,
`numeric` or `regex`, which need references), with parameters a small instruct model
answering in about 120 tokens can meet, and never in contradicting combinations.

Standard library only (plus alignkit.checks, itself stdlib only). Deterministic: the
train set uses random.Random(seed), the eval set random.Random(seed + 100003); no prompt
text appears twice in or across the files.

Generalisation. The check types fall into families (`FAMILIES`); three of them, the
case, start/end and structure families (`HELD_OUT_FAMILIES`), never appear in a training
prompt. Besides `eval.jsonl` (held-out prompts of the trained types, phrased like the
training prompts) the generator writes two sets that measure transfer, both phrased in
other words and registers (`PARAPHRASES`: reworded instructions, the request put as a
question or with a context sentence, instructions in the middle of the request):

- `eval-types.jsonl`: every constraint of a held-out type;
- `eval-three.jsonl`: three constraints of any type, trained and held out.

`train-varied.jsonl` holds the training records again, same ids and checks, with every
prompt reworded (`TRAIN_PHRASINGS`, a third wording unlike both of the above, and four
layouts: canonical, instructions first, a requirements list, a lead phrase), from
random.Random(seed + 400009): the demo's `TRAIN=data/train-varied.jsonl` lever, which
teaches each constraint in several wordings at the cost of the canonical set.

    python examples/data/make_prompts.py [--seed 0] [--n-train 700] [--n-eval 250]
                                         [--n-types 120] [--n-three 120] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
try:
    from alignkit.checks import describe_check, validate_check
except ImportError:  # running from a checkout without the package installed
    sys.path.insert(0, str(HERE.parents[1]))
    from alignkit.checks import describe_check, validate_check

# topic -> [(phrase, kind, keywords)]; kind "act" (an activity: tips forms fit) or
# "thing". Keywords are words a good answer naturally uses, in the form it would use them.
TOPICS: dict[str, list[tuple[str, str, str]]] = {
    "cooking": [("cooking pasta at home", "act", "pasta water salt"),
                ("making a simple vegetable soup", "act", "soup vegetables pot"),
                ("the role of salt in cooking", "thing", "salt flavor food")],
    "baking": [("baking bread at home", "act", "bread flour yeast oven"),
               ("why cakes rise in the oven", "thing", "cake oven heat air")],
    "space": [("the rings of Saturn", "thing", "Saturn ice rings planet"),
              ("how astronauts live on the space station", "thing", "astronauts station food"),
              ("why the Moon has phases", "thing", "Moon Sun light Earth")],
    "history": [("daily life in ancient Rome", "thing", "Rome people city"),
                ("the invention of the printing press", "thing", "books printing press"),
                ("the building of the pyramids in Egypt", "thing", "Egypt stone pyramids")],
    "programming": [("writing your first Python program", "act", "Python code program"),
                    ("why code needs tests", "thing", "tests bugs code"),
                    ("learning to debug a program", "act", "bug code error")],
    "gardening": [("growing tomatoes at home", "act", "soil water sun plants"),
                  ("starting a small herb garden", "act", "herbs pots water"),
                  ("composting kitchen scraps", "act", "compost soil waste")],
    "oceans": [("life in the deep ocean", "thing", "ocean fish dark"),
               ("why the sea is salty", "thing", "salt water rivers"),
               ("the tides and the Moon", "thing", "tides Moon water")],
    "weather": [("how rain forms", "thing", "rain clouds water"),
                ("staying safe during a thunderstorm", "act", "storm lightning safe"),
                ("reading a weather forecast", "act", "forecast rain wind")],
    "music": [("learning to play the guitar", "act", "guitar chords practice"),
              ("why people love music", "thing", "music songs feelings")],
    "sports": [("training for a first 5k run", "act", "run training shoes"),
               ("the rules of basketball", "thing", "ball team points"),
               ("why warming up before exercise matters", "thing", "muscles exercise body")],
    "health": [("getting better sleep", "act", "sleep bed night"),
               ("drinking enough water each day", "act", "water body day")],
    "nutrition": [("eating more vegetables", "act", "vegetables food meals"),
                  ("the benefits of a healthy breakfast", "thing", "breakfast energy food")],
    "travel": [("packing light for a trip", "act", "bag clothes trip"),
               ("visiting a new city on a budget", "act", "city money travel"),
               ("traveling by train", "act", "train travel seat")],
    "pets": [("caring for a new puppy", "act", "puppy dog food"),
             ("keeping a cat happy indoors", "act", "cat toys home")],
    "birds": [("how birds migrate", "thing", "birds south winter"),
              ("feeding birds in winter", "act", "birds seeds winter")],
    "insects": [("the life of honeybees", "thing", "bees honey flowers"),
                ("why butterflies matter", "thing", "butterflies flowers plants")],
    "dinosaurs": [("how dinosaurs lived", "thing", "dinosaurs eggs food"),
                  ("how we find dinosaur fossils", "thing", "fossils bones rock")],
    "energy": [("how solar panels work", "thing", "sun solar power"),
               ("saving energy at home", "act", "energy lights home")],
    "climate": [("why forests matter for the climate", "thing", "trees forests air"),
                ("reducing waste at home", "act", "waste plastic home")],
    "money": [("saving money each month", "act", "money budget save"),
              ("making a simple budget", "act", "budget money plan")],
    "reading": [("building a reading habit", "act", "books reading time"),
                ("the joy of reading before bed", "thing", "books night story")],
    "writing": [("writing a good short story", "act", "story characters plot"),
                ("keeping a daily journal", "act", "journal day thoughts")],
    "art": [("learning to draw", "act", "pencil drawing practice"),
            ("mixing paint colors", "act", "paint colors blue")],
    "photography": [("taking better photos with a phone", "act", "photo light phone"),
                    ("why light matters in photography", "thing", "light photo shadow")],
    "languages": [("learning a new language", "act", "words practice language"),
                  ("why some languages are hard to learn", "thing", "language grammar words")],
    "math": [("why fractions are useful", "thing", "fractions numbers parts"),
             ("practicing mental math", "act", "numbers math practice")],
    "physics": [("why things fall to the ground", "thing", "gravity Earth mass"),
                ("how a rainbow forms", "thing", "light rain colors")],
    "chemistry": [("what happens when ice melts", "thing", "ice water heat"),
                  ("why iron rusts", "thing", "iron water air")],
    "biology": [("how plants make food from sunlight", "thing", "plants sunlight leaves"),
                ("how the heart pumps blood", "thing", "heart blood body")],
    "computers": [("how a computer stores files", "thing", "files disk data"),
                  ("keeping your passwords safe", "act", "password account safe")],
    "internet": [("how email gets delivered", "thing", "email server message"),
                 ("spotting fake news online", "act", "news sources facts")],
    "robots": [("robots that help in factories", "thing", "robots work factory"),
               ("building a simple robot kit", "act", "robot motor parts")],
    "cars": [("how an electric car works", "thing", "battery car motor"),
             ("checking your tire pressure", "act", "tires air car")],
    "bicycles": [("riding a bike to work", "act", "bike road helmet"),
                 ("fixing a flat bicycle tire", "act", "tire tube pump")],
    "mountains": [("hiking a mountain trail", "act", "trail water boots"),
                  ("how mountains form", "thing", "rock plates mountains")],
    "volcanoes": [("why volcanoes erupt", "thing", "lava magma rock"),
                  ("living near a volcano", "thing", "volcano people ash")],
    "coffee": [("brewing a good cup of coffee", "act", "coffee beans water"),
               ("the history of coffee", "thing", "coffee beans trade")],
    "tea": [("making a pot of green tea", "act", "tea leaves water"),
            ("tea traditions around the world", "thing", "tea cups guests")],
    "friendship": [("making new friends as an adult", "act", "friends time people"),
                   ("being a good listener", "act", "listen people time")],
    "work": [("running a short team meeting", "act", "meeting team time"),
             ("staying focused while working from home", "act", "focus work home")],
    "study": [("preparing for an exam", "act", "exam notes study"),
              ("taking good notes in class", "act", "notes class ideas")],
    "cities": [("why cities need parks", "thing", "parks people trees"),
               ("getting around a city by bus", "act", "bus city ticket")],
    "camping": [("setting up a tent", "act", "tent ground rain"),
                ("cooking over a campfire", "act", "fire food wood")],
    "recycling": [("recycling paper and glass", "act", "paper glass bins"),
                  ("what happens to recycled plastic", "thing", "plastic bottles factory")],
    "holidays": [("planning a birthday party", "act", "party cake friends"),
                 ("winter holiday traditions", "thing", "family winter food")],
    "movies": [("how movies are made", "thing", "film actors camera"),
               ("choosing a movie for family night", "act", "movie family night")],
    "games": [("the rules of chess", "thing", "chess board king"),
              ("playing board games with friends", "act", "game friends board")],
    "rivers": [("how rivers shape the land", "thing", "river water rock"),
               ("the importance of clean rivers", "thing", "river water fish")],
    "trees": [("how trees grow", "thing", "trees roots leaves"),
              ("planting a tree", "act", "tree soil water")],
    "the brain": [("how memory works", "thing", "brain memory sleep"),
                  ("learning a new skill faster", "act", "practice brain skill")],
}

THING_FORMS = [
    "Explain {p}", "Describe {p}", "Write a short poem about {p}",
    "Write a short story about {p}", "Summarise {p} in simple words",
    "Write a short blog post about {p}", "Explain {p} to a ten-year-old",
    "Write a short letter to a friend about {p}", "Share some interesting facts about {p}",
    "Write a short speech about {p}", "Give a short overview of {p}",
    "Write a short diary entry about {p}",
]
ACT_FORMS = [
    "Give tips on {p}", "Give advice to a beginner on {p}",
    "Describe common mistakes in {p}", "Explain the first steps of {p}",
    "Explain why someone might enjoy {p}",
]

# how often each check type is drawn
WEIGHTS: dict[str, int] = {
    "include_keywords": 10, "max_words": 9, "min_words": 4, "min_sentences": 4,
    "max_sentences": 4, "min_paragraphs": 4, "max_paragraphs": 3, "exclude_keywords": 5,
    "keyword_frequency": 5, "all_lowercase": 7, "all_uppercase": 3,
    "capital_word_frequency": 3, "no_commas": 7, "starts_with": 6, "ends_with": 6,
    "valid_json": 3, "bullet_count": 6, "numbered_sections": 3, "placeholders": 4,
    "title": 6, "postscript": 6, "highlighted_sections": 5, "repeat_prompt": 1,
    "two_responses": 1,
}
N_CHECKS_WEIGHTS = {1: 35, 2: 40, 3: 25}

# the check types by family; no training prompt holds a type of a held-out family
FAMILIES: dict[str, list[str]] = {
    "length": ["min_words", "max_words", "min_sentences", "max_sentences", "min_paragraphs",
               "max_paragraphs"],
    "keywords": ["include_keywords", "exclude_keywords", "keyword_frequency"],
    "punctuation": ["no_commas"],
    "markup": ["bullet_count", "numbered_sections", "placeholders", "title", "postscript",
               "highlighted_sections"],
    "case": ["all_lowercase", "all_uppercase", "capital_word_frequency"],
    "start_end": ["starts_with", "ends_with"],
    "structure": ["valid_json", "two_responses", "repeat_prompt"],
}
HELD_OUT_FAMILIES = ("case", "start_end", "structure")
HELD_OUT_TYPES = {t for f in HELD_OUT_FAMILIES for t in FAMILIES[f]}
TRAINED_TYPES = set(WEIGHTS) - HELD_OUT_TYPES

START_PHRASES = ["Sure", "Here is", "Of course", "In short", "Well", "Great question",
                 "Let me explain", "Today", "Dear reader", "Once upon a time"]
END_PHRASES = ["Have a nice day.", "That is all.", "Thank you for reading.",
               "Is there anything else I can help with?", "Enjoy!", "The end.",
               "Good luck!", "See you soon."]
FILLER_WORDS = ["very", "really", "thing", "stuff", "basically", "just", "actually",
                "amazing", "great", "simply", "important", "nice"]
JSON_KEYS = [[], [], ["answer"], ["title", "text"], ["summary"], ["tips"],
             ["topic", "points"]]

# pairs of types that must not share a prompt
CONFLICTS = {frozenset(p) for p in [
    ("all_lowercase", "all_uppercase"), ("all_lowercase", "capital_word_frequency"),
    ("all_lowercase", "postscript"), ("all_lowercase", "numbered_sections"),
    ("all_lowercase", "repeat_prompt"), ("all_uppercase", "capital_word_frequency"),
    ("all_uppercase", "repeat_prompt"),
    ("min_words", "max_words"), ("min_sentences", "max_sentences"),
    ("min_paragraphs", "max_paragraphs"),
    ("starts_with", "title"), ("starts_with", "numbered_sections"),
    ("starts_with", "repeat_prompt"), ("ends_with", "postscript"),
    ("max_paragraphs", "numbered_sections"), ("max_paragraphs", "two_responses"),
    ("max_sentences", "bullet_count"), ("max_sentences", "numbered_sections"),
    ("max_sentences", "min_paragraphs"), ("max_sentences", "repeat_prompt"),
    ("title", "repeat_prompt"), ("repeat_prompt", "two_responses"),
    ("bullet_count", "two_responses"), ("numbered_sections", "two_responses"),
    ("keyword_frequency", "exclude_keywords"),
]}
# types that allow only a few companions
ONLY_WITH = {
    "valid_json": {"include_keywords", "exclude_keywords", "keyword_frequency",
                   "max_words", "min_words"},
    "two_responses": {"include_keywords", "exclude_keywords", "keyword_frequency",
                      "max_words", "min_words", "no_commas", "all_lowercase",
                      "highlighted_sections", "placeholders"},
}


def _compatible_types(types: list[str]) -> bool:
    for i, a in enumerate(types):
        for b in types[i + 1:]:
            if frozenset((a, b)) in CONFLICTS:
                return False
            if a in ONLY_WITH and b not in ONLY_WITH[a]:
                return False
            if b in ONLY_WITH and a not in ONLY_WITH[b]:
                return False
    return True


def _params(rng: random.Random, t: str, keywords: list[str], task: str) -> dict:
    if t == "min_words":
        return {"n": rng.choice([10, 15, 20, 25, 30, 35, 40])}
    if t == "max_words":
        return {"n": rng.randrange(20, 81, 5)}
    if t == "min_sentences":
        return {"n": rng.randint(2, 4)}
    if t == "max_sentences":
        return {"n": rng.randint(1, 5)}
    if t == "min_paragraphs":
        return {"n": rng.randint(2, 3)}
    if t == "max_paragraphs":
        return {"n": rng.randint(1, 3)}
    if t == "include_keywords":
        return {"keywords": rng.sample(keywords, rng.choice([1, 1, 2]))}
    if t == "exclude_keywords":
        return {"keywords": rng.sample(FILLER_WORDS, rng.choice([1, 2]))}
    if t == "keyword_frequency":
        if rng.random() < 0.75:
            return {"keyword": rng.choice(keywords), "n": rng.choice([2, 3]),
                    "relation": "at least"}
        return {"keyword": rng.choice(keywords), "n": rng.choice([1, 2]),
                "relation": "exactly"}
    if t == "capital_word_frequency":
        if rng.random() < 0.7:
            return {"n": rng.randint(1, 3), "relation": "at least"}
        return {"n": rng.randint(2, 4), "relation": "at most"}
    if t == "starts_with":
        return {"phrase": rng.choice(START_PHRASES)}
    if t == "ends_with":
        return {"phrase": rng.choice(END_PHRASES)}
    if t == "valid_json":
        return {"keys": list(rng.choice(JSON_KEYS))}
    if t == "bullet_count":
        return {"n": rng.randint(2, 4)}
    if t == "numbered_sections":
        return {"n": rng.randint(2, 3), "splitter": "Section" if rng.random() < 0.8 else "Part"}
    if t == "placeholders":
        return {"n": rng.randint(1, 2)}
    if t == "postscript":
        return {"marker": "P.S." if rng.random() < 0.8 else "P.P.S"}
    if t == "highlighted_sections":
        return {"n": rng.randint(1, 2)}
    if t == "repeat_prompt":
        return {"prompt": task + "."}
    return {}  # all_lowercase, all_uppercase, no_commas, title, two_responses


def _word_demand(by: dict[str, dict]) -> int:
    """A rough number of words the other checks need (for max_words)."""
    w = 15
    w += 3 if "title" in by else 0
    w += 6 if "postscript" in by else 0
    w += 5 * by["bullet_count"]["n"] if "bullet_count" in by else 0
    w += 12 * by["numbered_sections"]["n"] if "numbered_sections" in by else 0
    w += 15 * by["min_paragraphs"]["n"] if "min_paragraphs" in by else 0
    w += 8 * by["min_sentences"]["n"] if "min_sentences" in by else 0
    w += 30 if "two_responses" in by else 0
    if "repeat_prompt" in by:
        w += len(by["repeat_prompt"]["prompt"].split()) + 10
    for t in ("starts_with", "ends_with"):
        w += len(by[t]["phrase"].split()) if t in by else 0
    return w


def _consistent(by: dict[str, dict], task: str) -> bool:
    if "max_words" in by and by["max_words"]["n"] < _word_demand(by):
        return False
    if "max_paragraphs" in by:
        need = 1 + ("title" in by) + ("postscript" in by) + ("bullet_count" in by)
        if by["max_paragraphs"]["n"] < need:
            return False
    if "max_sentences" in by:
        need = 1 + ("title" in by) + ("postscript" in by) + ("two_responses" in by)
        if by["max_sentences"]["n"] < need:
            return False
    if "capital_word_frequency" in by and by["capital_word_frequency"]["relation"] == "at most":
        if "numbered_sections" in by or "postscript" in by:
            return False
    if "exclude_keywords" in by:
        banned = {k.lower() for k in by["exclude_keywords"]["keywords"]}
        texts = [task] + [by[t]["phrase"] for t in ("starts_with", "ends_with") if t in by]
        for text in texts:
            if banned & {w.strip(".!?").lower() for w in text.split()}:
                return False
    if "keyword_frequency" in by and "include_keywords" in by:
        if by["keyword_frequency"]["keyword"] in by["include_keywords"]["keywords"]:
            return False
    if "no_commas" in by and "," in task:
        return False
    return True


def _apply_case(by: dict[str, dict]) -> None:
    """Make phrases and keywords agree with an all-lowercase / all-uppercase check."""
    for case, fn in (("all_lowercase", str.lower), ("all_uppercase", str.upper)):
        if case not in by:
            continue
        for t in ("starts_with", "ends_with"):
            if t in by:
                by[t]["phrase"] = fn(by[t]["phrase"])
        for t in ("include_keywords", "exclude_keywords"):
            if t in by:
                by[t]["keywords"] = [fn(k) for k in by[t]["keywords"]]
        if "keyword_frequency" in by:
            by["keyword_frequency"]["keyword"] = fn(by["keyword_frequency"]["keyword"])


def sample_checks(rng: random.Random, keywords: list[str], task: str,
                  types_from: set[str] | None = None, k: int | None = None) -> list[dict]:
    """One to three consistent checks (`k` of them if given), of `types_from` only."""
    names = [t for t in WEIGHTS if types_from is None or t in types_from]
    weights = [WEIGHTS[n] for n in names]
    if k is None:
        k = rng.choices(list(N_CHECKS_WEIGHTS), weights=list(N_CHECKS_WEIGHTS.values()))[0]
    for _ in range(1000):
        types: list[str] = []
        while len(types) < k:
            t = rng.choices(names, weights=weights)[0]
            if t not in types:
                types.append(t)
        if not _compatible_types(types):
            continue
        by = {t: {"type": t, **_params(rng, t, keywords, task)} for t in types}
        _apply_case(by)
        if not _consistent(by, task):
            continue
        return [validate_check(by[t]) for t in types]
    raise RuntimeError("could not draw consistent checks")  # pragma: no cover


def make_record(rng: random.Random, types_from: set[str] | None = TRAINED_TYPES,
                k: int | None = None, paraphrase: bool = False) -> tuple[str, dict]:
    topic = rng.choice(sorted(TOPICS))
    phrase, kind, kws = rng.choice(TOPICS[topic])
    forms = THING_FORMS + ACT_FORMS if kind == "act" else THING_FORMS
    form = rng.choice(forms)
    task = form.format(p=phrase)
    checks = sample_checks(rng, kws.split(), task, types_from, k)
    if paraphrase:
        prompt = compose(rng, task, [paraphrase_check(rng, c) for c in checks])
    else:
        prompt = task + ". " + " ".join(describe_check(c) for c in checks)
    return prompt, {"checks": checks, "topic": topic, "task": form.replace("{p}", "..."),
                    "families": sorted({family_of(c["type"]) for c in checks})}


def family_of(check_type: str) -> str:
    return next(f for f, types in FAMILIES.items() if check_type in types)


# --- other phrasings: the transfer sets ---------------------------------------------------

def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _quoted(words: list[str], joiner: str) -> str:
    q = [f'"{w}"' for w in words]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + f" {joiner} " + q[-1]


# check type -> instruction templates in other words than `describe_check`
PARAPHRASES = {
    "include_keywords": [lambda c: f"Make sure {_quoted(c['keywords'], 'and')} show up somewhere in it.",
                         lambda c: f"Your reply needs to mention {_quoted(c['keywords'], 'and')}."],
    "max_words": [lambda c: f"Keep it to {c['n']} words or fewer.",
                  lambda c: f"No more than {c['n']} words, please."],
    "min_words": [lambda c: f"It should run to {c['n']} words or more.",
                  lambda c: f"Please write no fewer than {c['n']} words."],
    "min_sentences": [lambda c: f"Use {c['n']} or more sentences.",
                      lambda c: f"I need a minimum of {c['n']} sentences."],
    "max_sentences": [lambda c: f"Keep it to {_plural(c['n'], 'sentence')} at most.",
                      lambda c: f"Don't go past {_plural(c['n'], 'sentence')}."],
    "min_paragraphs": [lambda c: f"Split it into {c['n']} or more paragraphs with a blank line "
                                 "between them."],
    "max_paragraphs": [lambda c: f"Don't go beyond {_plural(c['n'], 'paragraph')} (paragraphs are "
                                 "separated by blank lines)."],
    "exclude_keywords": [lambda c: f"Steer clear of the word {_quoted(c['keywords'], 'and')} "
                                   "entirely.",
                         lambda c: f"Never write {_quoted(c['keywords'], 'or')}."],
    "keyword_frequency": [lambda c: (f'The word "{c["keyword"]}" should come up {c["n"]} or more '
                                     "times." if c["relation"] == "at least" else
                                     f'Say "{c["keyword"]}" exactly {_plural(c["n"], "time")}, '
                                     "no more and no less.")],
    "all_lowercase": [lambda c: "Please don't use any capital letters at all: everything in "
                                "lowercase.",
                      lambda c: "Type the whole reply in lower case only."],
    "all_uppercase": [lambda c: "Please write everything in CAPITAL LETTERS, with no lowercase "
                                "letters at all.",
                      lambda c: "The whole reply must be in upper case."],
    "capital_word_frequency": [lambda c: (f"Put {_plural(c['n'], 'word')} or more in ALL CAPS for "
                                          "emphasis." if c["relation"] == "at least" else
                                          f"Use no more than {_plural(c['n'], 'word')} written "
                                          "fully in capitals.")],
    "no_commas": [lambda c: "Avoid commas completely.",
                  lambda c: "Don't put a single comma in your reply."],
    "starts_with": [lambda c: f'Open with the words "{c["phrase"]}".',
                    lambda c: f'The very first words of your reply must be "{c["phrase"]}".'],
    "ends_with": [lambda c: f'Finish with exactly "{c["phrase"]}" and nothing after it.',
                  lambda c: f'Make "{c["phrase"]}" the final words of your reply.'],
    "valid_json": [lambda c: "Reply with a JSON object only" +
                   (f" (keys: {_quoted(c['keys'], 'and')})" if c.get("keys") else "") +
                   ", and no text outside it."],
    "bullet_count": [lambda c: f'Include exactly {c["n"]} markdown bullets (lines that start with '
                               '"* ").'],
    "numbered_sections": [lambda c: f'Organise it into {c["n"]} or more parts, each headed '
                                    f'"{c["splitter"]} 1", "{c["splitter"]} 2" and so on.'],
    "placeholders": [lambda c: f"Leave {_plural(c['n'], 'placeholder')} or more in square brackets, "
                               "like [name]."],
    "title": [lambda c: "Put a title in double angle brackets at the top, like <<A Title>>."],
    "postscript": [lambda c: f'Close with a postscript that begins with "{c["marker"]}".'],
    "highlighted_sections": [lambda c: f"Emphasise {_plural(c['n'], 'phrase')} or more with single "
                                       "asterisks, like *this*."],
    "repeat_prompt": [lambda c: f'Before you answer, copy this request word for word: '
                                f'"{c["prompt"]}"'],
    "two_responses": [lambda c: "Write two different answers with a line of six asterisks "
                                "(******) between them and nothing else."],
}
CONTEXTS = ["I'm putting together notes for a community class.",
            "This is for a newsletter my neighbours read.",
            "My younger cousin asked me about this yesterday.",
            "I want to share this with my book club.",
            "We are making a poster for the school hallway."]
ASIDES = ["Keep the tone friendly.", "Plain words are best.", "Assume no background knowledge.",
          "A warm tone works best."]


def paraphrase_check(rng: random.Random, check: dict) -> str:
    return rng.choice(PARAPHRASES[check["type"]])(check)


def compose(rng: random.Random, task: str, instructions: list[str]) -> str:
    """A request in another register: as a question, after a context sentence, or with
    the instructions split around an aside."""
    style = rng.randrange(3)
    if style == 0:
        head = f"Could you {_lower_first(task)}?"
    elif style == 1:
        head = f"{rng.choice(CONTEXTS)} {task}."
    else:
        head = f"{task}, please."
    if len(instructions) > 1 and rng.random() < 0.6:
        cut = rng.randint(1, len(instructions) - 1)
        parts = instructions[:cut] + [rng.choice(ASIDES)] + instructions[cut:]
    else:
        parts = instructions + ([rng.choice(ASIDES)] if rng.random() < 0.5 else [])
    return " ".join([head] + parts)


# --- varied training phrasings: data/train-varied.jsonl -----------------------------------
# The same training records (tasks, checks, meta) with the instructions worded in a third
# way, unlike both `describe_check` and the transfer sets' `PARAPHRASES`, and the request
# laid out in other ways (instructions first, a requirements list, a "Task:" header), so
# that a model trained on them meets each constraint in several wordings rather than one
# template. Trained types only: the held-out families never appear.
def _the_words(words: list[str]) -> str:
    """'word "a"' or 'words "a" and "b"'."""
    return f"word{'s' if len(words) > 1 else ''} {_quoted(words, 'and')}"


TRAIN_PHRASINGS = {
    "include_keywords": [lambda c: f"Work in the {_the_words(c['keywords'])}.",
                         lambda c: f"Be sure to use {_quoted(c['keywords'], 'and')} at least once."],
    "max_words": [lambda c: f"Stay under {c['n'] + 1} words.",
                  lambda c: f"{c['n']} words is the limit.",
                  lambda c: f"The answer may not be longer than {c['n']} words."],
    "min_words": [lambda c: f"Write {c['n']} words at the very least.",
                  lambda c: f"Anything shorter than {c['n']} words is too short."],
    "min_sentences": [lambda c: f"Give me {c['n']} sentences or more.",
                      lambda c: f"Fewer than {c['n']} sentences will not do."],
    "max_sentences": [lambda c: f"{_plural(c['n'], 'sentence')} is the most you may write.",
                      lambda c: f"Limit yourself to {_plural(c['n'], 'sentence')}."],
    "min_paragraphs": [lambda c: f"Spread it over {c['n']} or more paragraphs, each separated "
                                 "from the next by an empty line."],
    "max_paragraphs": [lambda c: f"Stick to {_plural(c['n'], 'paragraph')} or fewer (a blank "
                                 "line separates paragraphs)."],
    "exclude_keywords": [lambda c: f"The {_the_words(c['keywords'])} must not appear.",
                         lambda c: f"Leave out {_quoted(c['keywords'], 'and')} completely."],
    "keyword_frequency": [lambda c: (f'Repeat the word "{c["keyword"]}" {c["n"]} times or more.'
                                     if c["relation"] == "at least" else
                                     f'"{c["keyword"]}" has to appear {_plural(c["n"], "time")}, '
                                     "exactly.")],
    "no_commas": [lambda c: "Commas are not allowed.",
                  lambda c: "Write without a single comma."],
    "bullet_count": [lambda c: f'Give exactly {c["n"]} points as a markdown list, every line '
                               'beginning with "* ".'],
    "numbered_sections": [lambda c: f'Break it into {c["n"]} or more sections labelled '
                                    f'"{c["splitter"]} 1", "{c["splitter"]} 2", and so on.'],
    "placeholders": [lambda c: f"Add {c['n']} or more fill-in blanks in square brackets, for "
                               "example [date]."],
    "title": [lambda c: "Start with a title between double angle brackets, e.g. <<Title Here>>."],
    "postscript": [lambda c: f'After the main text, add a note beginning with "{c["marker"]}".'],
    "highlighted_sections": [lambda c: f"Mark {_plural(c['n'], 'key phrase')} or more in "
                                       "*single asterisks*."],
}
REQUEST_LEADS = ["Here is what I need", "My request", "The job"]


def rephrase_for_training(rng: random.Random, task: str, checks: list[dict]) -> str:
    """A training request in one of four layouts, each instruction in the canonical or a
    `TRAIN_PHRASINGS` wording."""
    said = [rng.choice([describe_check] + TRAIN_PHRASINGS[c["type"]])(c) for c in checks]
    style = rng.randrange(4)
    if style == 0:
        return f"{task}. " + " ".join(said)
    if style == 1:
        return " ".join(said) + f" With that in mind: {_lower_first(task)}."
    if style == 2:
        return f"Task: {task}.\nRequirements:\n" + "\n".join(f"- {s}" for s in said)
    return f"{rng.choice(REQUEST_LEADS)}: {_lower_first(task)}. " + " ".join(said)


def canonical_task(record: dict) -> str:
    """The task sentence of a canonical training prompt (``task + ". " + instructions``)."""
    tail = ". " + " ".join(describe_check(c) for c in record["meta"]["checks"])
    if not record["prompt"].endswith(tail):
        raise ValueError(f"{record['id']}: not a canonical training prompt")
    return record["prompt"][: -len(tail)]


def varied_training(rng: random.Random, train: list[dict], seen: set[str]) -> list[dict]:
    """`train` with every prompt reworded (same ids, checks and meta)."""
    out = []
    for r in train:
        task = canonical_task(r)
        while True:
            prompt = rephrase_for_training(rng, task, r["meta"]["checks"])
            if prompt not in seen:
                break
        seen.add(prompt)
        out.append({**r, "prompt": prompt, "meta": {**r["meta"], "phrasing": "varied"}})
    return out


def make_split(rng: random.Random, prefix: str, n: int, seen: set[str], **how) -> list[dict]:
    records = []
    while len(records) < n:
        prompt, meta = make_record(rng, **how)
        if prompt in seen:
            continue
        seen.add(prompt)
        records.append({"id": f"{prefix}-{len(records) + 1:05d}", "prompt": prompt,
                        "meta": meta})
    return records


def write_jsonl(path: Path, records: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", encoding="utf-8", newline="\n") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=700)
    ap.add_argument("--n-eval", type=int, default=250)
    ap.add_argument("--n-types", type=int, default=120)
    ap.add_argument("--n-three", type=int, default=120)
    ap.add_argument("--out", type=Path, default=HERE, help="output folder")
    args = ap.parse_args(argv)
    seen: set[str] = set()
    train = make_split(random.Random(args.seed), "train", args.n_train, seen)
    evals = make_split(random.Random(args.seed + 100003), "eval", args.n_eval, seen)
    types = make_split(random.Random(args.seed + 200003), "types", args.n_types, seen,
                       types_from=HELD_OUT_TYPES, paraphrase=True)
    three = make_split(random.Random(args.seed + 300007), "three", args.n_three, seen,
                       types_from=None, k=3, paraphrase=True)
    varied = varied_training(random.Random(args.seed + 400009), train, seen)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, recs in (("train", train), ("eval", evals), ("eval-types", types),
                       ("eval-three", three), ("train-varied", varied)):
        write_jsonl(args.out / f"{name}.jsonl", recs)
    print(f"wrote {len(train)} train (and as many reworded), {len(evals)} eval, "
          f"{len(types)} held-out-type and {len(three)} three-constraint prompts to "
          f"{args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
