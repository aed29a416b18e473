"""Verifiable instruction checks (an IFEval-style family, written for alignkit).

A check spec is a plain dict ``{"type": NAME, **params}`` as found in a prompt
record's ``meta.checks``. Every check type is one registered :class:`CheckType` in
:data:`CHECKS` (name -> parameters, test function, description, instruction text), so
that adding a check is one function plus one registry entry plus its tests.

Public API::

    CHECKS: dict[str, CheckType]
    validate_check(spec, field="check") -> dict          # normalised copy, defaults filled
    validate_checks(checks, field="meta.checks") -> list[dict]
    run_checks(text, checks, prompt_text="", meta=None) -> list[{"type", "passed"}]
    check_score(results) -> float | None                 # fraction passed, None if empty
    describe_check(spec) -> str                           # English instruction sentence
    describe_checks(checks) -> str

Bad specs raise :class:`alignkit.errors.DataError` with ``field`` set, e.g.
``meta.checks[1].n``; the caller adds the file path and line.

Text rules (shared by all checks, stdlib ``re`` only):

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
* **keywords**: case-insensitive whole-word match (no word character directly before or
  after; spaces inside a keyword match any whitespace). "tomato" does not match
  "tomatoes".
* **capital words**: word tokens of at least two characters whose cased characters are all
  upper case ("NASA", "OK"); single letters such as "I" or the "P" of "P.S." do not count.
* **relations**: "at least" (>=), "at most" (<=), "exactly" (==).

``text`` and ``prompt_text`` may also be chat message lists
(``[{"role", "content"}, ...]``): the completion's assistant contents are joined with
blank lines; for the prompt, the last user message is used.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field as dc_field
from typing import Any, Callable

from alignkit.errors import DataError
from alignkit.registry import Registry, unknown_name
from alignkit.text import completion_text, prompt_text as user_text

__all__ = [
    "Param", "CheckType", "CHECKS", "RELATIONS",
    "validate_check", "validate_checks", "run_checks", "check_score",
    "describe_check", "describe_checks",
    "words", "count_words", "count_sentences", "split_paragraphs", "as_text", "loose_variants",
]

RELATIONS = ("at least", "at most", "exactly")

# --------------------------------------------------------------------------- text helpers

_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")
_BLANK_LINE_RE = re.compile(r"\n[ \t\r\f\v]*\n")
_MARKER_LINE_RE = re.compile(r"^[ \t]*\*\*\*[ \t]*$", re.M)
_SENT_SPLIT_RE = re.compile(r"[.!?]+[\"'”’)\]*_]*(?=\s|$)")
_BULLET_RE = re.compile(r"^[ \t]*[*-][ \t]+\S", re.M)
_PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]+\]")
_TITLE_RE = re.compile(r"<<([^\n]+?)>>")
_HIGHLIGHT_RE = re.compile(r"(?<!\*)\*(?![*\s])[^\n*]*?[^\s*]\*(?!\*)")
_NUMBER_RE = re.compile(
    r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+(?:[eE][-+]?\d+)?")
_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)
_TWO_RESPONSES_SPLIT_RE = re.compile(r"\*{6,}")


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


def _keyword_re(keyword: str) -> re.Pattern:
    parts = [re.escape(p) for p in keyword.split()]
    return re.compile(r"(?<!\w)" + r"\s+".join(parts) + r"(?!\w)", re.I)


def _count_keyword(text: str, keyword: str) -> int:
    return len(_keyword_re(keyword).findall(text))


def _compare(count: int, relation: str, n: int) -> bool:
    if relation == "at least":
        return count >= n
    if relation == "at most":
        return count <= n
    return count == n


def _norm(s: str) -> str:
    return " ".join(s.split()).lower()


# --------------------------------------------------------------------------- registry types

@dataclass(frozen=True)
class Param:
    """One parameter of a check type.

    ``type`` is one of "int", "float", "str", "list[str]". ``choices`` restricts a "str"
    parameter; ``minimum`` bounds numbers; strings and list items must be non-empty.
    """

    name: str
    type: str
    required: bool = True
    default: Any = None
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    nonempty: bool = True
    doc: str = ""


@dataclass(frozen=True)
class CheckType:
    """A registered check: parameters, test ``fn(text, spec, prompt_text) -> bool``,
    a one-line ``description`` for docs, and ``instruction(spec) -> str`` for prompts.

    ``reference_param`` names the parameter that falls back to ``meta.reference``.
    """

    name: str
    params: tuple[Param, ...]
    fn: Callable[[str, dict, str], bool]
    description: str
    instruction: Callable[[dict], str]
    reference_param: str | None = None
    extra_validate: Callable[[dict, str], None] | None = dc_field(default=None, repr=False)

    def param(self, name: str) -> Param | None:
        for p in self.params:
            if p.name == name:
                return p
        return None


# --------------------------------------------------------------------------- check functions

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


def _include_keywords(text, spec, prompt_text):
    return all(_keyword_re(k).search(text) for k in spec["keywords"])


def _exclude_keywords(text, spec, prompt_text):
    return not any(_keyword_re(k).search(text) for k in spec["keywords"])


def _keyword_frequency(text, spec, prompt_text):
    return _compare(_count_keyword(text, spec["keyword"]), spec["relation"], spec["n"])


def _all_lowercase(text, spec, prompt_text):
    return text.islower()


def _all_uppercase(text, spec, prompt_text):
    return text.isupper()


def _is_capital_word(w: str) -> bool:
    return len(w) >= 2 and w.isupper()


def _capital_word_frequency(text, spec, prompt_text):
    count = sum(1 for w in words(text) if _is_capital_word(w))
    return _compare(count, spec["relation"], spec["n"])


def _no_commas(text, spec, prompt_text):
    return "," not in text and "，" not in text


def _starts_with(text, spec, prompt_text):
    return _norm(text).startswith(_norm(spec["phrase"]))


def _ends_with(text, spec, prompt_text):
    return _norm(text).endswith(_norm(spec["phrase"]))


def _parse_json(text: str):
    """The parsed JSON of the whole text, else of the first ```json fenced block that
    parses; raises ValueError when none does."""
    candidates = [text.strip()] + [m.group(1).strip() for m in _FENCE_RE.finditer(text)]
    for c in candidates:
        if not c:
            continue
        try:
            return json.loads(c)
        except ValueError:
            continue
    raise ValueError("no JSON")


def _valid_json(text, spec, prompt_text):
    try:
        obj = _parse_json(text)
    except ValueError:
        return False
    keys = spec.get("keys") or []
    if keys:
        return isinstance(obj, dict) and all(k in obj for k in keys)
    return True


def _bullet_count(text, spec, prompt_text):
    return _compare(len(_BULLET_RE.findall(text)), spec["relation"], spec["n"])


def _section_header_re(splitter: str) -> re.Pattern:
    parts = [re.escape(p) for p in splitter.split()]
    return re.compile(r"^[ \t#*_>]*" + r"\s+".join(parts) + r"[ \t]*\d+\b", re.I | re.M)


def _numbered_sections(text, spec, prompt_text):
    count = len(_section_header_re(spec["splitter"]).findall(text))
    return _compare(count, spec["relation"], spec["n"])


def _placeholders(text, spec, prompt_text):
    return len(_PLACEHOLDER_RE.findall(text)) >= spec["n"]


def _title(text, spec, prompt_text):
    return any(m.group(1).strip() for m in _TITLE_RE.finditer(text))


def _postscript_re(marker: str) -> re.Pattern:
    pat = "".join(re.escape(c) + (r"[ \t]?" if c == "." else "") for c in marker.strip())
    return re.compile(r"^[ \t*_>]*" + pat, re.I | re.M)


def _postscript(text, spec, prompt_text):
    return bool(_postscript_re(spec["marker"]).search(text))


def _highlighted_sections(text, spec, prompt_text):
    return len(_HIGHLIGHT_RE.findall(text)) >= spec["n"]


def _repeat_prompt(text, spec, prompt_text):
    prompt = spec.get("prompt") or prompt_text
    if not prompt or not prompt.strip():
        return False
    return text.strip().lower().startswith(prompt.strip().lower())


def _two_responses(text, spec, prompt_text):
    parts = _TWO_RESPONSES_SPLIT_RE.split(text)
    if len(parts) != 2:
        return False
    a, b = parts[0].strip(), parts[1].strip()
    return bool(a) and bool(b) and _norm(a) != _norm(b)


def _exact(text, spec, prompt_text):
    answers = spec["answer"]
    if isinstance(answers, str):
        answers = [answers]
    whole = _norm(text)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    last = _norm(lines[-1]) if lines else ""
    targets = {_norm(str(a)) for a in answers}
    return whole in targets or last in targets


def _last_number(text: str) -> float | None:
    found = _NUMBER_RE.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", ""))
    except ValueError:  # pragma: no cover - the regex only yields numbers
        return None


def _numeric(text, spec, prompt_text):
    x = _last_number(text)
    if x is None:
        return False
    return math.isclose(x, spec["value"], rel_tol=0.0, abs_tol=spec["tol"])


def _regex(text, spec, prompt_text):
    return bool(re.search(spec["pattern"], text, _regex_flags(spec.get("flags", ""))))


_FLAG_MAP = {"i": re.I, "m": re.M, "s": re.S}


def _regex_flags(flags: str) -> int:
    out = 0
    for c in flags:
        out |= _FLAG_MAP[c]
    return out


def _validate_regex(spec: dict, field: str) -> None:
    flags = spec.get("flags", "")
    bad = [c for c in flags if c not in _FLAG_MAP]
    if bad:
        raise DataError(f"unknown regex flag(s) {''.join(bad)!r} (allowed: i, m, s)",
                        field=f"{field}.flags")
    try:
        re.compile(spec["pattern"], _regex_flags(flags))
    except re.error as e:
        raise DataError(f"invalid regular expression {spec['pattern']!r}: {e}",
                        field=f"{field}.pattern") from None


# --------------------------------------------------------------------------- instructions

def _plural(n: int, word: str, plural: str | None = None) -> str:
    return f"{n} {word if n == 1 else (plural or word + 's')}"


def _times(n: int) -> str:
    return {1: "once", 2: "twice"}.get(n, f"{n} times")


def _quoted_list(items: list[str], conj: str) -> str:
    q = [f'"{k}"' for k in items]
    if len(q) == 1:
        return q[0]
    return ", ".join(q[:-1]) + f" {conj} " + q[-1]


def _i_include(spec):
    kws = spec["keywords"]
    noun = "word" if len(kws) == 1 else "words"
    return f"Include the {noun} {_quoted_list(kws, 'and')} in your answer."


def _i_exclude(spec):
    kws = spec["keywords"]
    noun = "word" if len(kws) == 1 else "words"
    return f"Do not use the {noun} {_quoted_list(kws, 'or')} anywhere in your answer."


def _i_json(spec):
    keys = spec.get("keys") or []
    s = "Format your entire answer as valid JSON"
    if keys:
        noun = "key" if len(keys) == 1 else "keys"
        s += f" (an object with the {noun} {_quoted_list(keys, 'and')})"
    return s + "."


def _i_bullets(spec):
    n, rel = spec["n"], spec["relation"]
    pts = "bullet point" if n == 1 else "bullet points"
    return (f"Use {rel} {n} {pts} in markdown format, each on its own line starting "
            f'with "* ".')


def _i_sections(spec):
    n, rel, sp = spec["n"], spec["relation"], spec["splitter"]
    sec = "section" if n == 1 else "sections"
    lead = f"{n} {sec}" if rel == "exactly" else f"{rel} {n} {sec}"
    example = f"{sp} 1" if n == 1 else f"{sp} 1, {sp} 2"
    return (f'Divide your answer into {lead}, each starting with a header "{sp} X" '
            f"({example}, ...).")


def _i_repeat(spec):
    p = spec.get("prompt")
    if p:
        return (f'First repeat the request "{p.strip()}" word for word without change, '
                f"then give your answer.")
    return ("First repeat the request word for word without change, then give your "
            "answer (the request to repeat does not include this sentence).")


def _i_regex(spec):
    flags = spec.get("flags", "")
    suffix = " (ignoring case)" if "i" in flags else ""
    return f"Your answer must match the regular expression /{spec['pattern']}/{suffix}."


# --------------------------------------------------------------------------- registry

_N = Param("n", "int", minimum=0, doc="the count")
_REL_LEAST = Param("relation", "str", required=False, default="at least", choices=RELATIONS)
_REL_EXACT = Param("relation", "str", required=False, default="exactly", choices=RELATIONS)
_KEYWORDS = Param("keywords", "list[str]", doc="words, matched case-insensitively as whole words")


def _ct(name, params, fn, description, instruction, **kw) -> CheckType:
    return CheckType(name, tuple(params), fn, description, instruction, **kw)


_TYPES: dict[str, CheckType] = {c.name: c for c in [
    _ct("min_words", [_N], _min_words, "at least n words",
        lambda s: f"Answer with at least {_plural(s['n'], 'word')}."),
    _ct("max_words", [_N], _max_words, "at most n words",
        lambda s: f"Answer in at most {_plural(s['n'], 'word')}."),
    _ct("min_sentences", [_N], _min_sentences, "at least n sentences",
        lambda s: f"Write at least {_plural(s['n'], 'sentence')}."),
    _ct("max_sentences", [_N], _max_sentences, "at most n sentences",
        lambda s: f"Use at most {_plural(s['n'], 'sentence')}."),
    _ct("min_paragraphs", [_N], _min_paragraphs,
        "at least n paragraphs (blank lines or *** marker lines between them)",
        lambda s: f"Write at least {_plural(s['n'], 'paragraph')}, separated by blank lines."),
    _ct("max_paragraphs", [_N], _max_paragraphs,
        "at most n paragraphs (blank lines or *** marker lines between them)",
        lambda s: ("Write a single paragraph, with no blank lines." if s["n"] == 1 else
                   f"Write at most {_plural(s['n'], 'paragraph')}, separated by blank lines.")),
    _ct("include_keywords", [_KEYWORDS], _include_keywords,
        "every keyword appears (case-insensitive whole word)", _i_include),
    _ct("exclude_keywords", [_KEYWORDS], _exclude_keywords,
        "no keyword appears (case-insensitive whole word)", _i_exclude),
    _ct("keyword_frequency", [Param("keyword", "str"), _N, _REL_LEAST], _keyword_frequency,
        "a keyword appears at least / at most / exactly n times",
        lambda s: f'Use the word "{s["keyword"]}" {s["relation"]} {_times(s["n"])}.'),
    _ct("all_lowercase", [], _all_lowercase, "no capital letters (and some letters)",
        lambda s: "Write your entire answer in lowercase letters; no capital letters are "
                  "allowed."),
    _ct("all_uppercase", [], _all_uppercase, "only capital letters (and some letters)",
        lambda s: "Write your entire answer in capital letters only."),
    _ct("capital_word_frequency", [_N, _REL_LEAST], _capital_word_frequency,
        "words fully in capitals (two or more letters) appear at least / at most / exactly n times",
        lambda s: (f"Use words written entirely in capital letters {s['relation']} "
                   f"{_times(s['n'])}.")),
    _ct("no_commas", [], _no_commas, "no commas at all",
        lambda s: "Do not use any commas in your answer."),
    _ct("starts_with", [Param("phrase", "str")], _starts_with,
        "starts with a phrase (leading whitespace and case ignored)",
        lambda s: f'Begin your answer with the exact phrase "{s["phrase"].strip()}".'),
    _ct("ends_with", [Param("phrase", "str")], _ends_with,
        "ends with a phrase (trailing whitespace and case ignored)",
        lambda s: (f'End your answer with the exact phrase "{s["phrase"].strip()}"; no other '
                   f"words should follow it.")),
    _ct("valid_json", [Param("keys", "list[str]", required=False, default=[])], _valid_json,
        "the text (or a ```json fenced block) is valid JSON, with the given top-level keys",
        _i_json),
    _ct("bullet_count", [_N, _REL_EXACT], _bullet_count,
        'lines starting with "* " or "- " number at least / at most / exactly n', _i_bullets),
    _ct("numbered_sections",
        [_N, Param("splitter", "str", required=False, default="Section"), _REL_LEAST],
        _numbered_sections,
        'header lines "Section 1", "SECTION 2", ... number at least / at most / exactly n',
        _i_sections),
    _ct("placeholders", [_N], _placeholders, "at least n [placeholders] in square brackets",
        lambda s: (f"Include at least {_plural(s['n'], 'placeholder')} in square brackets, "
                   f"such as [address].")),
    _ct("title", [], _title, "a title wrapped in double angular brackets, <<title>>",
        lambda s: "Give your answer a title wrapped in double angular brackets, such as "
                  "<<my title>>."),
    _ct("postscript", [Param("marker", "str", required=False, default="P.S.")], _postscript,
        'a line starting with a postscript marker, "P.S." by default',
        lambda s: (f'At the end of your answer, add a postscript starting with '
                   f'"{s["marker"].strip()}".')),
    _ct("highlighted_sections", [_N], _highlighted_sections,
        "at least n *highlighted* spans (single asterisks, not **bold**)",
        lambda s: (f"Highlight at least {_plural(s['n'], 'part')} of your answer with single "
                   f"asterisks, such as *highlighted part*.")),
    _ct("repeat_prompt", [Param("prompt", "str", required=False, default=None)], _repeat_prompt,
        "starts with the prompt (or the given `prompt`) repeated verbatim (case ignored)",
        _i_repeat),
    _ct("two_responses", [], _two_responses,
        "exactly two different non-empty responses separated by ******",
        lambda s: "Give two different responses, separated by six asterisks (******) and "
                  "nothing else between them."),
    _ct("exact", [Param("answer", "str", required=False, default=None)], _exact,
        "the whole text or its last line equals the answer (whitespace and case "
        "normalised); falls back to meta.reference",
        lambda s: "Give the final answer alone on the last line.",
        reference_param="answer"),
    _ct("numeric",
        [Param("value", "float", required=False, default=None),
         Param("tol", "float", required=False, default=1e-6, minimum=0)],
        _numeric,
        "the last number in the text equals value within tol; falls back to meta.reference",
        lambda s: "End your answer with the final number.",
        reference_param="value"),
    _ct("regex",
        [Param("pattern", "str"),
         Param("flags", "str", required=False, default="", nonempty=False)],
        _regex, "re.search(pattern, text) matches (flags: i, m, s)", _i_regex,
        extra_validate=_validate_regex),
]}

