"""The text rules every check shares (stdlib `re` only).

* **words**: tokens matching ``\\w+(?:['’]\\w+)*``, i.e. runs of letters/digits/underscore;
  an apostrophe inside a word keeps it one word ("don't" is one word), a hyphen splits
  ("well-known" is two).
* **sentences**: the text is cut at blank lines (paragraph breaks) and after a run of
  ``.``, ``!`` or ``?`` (optionally followed by closing quotes, brackets or ``*``) that is
  followed by whitespace or the end of the text. Pieces that contain at least one word
  character are sentences. So "3.14" does not end a sentence, while "e.g. this" does.
* **paragraphs**: when the text has a line consisting only of ``***`` (the IFEval
  marker), paragraphs are the non-empty chunks between such lines; otherwise they are
  the non-empty chunks separated by blank lines (lines holding only whitespace).
* **normalised comparison** (`norm`): whitespace collapsed, case folded to lower.

``text`` and ``prompt_text`` may also be chat message lists
(``[{"role", "content"}, ...]``): the completion's assistant contents are joined with
blank lines; for the prompt, the last user message is used (`as_text`).
"""
from __future__ import annotations

import re
from typing import Any

from alignkit.text import completion_text, prompt_text as user_text

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")


_BLANK_LINE_RE = re.compile(r"\n[ \t\r\f\v]*\n")


_MARKER_LINE_RE = re.compile(r"^[ \t]*\*\*\*[ \t]*$", re.M)


_SENT_SPLIT_RE = re.compile(r"[.!?]+[\"'”’)\]*_]*(?=\s|$)")


def as_text(value: Any, role: str = "assistant") -> str:
    """A completion's text (``role="assistant"``) or a prompt's user text
    (``role="user"``), by the rules of `alignkit.text`. A whole conversation given as
    the text is checked on its assistant turns (the completion it holds)."""
    if role == "user":
        return user_text(value)
    if isinstance(value, list):
        value = [m for m in value if not (isinstance(m, dict) and m.get("role") in ("user", "system"))]
    return completion_text(value) if isinstance(value, (str, list)) or value is None \
        else str(value)


def words(text: str) -> list[str]:
    """The word tokens of ``text`` (see the module docstring)."""
    return _WORD_RE.findall(text)


def count_words(text: str) -> int:
    return len(words(text))


def count_sentences(text: str) -> int:
    """Number of sentences (see the module docstring for the rule)."""
    n = 0
    for para in _BLANK_LINE_RE.split(text):
        for piece in _SENT_SPLIT_RE.split(para):
            if re.search(r"\w", piece):
                n += 1
    return n


def split_paragraphs(text: str) -> list[str]:
    """Non-empty paragraphs: chunks between ``***`` marker lines when any, else chunks
    between blank lines."""
    if _MARKER_LINE_RE.search(text):
        chunks = _MARKER_LINE_RE.split(text)
    else:
        chunks = _BLANK_LINE_RE.split(text)
    return [c.strip() for c in chunks if c.strip()]


def norm(s: str) -> str:
    return " ".join(s.split()).lower()
