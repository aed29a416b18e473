"""Layout checks: how the answer starts and ends, JSON, bullets, numbered sections,
placeholders, a title, a postscript, highlights, repeating the request, two responses."""
from __future__ import annotations

import json
import re

from .base import N, REL_EXACT, REL_LEAST, Param, check_type, compare, plural, quoted_list
from .text import norm

_BULLET_RE = re.compile(r"^[ \t]*[*-][ \t]+\S", re.M)


_PLACEHOLDER_RE = re.compile(r"\[[^\[\]\n]+\]")


_TITLE_RE = re.compile(r"<<([^\n]+?)>>")


_HIGHLIGHT_RE = re.compile(r"(?<!\*)\*(?![*\s])[^\n*]*?[^\s*]\*(?!\*)")


_FENCE_RE = re.compile(r"```[ \t]*(?:json|JSON)?[ \t]*\n?(.*?)```", re.S)


_TWO_RESPONSES_SPLIT_RE = re.compile(r"\*{6,}")


def _starts_with(text, spec, prompt_text):
    return norm(text).startswith(norm(spec["phrase"]))


def _ends_with(text, spec, prompt_text):
    return norm(text).endswith(norm(spec["phrase"]))


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
    return compare(len(_BULLET_RE.findall(text)), spec["relation"], spec["n"])


def _section_header_re(splitter: str) -> re.Pattern:
    parts = [re.escape(p) for p in splitter.split()]
    return re.compile(r"^[ \t#*_>]*" + r"\s+".join(parts) + r"[ \t]*\d+\b", re.I | re.M)


def _numbered_sections(text, spec, prompt_text):
    count = len(_section_header_re(spec["splitter"]).findall(text))
    return compare(count, spec["relation"], spec["n"])


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
    return bool(a) and bool(b) and norm(a) != norm(b)


def _i_json(spec):
    keys = spec.get("keys") or []
    s = "Format your entire answer as valid JSON"
    if keys:
        noun = "key" if len(keys) == 1 else "keys"
        s += f" (an object with the {noun} {quoted_list(keys, 'and')})"
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


TYPES = [
    check_type("starts_with", [Param("phrase", "str")], _starts_with,
        "starts with a phrase (leading whitespace and case ignored)",
        lambda s: f'Begin your answer with the exact phrase "{s["phrase"].strip()}".'),
    check_type("ends_with", [Param("phrase", "str")], _ends_with,
        "ends with a phrase (trailing whitespace and case ignored)",
        lambda s: (f'End your answer with the exact phrase "{s["phrase"].strip()}"; no other '
                   f"words should follow it.")),
    check_type("valid_json", [Param("keys", "list[str]", required=False, default=[])], _valid_json,
        "the text (or a ```json fenced block) is valid JSON, with the given top-level keys",
        _i_json),
    check_type("bullet_count", [N, REL_EXACT], _bullet_count,
        'lines starting with "* " or "- " number at least / at most / exactly n', _i_bullets),
    check_type("numbered_sections",
        [N, Param("splitter", "str", required=False, default="Section"), REL_LEAST],
        _numbered_sections,
        'header lines "Section 1", "SECTION 2", ... number at least / at most / exactly n',
        _i_sections),
    check_type("placeholders", [N], _placeholders, "at least n [placeholders] in square brackets",
        lambda s: (f"Include at least {plural(s['n'], 'placeholder')} in square brackets, "
                   f"such as [address].")),
    check_type("title", [], _title, "a title wrapped in double angular brackets, <<title>>",
        lambda s: "Give your answer a title wrapped in double angular brackets, such as "
                  "<<my title>>."),
    check_type("postscript", [Param("marker", "str", required=False, default="P.S.")], _postscript,
        'a line starting with a postscript marker, "P.S." by default',
        lambda s: (f'At the end of your answer, add a postscript starting with '
                   f'"{s["marker"].strip()}".')),
    check_type("highlighted_sections", [N], _highlighted_sections,
        "at least n *highlighted* spans (single asterisks, not **bold**)",
        lambda s: (f"Highlight at least {plural(s['n'], 'part')} of your answer with single "
                   f"asterisks, such as *highlighted part*.")),
    check_type("repeat_prompt", [Param("prompt", "str", required=False, default=None)], _repeat_prompt,
        "starts with the prompt (or the given `prompt`) repeated verbatim (case ignored)",
        _i_repeat),
    check_type("two_responses", [], _two_responses,
        "exactly two different non-empty responses separated by ******",
        lambda s: "Give two different responses, separated by six asterisks (******) and "
                  "nothing else between them."),
]
