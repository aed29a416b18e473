"""Step prompts for the online trainers: PROPA's text-only core, step-level GRPO
(ALGORITHMS.md Part D §2, "Text-only core for alignkit").

A prompt record whose `meta.steps_prefix` is a list of strings (written by `relabel
--strategy step-prompts`, alignkit/relabel/steps.py) is a *state* s_k: the question and
the first k steps of an answer. For every online method that samples with alignkit's
rollout (`OnlineMixin`: grpo, rloo, earl, gtpo, p3o, online-ipo, ipo-md):

- Rendering (`prompt_suffix`, used by `online.prompt_rows`): the chat-templated prompt
  (assistant turn opened) followed by the prefix steps joined by the separator, plus
  the separator, so the model continues the answer with the next step. An empty prefix
  (k = 0) renders as the plain prompt. A record without `meta.steps_prefix` is unchanged.
- One step per completion (`cut_rows`, called from `OnlineMixin._ak_generate`):
  alignkit's sampler has no stop strings, so generation runs to EOS or --max-new-tokens
  and is cut afterwards at the first separator, as vLLM's stop strings do: the token ids
  keep the tokens up to and including the one that completes the separator (the policy
  learns to end its step, as it learns to emit EOS), the logged text is the text before
  the separator, and the row is marked `finished`. Its `logp` (and a separate
  reference's `logp_ref`) are recomputed by teacher forcing on the kept tokens, under
  the policy. A completion without the separator (it ended on EOS, a final step, or was
  cut at --max-new-tokens) is kept whole. Simplification: generating past the
  separator costs compute; keep --max-new-tokens small (PROPA: 128).
- The separator: train-policy's `--step-separator` when given, else the record's
  `meta.step_separator` (relabel writes it), else a blank line "\\n\\n".

The reward of a sampled step a is the scorers' value of s_k∘a (`scorer_view`, used by
`online.reward_fn`): every scorer sees the text so far, prefix steps + separator + the
step (the completion up to its separator; an empty step is an empty completion), with
the record's meta less `steps_prefix`. With `--reward prm-step:DIR` (scorers/prm.py)
that is P(correct) of the last step, the sampled one (the PRM folder's separator
should be the same), so GRPO's group normalisation over the G siblings of one state
gives PROPA's step advantage A_i = (Q_i − mean)/std. `rules`, `code`, ... see the
partial answer too: the verifier only makes sense on final steps.
"""
from __future__ import annotations

from typing import Any

from ..errors import DataError

DEFAULT_SEPARATOR = "\n\n"
PREFIX_KEY = "steps_prefix"


def steps_prefix(meta: Any) -> list[str] | None:
    """`meta.steps_prefix` when present (None when absent); not a list of strings is a
    DataError on field meta.steps_prefix."""
    if not isinstance(meta, dict) or PREFIX_KEY not in meta:
        return None
    value = meta[PREFIX_KEY]
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise DataError("must be a list of strings (the answer's first steps)",
                        field=f"meta.{PREFIX_KEY}")
    return value


def separator_of(rec: dict, flag: str | None = None) -> str:
    """The step separator of a step-prompt record: --step-separator (escapes decoded),
    else meta.step_separator, else a blank line."""
    if flag is not None:
        from ..reward_models.prm import decode_separator
        return decode_separator(flag)
    sep = (rec.get("meta") or {}).get("step_separator")
    if sep is None:
        return DEFAULT_SEPARATOR
    if not isinstance(sep, str) or not sep:
        raise DataError("must be a non-empty string", field="meta.step_separator")
    return sep


def prefix_text(prefix: list[str], sep: str) -> str:
    """What follows the rendered prompt: the steps joined by `sep`, plus `sep` ('' for
    no step)."""
    return sep.join(prefix) + sep if prefix else ""


