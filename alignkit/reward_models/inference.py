"""Reward-model inference: the input format, batched rewards and the loader of every
train-rm folder. Imports neither the scorers nor the trainers (the `rm:DIR` scorer and
the trainers both import this), and nothing heavy at module level.

Input format (`rm_inputs`, one implementation for training and scoring): the prompt
and the completion as one conversation (`alignkit.text.render_conversation`): through
the tokenizer's chat template when it has one, else the prompt's text and the
completion's text joined by a blank line. Special tokens are added by the tokenizer
only when there is no chat template (a rendered template already holds them). The
reward is the model's logit 0 at the last non-padding token (transformers' pooling).

Folders: the method that wrote a folder is `"rm_method"` in its alignkit.json (none:
a plain folder, as `bt` writes). A method whose entry in `RM_METHODS` is not `plain`
(pal, maxmin) has its own layout and its module's `load_folder` reads it;
`load_reward_model` picks the loader from the entry.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..text import as_messages, encode, has_chat_template, render_conversation

METHOD_KEY = "rm_method"  # alignkit.json key naming the folder layout

__all__ = ["METHOD_KEY", "rm_inputs", "render", "render_prompts", "token_ids", "encode_batch",
           "rm_rewards", "seq_cls_rewards", "folder_info", "folder_method", "rm_method",
           "needs_loader", "SeqClsRewardModel", "load_reward_model"]


# --- rendering and tokenising -----------------------------------------------------------

def rm_inputs(tokenizer, prompt: Any, completion: Any) -> str:
    """The reward model's input text for (prompt, completion): `alignkit.text.render_conversation`."""
    return render_conversation(tokenizer, prompt, completion)


def render(tokenizer, prompts: Sequence[Any], completions: Sequence[Any]) -> list[str]:
    return [rm_inputs(tokenizer, p, c) for p, c in zip(prompts, completions)]


def render_prompts(tokenizer, prompts: Sequence[Any]) -> list[str]:
    """The prompt alone, in the same format (chat template with the assistant turn
    opened, or the plain prompt text)."""
    if has_chat_template(tokenizer):
        return [tokenizer.apply_chat_template(as_messages(p, "user"), tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    return [p if isinstance(p, str) else "\n\n".join(m["content"] for m in p) for p in prompts]


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]


def encode_batch(tokenizer, texts: list[str], max_length: int):
    """A batch of rendered texts as right-padded, right-truncated tensors (`text.encode`)."""
    return encode(tokenizer, texts, max_length)


# --- rewards ------------------------------------------------------------------------------

def rm_rewards(model, tokenizer, texts: Sequence[str], *, batch_size: int = 8,
               max_length: int = 1024) -> list[float]:
    """Scalar rewards of rendered texts (batched; longest first to limit padding)."""
    import torch
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    out: list[float] = [0.0] * len(texts)
    device = next(model.parameters()).device
    size = max(1, batch_size)
    with torch.inference_mode():
        for s in range(0, len(order), size):
            idx = order[s:s + size]
            enc = encode_batch(tokenizer, [texts[i] for i in idx], max_length).to(device)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            for i, v in zip(idx, logits[:, 0].float().tolist()):
                out[i] = float(v)
    return out


def seq_cls_rewards(model, tokenizer, prompts, completions, *, batch_size: int = 16,
                    max_length: int = 1024) -> list[float]:
    """Rewards of a sequence-classification model, exactly as `rm:DIR` scores them."""
    model.eval()
    return rm_rewards(model, tokenizer, render(tokenizer, prompts, completions),
                      batch_size=batch_size, max_length=max_length)


# --- folders ------------------------------------------------------------------------------

def folder_info(folder: str | Path) -> dict:
    """alignkit.json of a folder ({} when absent)."""
    p = Path(folder) / "alignkit.json"
    return json.loads(p.read_text()) if p.exists() else {}


def folder_method(spec: str | Path) -> str | None:
    """The `rm_method` a folder records, or None (no folder, no or unreadable alignkit.json:
    e.g. an embedded model name or a plain transformers folder)."""
    try:
        return folder_info(spec).get(METHOD_KEY) if Path(spec).is_dir() else None
    except (OSError, ValueError, AttributeError):
        return None


def rm_method(folder: str | Path) -> str:
    """The method that wrote a reward-model folder ('bt' for a plain folder)."""
    return folder_info(folder).get(METHOD_KEY) or "bt"


def _entry(method: str | None):
    from . import RM_METHODS  # the registry (data only); imported on use: no import cycle
    return RM_METHODS.get(method) if method is not None and method in RM_METHODS else None


def needs_loader(spec: str | Path) -> bool:
    """Whether a folder has a method's own layout (not a plain sequence-classification
    model): it is then read with `load_reward_model`."""
    entry = _entry(folder_method(spec))
    return entry is not None and not entry.plain


class SeqClsRewardModel:
    """A plain sequence-classification reward model (bt, crm, or any rm folder),
    scored exactly as the `rm:DIR` scorer does; `users` is accepted and ignored."""

    def __init__(self, model, tokenizer, max_length: int = 1024):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        return seq_cls_rewards(self.model, self.tokenizer, prompts, completions,
                               max_length=self.max_length)


def load_reward_model(folder: str | Path, user: str | None = None, aggregate: str | None = None,
                      *, dtype: str = "auto", device: str | None = None, max_length: int = 1024):
    """Load any train-rm folder; the result has `.score(prompts, completions, users=None)
    -> list[float]`.

    - plain / `bt` / `crm`: the sequence-classification model (user and aggregate unused).
    - a method with its own layout: its module's `load_folder` (`pal`: the user's mixture
      weights, `user` or per item `users[i]`, else the mean of all known users' weights;
      `maxmin`: `aggregate` min | mean | user over the K models, default min).
    """
    entry = _entry(rm_method(folder))
    if entry is not None and not entry.plain:
        return entry.load().load_folder(folder, user=user, aggregate=aggregate, dtype=dtype,
                                        device=device, max_length=max_length)
    from ..models import load_seq_cls
    model, tok = load_seq_cls(folder, dtype)
    if device:
        model.to(device)
    return SeqClsRewardModel(model, tok, max_length)
