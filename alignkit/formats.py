"""The Hugging Face / TRL record formats alignkit reads, turned into its own shapes.

`normalize(record)` runs inside `records.validate`, so every reader accepts them:

- **null means absent**: an optional field set to null (what a `datasets` round trip
  writes for a missing value) is dropped; a required one stays an error.
- **TRL implicit-prompt preferences** (`chosen` and `rejected` only, each a whole
  conversation or text): the prompt is their longest shared prefix, as TRL's
  `extract_prompt` takes it (whole messages for conversations; for strings the shared
  characters, the space before the answers left to them); chosen and rejected keep the rest.
- **TRL SFT records** `{"messages": [...]}`: a prompt+completion record split at the
  last assistant turn (the completion is that turn, the prompt everything before).
- **Tool messages** (`role: "tool"`, assistant `tool_calls` with no content) are kept;
  the chat template renders them; they carry no completion text.
- **Content parts** `[{"type": "text", "text": ...}, ...]`: joined into the message's
  text. Other parts (images, audio) are refused: alignkit trains text models.
- **TRL's reference log-prob names** `ref_chosen_logps` / `ref_rejected_logps` are read
  as `ref_logp_chosen` / `ref_logp_rejected` (alignkit writes both: `to_trl_names`).
"""
from __future__ import annotations

from typing import Any

from .errors import DataError

__all__ = ["normalize", "to_trl_names", "split_implicit_prompt"]

TRL_REF_NAMES = {"ref_chosen_logps": "ref_logp_chosen", "ref_rejected_logps": "ref_logp_rejected"}
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def normalize(record: dict) -> dict:
    """Bring an ecosystem-format record into alignkit's shape, in place (see above)."""
    for trl, ours in TRL_REF_NAMES.items():
        if trl in record:
            value = record.pop(trl)
            record.setdefault(ours, value)
    if "messages" in record and "prompt" not in record and "completion" not in record:
        _split_messages(record)
    if "prompt" not in record and "chosen" in record and "rejected" in record:
        split_implicit_prompt(record)
    for key in _TEXT_FIELDS:
        if isinstance(record.get(key), list):
            _messages(record[key], key)
    comps = record.get("completions")
    if isinstance(comps, list):
        for i, c in enumerate(comps):
            if isinstance(c, dict) and isinstance(c.get("text"), list):
                _messages(c["text"], f"completions[{i}].text")
    return record


def to_trl_names(record: dict) -> dict:
    """The record with its reference log-probs also under TRL's names (a copy if any)."""
    if not any(ours in record for ours in TRL_REF_NAMES.values()):
        return record
    out = dict(record)
    for trl, ours in TRL_REF_NAMES.items():
        if ours in record:
            out[trl] = record[ours]
    return out


def _split_messages(record: dict) -> None:
    msgs = record["messages"]
    if not isinstance(msgs, list) or not msgs:
        raise DataError("must be a non-empty list of messages", field="messages")
    last = max((i for i, m in enumerate(msgs) if isinstance(m, dict)
                and m.get("role") == "assistant"), default=None)
    if last is None:
        raise DataError("has no assistant message to train on", field="messages")
    if last == 0:
        raise DataError("needs at least one message before the last assistant turn",
                        field="messages")
    record.pop("messages")
    record["prompt"], record["completion"] = msgs[:last], msgs[last:]


def split_implicit_prompt(record: dict) -> None:
    """TRL's implicit prompt: the longest shared prefix of chosen and rejected."""
    chosen, rejected = record["chosen"], record["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if i == 0:
            raise DataError("no shared prompt: chosen and rejected differ from the first "
                            "message (give a prompt field)", field="prompt")
        record["prompt"], record["chosen"], record["rejected"] = chosen[:i], chosen[i:], rejected[i:]
        return
    if isinstance(chosen, str) and isinstance(rejected, str):
        i = 0
        while i < min(len(chosen), len(rejected)) and chosen[i] == rejected[i]:
            i += 1
        if 0 < i < min(len(chosen), len(rejected)) and chosen[i - 1] == " ":
            i -= 1  # the space before the answers belongs to them (TRL's rule)
        if i == 0:
            raise DataError("no shared prompt: chosen and rejected differ from the first "
                            "character (give a prompt field)", field="prompt")
        record["prompt"], record["chosen"], record["rejected"] = chosen[:i], chosen[i:], rejected[i:]
        return
    raise DataError("missing required field (or chosen and rejected of one type for an "
                    "implicit prompt)", field="prompt")


def _messages(msgs: list, field: str) -> None:
    for j, m in enumerate(msgs):
        if not isinstance(m, dict):
            continue  # the schema reports it
        where = f"{field}[{j}].content"
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for k, part in enumerate(content):
                if not isinstance(part, dict) or "type" not in part:
                    raise DataError("a content part must be an object with a type",
                                    field=f"{where}[{k}]")
                if part["type"] != "text":
                    raise DataError(f"content part of type {part['type']!r} is not supported: "
                                    "alignkit handles text only", field=f"{where}[{k}]")
                if not isinstance(part.get("text"), str):
                    raise DataError("expected string", field=f"{where}[{k}].text")
                texts.append(part["text"])
            m["content"] = "".join(texts)
        elif content is None and m.get("tool_calls") and m.get("role") == "assistant":
            m["content"] = ""  # a tool call turn: no text of its own