def prompt_suffix(data, i: int, flag: str | None = None) -> tuple[str, str | None]:
    """(text appended to record i's rendered prompt, its separator or None when the
    record is not a step prompt). Errors are located at the record's file:line."""
    rec = data.records[i]
    try:
        prefix = steps_prefix(rec.get("meta"))
        if prefix is None:
            return "", None
        sep = separator_of(rec, flag)
    except DataError as e:
        path = getattr(data, "path", None)
        lines = getattr(data, "lines", None)
        raise e.at(path if path != "-" else "<stdin>",
                   lines[i] if lines else None) from None
    return prefix_text(prefix, sep), sep


def cut_ids(tokenizer, ids: list[int], sep: str) -> tuple[list[int], str] | None:
    """(kept ids, text before the separator) when the decoded completion contains `sep`:
    the ids up to and including the token that completes its first occurrence; None
    when it does not occur."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    pos = text.find(sep)
    if pos < 0:
        return None
    end = pos + len(sep)
    for t in range(1, len(ids) + 1):
        if len(tokenizer.decode(ids[:t], skip_special_tokens=True)) >= end:
            return ids[:t], text[:pos]
    return list(ids), text[:pos]  # pragma: no cover (the full decode reaches `end`)


def cut_rows(rows: list[dict], texts: list[str], stops: dict[str, str], tokenizer,
             prompt_ids: list[list[int]], model, ref=None) -> int:
    """Cut, in place, each row whose rendered prompt `texts[i]` is a step prompt
    (`stops`: rendered prompt -> separator) at its first separator; returns how many
    were cut. `logp` (and `logp_ref` when the row has one and `ref` is given) are
    recomputed on the kept tokens."""
    from ..generation import token_logps
    cut: list[int] = []
    for i, row in enumerate(rows):
        sep = stops.get(texts[i])
        if sep is None:
            continue
        got = cut_ids(tokenizer, row["token_ids"], sep)
        if got is None:
            continue
        row["token_ids"], row["text"] = got
        row["n_tokens"], row["finished"] = len(got[0]), True
        cut.append(i)
    if not cut:
        return 0
    pad = tokenizer.pad_token_id or 0
    pairs = [(prompt_ids[i], rows[i]["token_ids"]) for i in cut]
    for i, lp in zip(cut, token_logps(model, pairs, batch_size=len(pairs), pad_id=pad)):
        rows[i]["logp"] = float(sum(lp))
    with_ref = [i for i in cut if "logp_ref" in rows[i]]
    if ref is not None and with_ref:
        per = token_logps(ref, [(prompt_ids[i], rows[i]["token_ids"]) for i in with_ref],
                          batch_size=len(with_ref), pad_id=pad)
        for i, lp in zip(with_ref, per):
            rows[i]["logp_ref"] = float(sum(lp))
    return len(cut)


def scorer_view(rec: dict, text: str, flag: str | None = None) -> tuple[str, dict]:
    """(completion text, meta) the reward scorers see for one sampled completion of
    record `rec`: unchanged for a record without `meta.steps_prefix`; for a step prompt
    the text so far, prefix steps + separator + the step (the completion up to its first
    separator; a whitespace-only step is an empty completion), with `steps_prefix` left
    out of the meta (its steps are in the text now; `prm-step` then scores the last)."""
    meta = rec.get("meta") or {}
    prefix = steps_prefix(meta)
    if prefix is None:
        return text, meta
    sep = separator_of(rec, flag)
    step = text.split(sep, 1)[0]
    rest = {k: v for k, v in meta.items() if k != PREFIX_KEY}
    return (prefix_text(prefix, sep) + step if step.strip() else ""), rest


def stop_map(data, rows: list[dict], flag: str | None = None) -> dict[str, str]:
    """Rendered prompt -> separator, for the dataset rows ({prompt, row}) of step prompts."""
    out: dict[str, str] = {}
    for r in rows:
        sep = prompt_suffix(data, r["row"], flag)[1]
        if sep is not None:
            out[r["prompt"]] = sep
    return out
