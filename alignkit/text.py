"""The one text layer: how prompts, completions and message lists become text and ids.

Every part of alignkit that turns a record into text goes through here: the sampler
(`generation`), the trainers (`policy`, `distill`), the scorers (rules, rm, pairwise,
judge, length), relabel and eval. So a record means the same thing everywhere.

The rules:

- **A completion's text** (`completion_text`): a string is itself. A message list is
  the contents of its assistant messages joined by a blank line ("\\n\\n") (tool
  messages carry no completion text); a user or system message has no place in a
  completion and is a DataError (a whole conversation is a prompt plus a completion,
  not a completion). A one-message completion
  `[{"role": "assistant", "content": T}]` is therefore exactly `T`, and a completion of
  two assistant messages `A`, `B` is `"A\\n\\nB"` in the sampler's log-probs, the
  trainers' tokens, the rules checks and the reward model's input alike.
- **A prompt's user text** (`prompt_text`): a string is itself; a message list gives
  its last user message (what checks such as "repeat the request" compare against).
- **A prompt as the model sees it** (`render_prompt`): through the tokenizer's chat
  template with the generation prompt opened (a string prompt is one user turn, with
  an optional system message); without a chat template a string prompt is used as is.
- **A prompt and completion as one conversation** (`render_conversation`, the reward
  model's input): the chat template over the prompt's messages plus one assistant
  turn holding `completion_text`; without a template, the prompt's text and the
  completion's text joined by a blank line.
- **Ids** (`encode_prompt`, `encode_completion`): the rendered prompt with the
  tokenizer's special prefix (BOS) once; the completion's text alone, without special
  tokens, plus EOS when the sample ended on its own.

Nothing here imports torch.
"""
from __future__ import annotations

from typing import Any, Union

from .errors import AlignkitError, DataError, UsageError

Message = dict
Text = Union[str, list]

__all__ = ["Text", "completion_text", "prompt_text", "as_messages", "as_completion",
           "transcript", "has_chat_template", "render_prompt", "render_conversation",
           "encode_prompt", "encode_completion", "encode_pair", "special_prefix", "encode"]

SEPARATOR = "\n\n"


def _contents(messages: list, role: str | None) -> list[str]:
    out = []
    for m in messages:
        if not isinstance(m, dict):
            raise DataError("a message must be an object with role and content")
        if role is None or m.get("role") == role:
            out.append(str(m.get("content") or ""))
    return out


def completion_text(value: Any) -> str:
    """A completion's text (see the module docstring for the multi-message rule)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError("a completion must be a string or a list of messages")
    for m in value:
        if not isinstance(m, dict):
            raise DataError("a message must be an object with role and content")
        if m.get("role") in ("user", "system"):
            raise DataError(f"a completion holds assistant messages only, got a "
                            f"{m.get('role')!r} message (put the conversation so far in the "
                            "prompt)")
    return SEPARATOR.join(_contents(value, "assistant"))


def prompt_text(prompt: Any) -> str:
    """A prompt's user text: the string, or the last user message ('' if none)."""
    if prompt is None:
        return ""
    if isinstance(prompt, str):
        return prompt
    users = _contents(prompt, "user")
    return users[-1] if users else ""