# The check types on the one registry (the entry's implementation is its CheckType;
# `CHECKS` stays the name -> CheckType table the checks code reads).
CHECK_TYPES = Registry("check type")
for _c in _TYPES.values():
    CHECK_TYPES.add(_c.name, _c.description, _c, reads="completion", writes="bool",
                    fields=tuple(p.name for p in _c.params))
CHECKS: dict[str, CheckType] = _TYPES


# --------------------------------------------------------------------------- validation

def _check_value(p: Param, value: Any, field: str) -> Any:
    where = f"{field}.{p.name}"
    if p.type == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise DataError(f"must be an integer, got {value!r}", field=where)
    elif p.type == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise DataError(f"must be a number, got {value!r}", field=where)
        value = float(value)
        if not math.isfinite(value):
            raise DataError(f"must be a finite number, got {value!r}", field=where)
    elif p.type == "str":
        if not isinstance(value, str):
            raise DataError(f"must be a string, got {value!r}", field=where)
        if p.nonempty and not value.strip():
            raise DataError("must be a non-empty string", field=where)
        if p.choices is not None and value not in p.choices:
            allowed = ", ".join(repr(c) for c in p.choices)
            raise DataError(f"must be one of {allowed}, got {value!r}", field=where)
    elif p.type == "list[str]":
        if not isinstance(value, list):
            raise DataError(f"must be a list of strings, got {value!r}", field=where)
        for j, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise DataError(f"must be a non-empty string, got {item!r}",
                                field=f"{where}[{j}]")
        value = list(value)
    else:  # pragma: no cover - registry bug
        raise AssertionError(f"unknown param type {p.type}")
    if p.minimum is not None and value < p.minimum:
        raise DataError(f"must be >= {p.minimum:g}, got {value!r}", field=where)
    return value


