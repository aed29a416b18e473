"""Record shapes (DESIGN.md "Records"), as typed definitions plus one validator.

Each record kind is written down twice, on purpose in one place: as a `TypedDict` (for
readers of the code and type checkers) and as a JSON Schema (for `alignkit schema NAME`
and for validation). The validator understands the small JSON Schema subset used here,
so there is no third-party dependency and every error names the field that is wrong.

Unknown keys are always allowed and preserved: records flow through every command.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, NotRequired, TypedDict, Union

from .errors import DataError
from .formats import normalize
from .text import completion_text as text_of, prompt_text  # noqa: F401  (re-exported)


class Message(TypedDict):
    role: Literal["system", "user", "assistant"]
    content: str


Text = Union[str, list[Message]]


class PromptRecord(TypedDict):
    id: str
    prompt: Text
    meta: NotRequired[dict[str, Any]]


class CompletionRecord(TypedDict):
    """prompt+completion (an SFT target or a given answer)."""
    id: NotRequired[str]
    prompt: Text
    completion: Text
    meta: NotRequired[dict[str, Any]]
    finished: NotRequired[bool]


class Completion(TypedDict):
    text: Text
    logp: NotRequired[float]
    n_tokens: NotRequired[int]
    source: NotRequired[str]
    score: NotRequired[float]
    scores: NotRequired[dict[str, float]]


class SamplesRecord(TypedDict):
    id: str
    prompt: Text
    completions: list[Completion]
    meta: NotRequired[dict[str, Any]]
    gen: NotRequired[dict[str, Any]]


class PairRecord(TypedDict):
    id: str
    prompt: Text
    chosen: Text
    rejected: Text
    score_chosen: NotRequired[float]
    score_rejected: NotRequired[float]
    margin: NotRequired[float]
    ref_logp_chosen: NotRequired[float]
    ref_logp_rejected: NotRequired[float]
    finished_chosen: NotRequired[bool]    # false: a sample cut by max_new_tokens (no eos)
    finished_rejected: NotRequired[bool]
    p_win: NotRequired[Any]
    meta: NotRequired[dict[str, Any]]


class UnpairedRecord(TypedDict):
    id: str
    prompt: Text
    completion: Text
    label: bool
    finished: NotRequired[bool]  # false: a sample cut by max_new_tokens (no eos)


# --- JSON Schemas -------------------------------------------------------------------

_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant", "tool"]},
        "content": {"type": "string"},
    },
}
_TEXT = {"oneOf": [{"type": "string"}, {"type": "array", "items": _MESSAGE, "minItems": 1}],
         "description": "a string, or a chat message list (TRL conversational format)"}
_NUM = {"type": "number"}
_COMPLETION = {
    "type": "object",
    "required": ["text"],
    "properties": {
        "text": _TEXT,
        "logp": _NUM,
        "n_tokens": {"type": "integer", "minimum": 0},
        "finished": {"type": "boolean"},
        "source": {"type": "string"},
        "score": _NUM,
        "scores": {"type": "object", "additionalProperties": _NUM},
    },
}
_META = {"type": "object"}
_ID = {"type": "string", "minLength": 1}

SCHEMAS: dict[str, dict] = {
    "prompt": {
        "title": "prompt",
        "type": "object",
        "required": ["prompt"],
        "properties": {"id": _ID, "prompt": _TEXT, "meta": _META},
    },
    "samples": {
        "title": "samples",
        "type": "object",
        "required": ["id", "prompt", "completions"],
        "properties": {
            "id": _ID, "prompt": _TEXT, "meta": _META, "gen": {"type": "object"},
            "completions": {"type": "array", "items": _COMPLETION, "minItems": 1},
        },
    },
    "pair": {
        "title": "pair",
        "type": "object",
        "required": ["id", "prompt", "chosen", "rejected"],
        "properties": {
            "id": _ID, "prompt": _TEXT, "chosen": _TEXT, "rejected": _TEXT,
            "score_chosen": _NUM, "score_rejected": _NUM, "margin": _NUM,
            "ref_logp_chosen": _NUM, "ref_logp_rejected": _NUM,
            "finished_chosen": {"type": "boolean"}, "finished_rejected": {"type": "boolean"},
            "p_win": {"oneOf": [_NUM, {"type": "object", "additionalProperties": _NUM}]},
            "meta": _META,
        },
    },
    "unpaired": {
        "title": "unpaired",
        "type": "object",
        "required": ["id", "prompt", "completion", "label"],
        "properties": {"id": _ID, "prompt": _TEXT, "completion": _TEXT,
                       "label": {"type": "boolean"}, "finished": {"type": "boolean"}},
    },
    # prompt+completion: an SFT target, a given answer for distill, or a reference
    # answer (id optional, as for prompt records)
    "completion": {
        "title": "completion",
        "type": "object",
        "required": ["prompt", "completion"],
        "properties": {"id": _ID, "prompt": _TEXT, "completion": _TEXT, "meta": _META,
                       "finished": {"type": "boolean"}},
    },
}
# A ranking is a samples record whose completions are sorted best first, all scored.
SCHEMAS["ranking"] = {
    **SCHEMAS["samples"],
    "title": "ranking",
    "properties": {
        **SCHEMAS["samples"]["properties"],
        "completions": {"type": "array", "minItems": 2,
                        "items": {**_COMPLETION, "required": ["text", "score"]}},
    },
}
KINDS = tuple(SCHEMAS)
# Record kinds whose ids are unique within a file: one record per prompt. Pairs,
# rankings, unpaired and prompt+completion records may share an id (several per prompt;
# an id derived from the prompt repeats for every pair of that prompt).
UNIQUE_ID_KINDS = frozenset({"prompt", "samples"})

_TYPES = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
}


def _type_name(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean",
            type(None): "null"}.get(type(v), "number")


def _check(value: Any, schema: dict, field: str) -> None:
    if "oneOf" in schema:
        errors = []
        for option in schema["oneOf"]:
            try:
                _check(value, option, field)
                return
            except DataError as e:
                errors.append(e)
        # Report the most specific error: the option whose type matched.
        for option, err in zip(schema["oneOf"], errors):
            if _TYPES[option["type"]](value):
                raise err
        want = " or ".join(o["type"] for o in schema["oneOf"])
        raise DataError(f"expected {want}, got {_type_name(value)}", field=field)
    t = schema.get("type")
    if t and not _TYPES[t](value):
        raise DataError(f"expected {t}, got {_type_name(value)}", field=field)
    if t == "number" and not math.isfinite(value):
        raise DataError("number must be finite", field=field)
    if "enum" in schema and value not in schema["enum"]:
        raise DataError(f"must be one of {schema['enum']}, got {value!r}", field=field)
    if t == "string" and len(value) < schema.get("minLength", 0):
        raise DataError("must not be empty", field=field)
    if t == "integer" and value < schema.get("minimum", value):
        raise DataError(f"must be >= {schema['minimum']}", field=field)
    if t == "array":
        if len(value) < schema.get("minItems", 0):
            raise DataError(f"needs at least {schema['minItems']} item(s)", field=field)
        for i, item in enumerate(value):
            _check(item, schema["items"], f"{field}[{i}]")
    if t == "object":
        for key in schema.get("required", ()):
            if key not in value:
                sub = f"{field}.{key}" if field else key
                raise DataError("missing required field", field=sub)
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        required = set(schema.get("required", ()))
        for key in [k for k, v in value.items() if v is None and k in props and k not in required]:
            del value[key]  # an optional field set to null means absent (datasets writes nulls)
        for key, v in value.items():
            sub = f"{field}.{key}" if field else key
            if key in props:
                _check(v, props[key], sub)
            elif extra is not None:
                _check(v, extra, sub)


def validate(record: Any, kind: str) -> dict:
    """Check `record` against the schema of `kind`; raise DataError naming the field.

    Prompt records without an `id` get one derived from the prompt (stable on reruns).
    A `meta.checks` list is validated too (unknown check types, bad parameters), so a
    bad check fails where the file is read, not after sampling or training.
    Returns the record (the same dict).
    """
    if kind not in SCHEMAS:
        raise ValueError(f"unknown record kind {kind!r}")
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {_type_name(record)}")
    normalize(record)  # TRL / datasets formats (alignkit.formats)
    if record.get("id") is None and "prompt" in record:
        record.pop("id", None)
        record["id"] = derive_id(record["prompt"])
    _check(record, SCHEMAS[kind], "")
    meta = record.get("meta")
    if isinstance(meta, dict) and meta.get("checks") not in (None, []):
        from .checks import validate_checks  # every reader refuses a bad check up front
        validate_checks(meta["checks"])
    return record


def detect_kind(record: dict) -> str:
    """A record's kind from its keys: the one kind detector (pair > samples > unpaired >
    completion (prompt+completion) > prompt)."""
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if "chosen" in record or "rejected" in record:
        return "pair"
    if "completions" in record:
        return "samples"
    if "completion" in record or ("messages" in record and "prompt" not in record):
        return "unpaired" if "label" in record else "completion"
    return "prompt"


def derive_id(prompt: Any) -> str:
    """A stable id from the prompt's canonical JSON: 'p-' + 16 hex of its sha256."""
    canon = json.dumps(prompt, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return "p-" + hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


def check_text(value: Any, field: str) -> None:
    """Validate a prompt/completion value (a string or a non-empty message list)."""
    _check(value, _TEXT, field)


def schema(kind: str) -> dict:
    """The JSON Schema (draft 2020-12) of a record kind."""
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **SCHEMAS[kind]}
