"""Wording checks: keywords (case-insensitive whole-word match: no word character
directly before or after; spaces inside a keyword match any whitespace, so "tomato" does
not match "tomatoes"), letter case, capital words (word tokens of at least two
characters whose cased characters are all upper case: "NASA", "OK"; not "I" or the "P"
of "P.S.") and commas."""
from __future__ import annotations

import re

from .base import N, REL_LEAST, Param, check_type, compare, quoted_list, times
from .text import words

def _keyword_re(keyword: str) -> re.Pattern:
    parts = [re.escape(p) for p in keyword.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.I)


def _count_keyword(text: str, keyword: str) -> int:
    return len(_keyword_re(keyword).findall(text))


def _include_keywords(text, spec, prompt_text):
    return all(_keyword_re(k).search(text) for k in spec["keywords"])


def _exclude_keywords(text, spec, prompt_text):
    return not any(_keyword_re(k).search(text) for k in spec["keywords"])


def _keyword_frequency(text, spec, prompt_text):
    return compare(_count_keyword(text, spec["keyword"]), spec["relation"], spec["n"])


def _all_lowercase(text, spec, prompt_text):
    return text.islower()


def _all_uppercase(text, spec, prompt_text):
    return text.isupper()


def _is_capital_word(w: str) -> bool:
    return len(w) >= 2 and w.isupper()


def _capital_word_frequency(text, spec, prompt_text):
    count = sum(1 for w in words(text) if _is_capital_word(w))
    return compare(count, spec["relation"], spec["n"])


def _no_commas(text, spec, prompt_text):
    return "," not in text and "，" not in text


def _i_include(spec):
    kws = spec["keywords"]
    noun = "word" if len(kws) == 1 else "words"
    return f"Include the {noun} {quoted_list(kws, 'and')} in your answer."


def _i_exclude(spec):
    kws = spec["keywords"]
    noun = "word" if len(kws) == 1 else "words"
    return f"Do not use the {noun} {quoted_list(kws, 'or')} anywhere in your answer."


_KEYWORDS = Param("keywords", "list[str]", doc="words, matched case-insensitively as whole words")


TYPES = [
    check_type("include_keywords", [_KEYWORDS], _include_keywords,
        "every keyword appears (case-insensitive whole word)", _i_include),
    check_type("exclude_keywords", [_KEYWORDS], _exclude_keywords,
        "no keyword appears (case-insensitive whole word)", _i_exclude),
    check_type("keyword_frequency", [Param("keyword", "str"), N, REL_LEAST], _keyword_frequency,
        "a keyword appears at least / at most / exactly n times",
        lambda s: f'Use the word "{s["keyword"]}" {s["relation"]} {times(s["n"])}.'),
    check_type("all_lowercase", [], _all_lowercase, "no capital letters (and some letters)",
        lambda s: "Write your entire answer in lowercase letters; no capital letters are "
                  "allowed."),
    check_type("all_uppercase", [], _all_uppercase, "only capital letters (and some letters)",
        lambda s: "Write your entire answer in capital letters only."),
    check_type("capital_word_frequency", [N, REL_LEAST], _capital_word_frequency,
        "words fully in capitals (two or more letters) appear at least / at most / exactly n times",
        lambda s: (f"Use words written entirely in capital letters {s['relation']} "
                   f"{times(s['n'])}.")),
    check_type("no_commas", [], _no_commas, "no commas at all",
        lambda s: "Do not use any commas in your answer."),
]