def validate_check(spec: Any, field: str = "check") -> dict:
    """Validate one check spec; return a normalised copy with defaults filled in.

    Raises DataError (``field`` like ``meta.checks[2].n``) for a spec that is not an
    object, a missing or unknown ``type``, a missing required parameter, an unknown
    parameter, a wrong-typed or out-of-range value, or an invalid regex.
    """
    if not isinstance(spec, dict):
        raise DataError(f"a check must be an object with a 'type', got {spec!r}", field=field)
    if "type" not in spec:
        raise DataError("missing check type", field=f"{field}.type")
    name = spec["type"]
    if not isinstance(name, str) or name not in CHECKS:
        raise DataError(str(unknown_name("check type", name, sorted(CHECKS))),
                        field=f"{field}.type")
    ct = CHECKS[name]
    allowed = {p.name for p in ct.params}
    unknown = sorted(k for k in spec if k != "type" and k not in allowed)
    if unknown:
        params = ", ".join(sorted(allowed)) or "none"
        raise DataError(f"unknown parameter {unknown[0]!r} for check {name!r} "
                        f"(parameters: {params})", field=f"{field}.{unknown[0]}")
    out: dict[str, Any] = {"type": name}
    for p in ct.params:
        if p.name in spec and not (spec[p.name] is None and not p.required):
            out[p.name] = _check_value(p, spec[p.name], field)
        elif p.required:
            raise DataError(f"missing required parameter {p.name!r} for check {name!r}",
                            field=f"{field}.{p.name}")
        elif p.default is not None:
            out[p.name] = list(p.default) if isinstance(p.default, list) else p.default
    if ct.extra_validate is not None:
        ct.extra_validate(out, field)
    return out


