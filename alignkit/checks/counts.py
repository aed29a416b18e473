"""Length checks: words, sentences and paragraphs (counted by the rules of `text`)."""
from __future__ import annotations

from .base import N, check_type, plural
from .text import count_sentences, count_words, split_paragraphs

def _min_words(text, spec, prompt_text):
    return count_words(text) >= spec["n"]


def _max_words(text, spec, prompt_text):
    return count_words(text) <= spec["n"]


def _min_sentences(text, spec, prompt_text):
    return count_sentences(text) >= spec["n"]


def _max_sentences(text, spec, prompt_text):
    return count_sentences(text) <= spec["n"]


def _min_paragraphs(text, spec, prompt_text):
    return len(split_paragraphs(text)) >= spec["n"]


def _max_paragraphs(text, spec, prompt_text):
    return len(split_paragraphs(text)) <= spec["n"]


TYPES = [
    check_type("min_words", [N], _min_words, "at least n words",
        lambda s: f"Answer with at least {plural(s['n'], 'word')}."),
    check_type("max_words", [N], _max_words, "at most n words",
        lambda s: f"Answer in at most {plural(s['n'], 'word')}."),
    check_type("min_sentences", [N], _min_sentences, "at least n sentences",
        lambda s: f"Write at least {plural(s['n'], 'sentence')}."),
    check_type("max_sentences", [N], _max_sentences, "at most n sentences",
        lambda s: f"Use at most {plural(s['n'], 'sentence')}."),
    check_type("min_paragraphs", [N], _min_paragraphs,
        "at least n paragraphs (blank lines or *** marker lines between them)",
        lambda s: f"Write at least {plural(s['n'], 'paragraph')}, separated by blank lines."),
    check_type("max_paragraphs", [N], _max_paragraphs,
        "at most n paragraphs (blank lines or *** marker lines between them)",
        lambda s: ("Write a single paragraph, with no blank lines." if s["n"] == 1 else
                   f"Write at most {plural(s['n'], 'paragraph')}, separated by blank lines.")),
]