def as_messages(value: Any, role: str = "user") -> list[dict]:
    """A string as a one-message list with `role`; a message list copied."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return [dict(m) for m in value]


def as_completion(text: str, prompt: Any):
    """A completion in its prompt's format: a string for a string prompt, one assistant
    message for a conversational prompt (TRL's convention)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def transcript(value: Any) -> str:
    """A message list as `role: content` lines separated by blank lines (what a judge
    reads for a multi-turn prompt); a string as is."""
    if isinstance(value, str):
        return value
    return SEPARATOR.join(f"{m['role']}: {m['content']}" for m in value)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, prompt: Text, system: str | None = None, raw: bool = False) -> str:
    """The text the model continues.

    A string prompt goes through the tokenizer's chat template (with `system` as a
    system message, and the generation prompt added) when the tokenizer has one and
    `raw` is False; otherwise it is used as is. A message list always goes through the
    chat template (`system` is not added to it: it carries its own).
    """
    if isinstance(prompt, str):
        if raw or not has_chat_template(tokenizer):
            if system:
                raise UsageError("--system needs the chat template "
                                 + ("(drop --raw)" if raw else "(the tokenizer has none)"))
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
    else:
        if not has_chat_template(tokenizer):
            raise UsageError("message-list prompts need a tokenizer with a chat template")
        messages = prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_conversation(tokenizer, prompt: Any, completion: Any) -> str:
    """Prompt and completion as one text (the reward model's input)."""
    answer = completion_text(completion)
    if has_chat_template(tokenizer):
        messages = as_messages(prompt, "user") + [{"role": "assistant", "content": answer}]
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return f"{_prompt_plain(prompt)}{SEPARATOR}{answer}"


def render_prompt_only(tokenizer, prompt: Any) -> str:
    """The prompt in `render_conversation`'s format, with the assistant turn opened."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(as_messages(prompt, "user"), tokenize=False,
                                             add_generation_prompt=True)
    return _prompt_plain(prompt)


def _prompt_plain(prompt: Any) -> str:
    return prompt if isinstance(prompt, str) else SEPARATOR.join(_contents(prompt, None))


def encode(tokenizer, texts: list[str], max_length: int, *, padding_side: str = "right",
           truncation_side: str = "right"):
    """Tokenise a batch of rendered texts as torch tensors.

    Special tokens are added only when the tokenizer has no chat template: a rendered
    chat template already holds the ones it needs (no doubled BOS).
    """
    old = tokenizer.padding_side, tokenizer.truncation_side
    tokenizer.padding_side, tokenizer.truncation_side = padding_side, truncation_side
    try:
        return tokenizer(texts, padding=True, truncation=True, max_length=max_length,
                         return_tensors="pt", add_special_tokens=not has_chat_template(tokenizer))
    finally:
        tokenizer.padding_side, tokenizer.truncation_side = old


_PREFIX_CACHE: dict[int, list[int]] = {}


def special_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts in front of a text (a BOS for Llama-2-style
    tokenizers; nothing for ChatML ones)."""
    key = id(tokenizer)
    if key not in _PREFIX_CACHE:
        plain = tokenizer("a", add_special_tokens=False)["input_ids"]
        full = tokenizer("a")["input_ids"]
        k = next((i for i in range(len(full) - len(plain) + 1)
                  if full[i:i + len(plain)] == plain), 0)
        _PREFIX_CACHE[key] = list(full[:k])
    return _PREFIX_CACHE[key]


def encode_prompt(tokenizer, rendered_prompt: str) -> list[int]:
    """Token ids of a rendered prompt: the tokenizer's special prefix (BOS) unless the
    text already starts with it, then the text without other special tokens. Never
    empty (an empty prompt becomes the BOS or EOS token)."""
    ids = list(tokenizer(rendered_prompt, add_special_tokens=False)["input_ids"])
    pre = special_prefix(tokenizer)
    if pre and ids[:len(pre)] != pre:
        ids = pre + ids
    if not ids:
        fill = tokenizer.bos_token_id if tokenizer.bos_token_id is not None \
            else tokenizer.eos_token_id
        if fill is None:
            raise AlignkitError("empty prompt and the tokenizer has no BOS/EOS token")
        ids = [fill]
    return ids


def encode_completion(tokenizer, completion: Any, add_eos: bool = True) -> list[int]:
    """A completion's ids: its text without special tokens, then EOS when `add_eos`
    (False for a sample cut at max_new_tokens)."""
    ids = list(tokenizer(completion_text(completion), add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def encode_pair(tokenizer, rendered_prompt: str, completion: Any,
                add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the tokenization every log-prob is computed on."""
    return encode_prompt(tokenizer, rendered_prompt), encode_completion(tokenizer, completion,
                                                                         add_eos)