def validate_checks(checks: Any, field: str = "meta.checks") -> list[dict]:
    """Validate a list of check specs (``meta.checks``); normalised copies."""
    if not isinstance(checks, list):
        raise DataError(f"must be a list of checks, got {checks!r}", field=field)
    return [validate_check(c, f"{field}[{i}]") for i, c in enumerate(checks)]


# --------------------------------------------------------------------------- running

def _resolve_reference(spec: dict, ct: CheckType, meta: dict, field: str) -> dict:
    pname = ct.reference_param
    if pname is None or spec.get(pname) is not None:
        return spec
    if "reference" not in meta or meta["reference"] is None:
        raise DataError(f"check {ct.name!r} needs {pname!r} or meta.reference",
                        field=f"{field}.{pname}")
    ref = meta["reference"]
    spec = dict(spec)
    if pname == "answer":
        if isinstance(ref, list):
            spec["answer"] = [str(r) for r in ref]
        else:
            spec["answer"] = str(ref)
    else:
        try:
            if isinstance(ref, bool):
                raise ValueError
            spec["value"] = float(str(ref).replace(",", "").strip())
        except ValueError:
            raise DataError(f"must be a number for check 'numeric', got {ref!r}",
                            field="meta.reference") from None
    return spec


def loose_variants(text: str) -> list[str]:
    """The responses IFEval's loose accuracy tries (lm-evaluation-harness / the IFEval
    reference code): the response, without its first line, without its last line,
    without both, and each of those with every ``*`` removed."""
    lines = text.split("\n")
    cut = [text, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
           "\n".join(lines[1:-1]).strip()]
    return [cut[0], cut[0].replace("*", ""), cut[1], cut[2], cut[3],
            cut[1].replace("*", ""), cut[2].replace("*", ""), cut[3].replace("*", "")]


def run_checks(text: Any, checks: list[dict] | None, prompt_text: Any = "",
               meta: dict | None = None, *, loose: bool = False) -> list[dict]:
    """Run every check on ``text``: ``[{"type": NAME, "passed": bool}, ...]`` in order.

    ``checks`` None means ``meta["checks"]``. ``prompt_text`` is used by
    ``repeat_prompt``; ``meta["reference"]`` is the fallback answer of ``exact`` and
    ``numeric``. Invalid specs raise DataError with ``field`` ``meta.checks[i]...``.
    ``loose``: IFEval's loose reading, a check passes when the response or any non-empty
    variant of `loose_variants` passes it (so loose >= strict, also for empty responses).
    """
    meta = meta or {}
    if checks is None:
        checks = meta.get("checks", [])
    specs = validate_checks(checks)
    text_s = as_text(text, "assistant")
    prompt_s = as_text(prompt_text, "user")
    results = []
    for i, spec in enumerate(specs):
        ct = CHECKS[spec["type"]]
        spec = _resolve_reference(spec, ct, meta, f"meta.checks[{i}]")
        if loose:
            variants = loose_variants(text_s)  # the response itself counts as in strict
            ok = ct.fn(text_s, spec, prompt_s) or any(
                v.strip() and ct.fn(v, spec, prompt_s) for v in variants[1:])
        else:
            ok = ct.fn(text_s, spec, prompt_s)
        results.append({"type": ct.name, "passed": bool(ok)})
    return results


def check_score(results: list[dict]) -> float | None:
    """Fraction of results that passed; None when there are no results."""
    if not results:
        return None
    return sum(1 for r in results if r["passed"]) / len(results)


def describe_check(spec: dict) -> str:
    """An English instruction sentence for a check, e.g. "Answer in at most 50 words."."""
    spec = validate_check(spec)
    return CHECKS[spec["type"]].instruction(spec)


def describe_checks(checks: list[dict]) -> str:
    """The instructions of several checks, joined by spaces."""
    return " ".join(describe_check(c) for c in checks)
