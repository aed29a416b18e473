"""Records -> training rows for the policy trainers.

Two routes:
- Methods trained by TRL's own tokenization (sft, kto, simpo, orpo) get TRL's
  conversational rows (`trl_rows`): the prompt as a message list (a string prompt
  becomes one user turn, so it goes through the chat template, as in gen-pairs) and the
  completion as one assistant message.
- The DPO family and the listwise methods (dpo, sppo, copg, pro, grao) are tokenized
  here, once (`Tokenization`), so that the trainer, the reference pass, the reference
  cache and reference log-probs carried by records all see the same tokens.

The tokenization contract (the same as gen-pairs' `logp`): the prompt is rendered with
the tokenizer's chat template and `add_generation_prompt=True` (gen-pairs'
`render_prompt` + `encode_prompt`, so a BOS is added where the tokenizer wants one); the
completion is its text tokenized without special tokens, followed by the eos token
(`encode_pair`), except for a sample that gen-pairs cut at `max_new_tokens`
(`finished_chosen` / `finished_rejected` / `finished` false, or a ranking completion's
`finished` false): it gets no eos, as in its `logp`, and training does not teach the
policy to stop where the sampler was cut off. A completion's log-probability is the sum
over those completion tokens of log π(token | chat-templated prompt, earlier completion
tokens). Sequences longer than `--max-length` keep their start (the completion is cut; a
record whose prompt alone fills `--max-length` is dropped with a warning), and a
completion cut that way never reuses a record-provided reference log-prob. Tokenizers
without a chat template take string prompts as plain text. A record's `logp` cannot
match when the sampled token ids are not the tokenizer's own encoding of the decoded
text (the trainer checks a few records against the reference model and drops them all
when they disagree); pass `--no-record-ref` when in doubt.

The SFT/KTO/SimPO/ORPO route tokenizes with TRL, which always appends eos.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .. import console
from ..errors import DataError, UsageError
from ..text import as_messages, completion_text  # noqa: F401  (the text layer)
from ..records import detect_kind
from ..recordset import Records, load as load_records

# The data kinds a method declares; the record kind each is validated as.
DATA_KINDS = {
    "pairs": "pair",
    "samples": "samples",
    "ranking": "ranking",
    "unpaired": "unpaired",
    "sft": None,          # prompt+completion, the chosen side of pairs, or unpaired with label true
    "prompts": "prompt",  # online methods
}
TOKENIZATION_VERSION = 2


Data = Records  # validated records of one input (alignkit.recordset)

# The record kinds an "sft" method trains from (the chosen side of pairs, the best
# scored completion of samples, unpaired records with label true, prompt+completion).
SFT_KINDS = ("pair", "samples", "unpaired", "completion")


def load(path: str, data_kind: str) -> Data:
    """Read and validate every record of `path` for a method of `data_kind`."""
    if data_kind not in DATA_KINDS:
        raise ValueError(f"unknown data kind {data_kind!r}")
    kinds = DATA_KINDS[data_kind] or SFT_KINDS
    data = load_records(path, kinds, one_kind=False)
    data.kind = data_kind
    return data


# --- text helpers -------------------------------------------------------------------------

def _text(data: Data, i: int, value: Any, field: str) -> str:
    try:
        return completion_text(value)
    except DataError as e:
        raise data.error(i, field, e.problem) from None


# --- tokenization (the DPO family and the listwise methods) -------------------------------

class Tokenization:
    """The one tokenization of prompts and completions (see the module docstring)."""

    def __init__(self, tokenizer, max_length: int):
        if tokenizer.eos_token_id is None:
            raise UsageError("the tokenizer has no eos token")
        self.tok = tokenizer
        self.max_length = max_length
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        self._prompts: dict[str, list[int]] = {}

    def prompt(self, prompt: Any) -> list[int]:
        """The prompt's ids: gen-pairs' `render_prompt` + `encode_prompt`."""
        from ..generation import encode_prompt, render_prompt
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in self._prompts:
            self._prompts[key] = encode_prompt(self.tok, render_prompt(self.tok, prompt))
        return self._prompts[key]

    def completion(self, text: str, finished: bool = True) -> list[int]:
        """The completion's ids: its text without special tokens, then eos unless the
        sample was cut (gen-pairs' `encode_pair`)."""
        ids = list(self.tok(text, add_special_tokens=False)["input_ids"])
        return ids + [self.tok.eos_token_id] if finished else ids

    def fit(self, prompt_ids: list[int], completion_ids: list[int]):
        """(completion ids kept, cut?) under max_length, or None when the prompt alone fills it."""
        room = self.max_length - len(prompt_ids)
        if room <= 0:
            return None
        if len(completion_ids) > room:
            return completion_ids[:room], True
        return completion_ids, False

    def fingerprint(self) -> str:
        """sha256 of everything that decides the tokens: vocabulary and merges, chat
        template, eos, max_length and this module's rules."""
        h = hashlib.sha256()
        backend = getattr(self.tok, "backend_tokenizer", None)
        h.update((backend.to_str() if backend is not None else
                  json.dumps(sorted(self.tok.get_vocab().items()))).encode())
        h.update(json.dumps([self.tok.chat_template if self.chat else None, self.tok.eos_token_id,
                             self.max_length, TOKENIZATION_VERSION]).encode())
        return h.hexdigest()


def seq_key(prompt_ids: list[int], completion_ids: list[int]) -> str:
    """A content key of one (prompt, completion) token sequence, for the reference cache."""
    return hashlib.sha256(json.dumps([prompt_ids, completion_ids]).encode()).hexdigest()[:32]


def _finished(data: Data, i: int, obj: dict, key: str, where: str = "") -> bool:
    """A completion's finished flag (absent: finished)."""
    value = obj.get(key, True)
    if not isinstance(value, bool):
        raise data.error(i, f"{where}.{key}" if where else key, "expected true or false")
    return value


def _number(data: Data, i: int, value: Any, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise data.error(i, field, "expected a finite number")
    return float(value)


def _prob(data: Data, i: int, value: Any, field: str) -> float:
    p = _number(data, i, value, field)
    if not 0.0 <= p <= 1.0:
        raise data.error(i, field, f"must be a probability in [0, 1], got {p}")
    return p


def _scores(data: Data, i: int, rec: dict, method: str) -> tuple[float, float]:
    for f in ("score_chosen", "score_rejected"):
        if f not in rec:
            raise data.error(i, f, f"missing ({method} needs score_chosen and score_rejected)")
    return (_number(data, i, rec["score_chosen"], "score_chosen"),
            _number(data, i, rec["score_rejected"], "score_rejected"))


def _pair_prob(data: Data, i: int, rec: dict, method: str) -> float:
    """P(chosen ≻ rejected): p_win when it is a number, else σ(score_chosen − score_rejected)."""
    pw = rec.get("p_win")
    if isinstance(pw, (int, float)) and not isinstance(pw, bool):
        return _prob(data, i, pw, "p_win")
    if "score_chosen" in rec and "score_rejected" in rec:
        sc, sr = _scores(data, i, rec, method)
        return 1.0 / (1.0 + math.exp(-(sc - sr)))
    raise data.error(i, "p_win", f"missing ({method} needs p_win as a number, or "
                     "score_chosen and score_rejected)")


def _win_rates(data: Data, i: int, rec: dict, method: str) -> tuple[float, float]:
    """(p_w, p_l): P̂(chosen ≻ π) and P̂(rejected ≻ π). From p_win {"chosen", "rejected"};
    from one pair probability P (a number p_win, or σ of the score difference) with the
    K = 2 estimator of SPPO (self-term ½ included): p_w = (½ + P)/2, p_l = 1 − p_w."""
    pw = rec.get("p_win")
    if isinstance(pw, dict):
        for k in ("chosen", "rejected"):
            if k not in pw:
                raise data.error(i, f"p_win.{k}", f"missing ({method} needs p_win.chosen and "
                                 "p_win.rejected)")
        return (_prob(data, i, pw["chosen"], "p_win.chosen"),
                _prob(data, i, pw["rejected"], "p_win.rejected"))
    p = _pair_prob(data, i, rec, method)
    p_w = (0.5 + p) / 2
    return p_w, 1.0 - p_w


@dataclass
class Built:
    """Tokenized rows plus what the trainer and the manifest need to know."""
    rows: list[dict]
    dropped: int = 0
    cut: int = 0
    record_refs: int = 0
    extras: tuple[str, ...] = ()
    info: dict = field(default_factory=dict)


def pair_rows(data: Data, tk: Tokenization, *, extras: tuple[str, ...] = (),
              method: str = "dpo", record_ref=None) -> Built:
    """Pair records -> rows {index, prompt_ids, chosen_ids, rejected_ids, rec_ref_chosen,
    rec_ref_rejected (NaN when absent or unusable), extras...}.

    extras: "p_win" (p_w, p_l for soft SPPO), "p_pair" (P(chosen ≻ rejected)),
    "scores" (score_chosen, score_rejected). `record_ref(record) -> bool` says whether a
    record's ref_logp_* may be used (None: never).
    """
    rows, dropped, cut, n_ref = [], 0, 0, 0
    for i, rec in enumerate(data.records):
        p_ids = tk.prompt(rec["prompt"])
        c = tk.fit(p_ids, tk.completion(_text(data, i, rec["chosen"], "chosen"),
                                        _finished(data, i, rec, "finished_chosen")))
        r = tk.fit(p_ids, tk.completion(_text(data, i, rec["rejected"], "rejected"),
                                        _finished(data, i, rec, "finished_rejected")))
        if c is None or r is None:
            dropped += 1
            continue
        row = {"index": len(rows), "prompt_ids": p_ids, "chosen_ids": c[0], "rejected_ids": r[0],
               "rec_ref_chosen": math.nan, "rec_ref_rejected": math.nan}
        cut += int(c[1]) + int(r[1])
        if (record_ref is not None and "ref_logp_chosen" in rec and "ref_logp_rejected" in rec
                and not c[1] and not r[1] and record_ref(rec)):
            row["rec_ref_chosen"] = float(rec["ref_logp_chosen"])
            row["rec_ref_rejected"] = float(rec["ref_logp_rejected"])
            n_ref += 1
        if "p_win" in extras:
            row["p_w"], row["p_l"] = _win_rates(data, i, rec, method)
        if "p_pair" in extras:
            row["p_wl"] = _pair_prob(data, i, rec, method)
        if "scores" in extras:
            row["score_chosen"], row["score_rejected"] = _scores(data, i, rec, method)
        rows.append(row)
    _report(dropped, cut, len(data.records), tk.max_length)
    if not rows:
        raise UsageError(f"no pair fits --max-length {tk.max_length}")
    keys = tuple(k for k in ("p_w", "p_l", "p_wl", "score_chosen", "score_rejected")
                 if rows and k in rows[0])
    return Built(rows, dropped, cut, n_ref, keys)


def _report(dropped: int, cut: int, total: int, max_length: int) -> None:
    if dropped:
        console.warn(f"{dropped} of {total} records dropped: the prompt alone fills "
                     f"--max-length {max_length}")
    if cut:
        console.info(f"{cut} completions cut to --max-length {max_length}")


def group_rows(data: Data, tk: Tokenization, *, method: str, with_reference: bool = False) -> Built:
    """Ranking/samples records -> rows {index, prompt_ids, completions (ids lists, best
    first), scores, [ref_ids, ref_score]} for the listwise losses.

    Completions are sorted by score, best first (stable). With `with_reference` (GRAO)
    the reference answer comes from `reference` or `meta.reference`, its score from
    `reference_score` or `meta.reference_score`, else the best completion score (the
    reference answer counts as at least as good as the best sample; a choice, since the
    paper scores it with a judge).
    """
    rows, dropped, cut = [], 0, 0
    for i, rec in enumerate(data.records):
        p_ids = tk.prompt(rec["prompt"])
        items = []
        for j, comp in enumerate(rec["completions"]):
            fld = f"completions[{j}]"
            if "score" not in comp:
                raise data.error(i, f"{fld}.score", f"missing ({method} needs every completion scored)")
            score = _number(data, i, comp["score"], f"{fld}.score")
            fit = tk.fit(p_ids, tk.completion(_text(data, i, comp["text"], f"{fld}.text"),
                                              _finished(data, i, comp, "finished", fld)))
            if fit is None:
                break
            cut += int(fit[1])
            items.append((score, fit[0]))
        if len(items) < len(rec["completions"]):
            dropped += 1
            continue
        min_n = 1 if with_reference else 2
        if len(items) < min_n:
            raise data.error(i, "completions", f"{method} needs at least {min_n} completions")
        items.sort(key=lambda t: -t[0])
        row = {"index": len(rows), "prompt_ids": p_ids, "completions": [c for _, c in items],
               "scores": [s for s, _ in items]}
        if with_reference:
            meta = rec.get("meta") if isinstance(rec.get("meta"), dict) else {}
            ref = rec.get("reference", meta.get("reference"))
            if ref is None:
                raise data.error(i, "reference", f"missing ({method} needs a reference answer in "
                                 "`reference` or `meta.reference`)")
            if not isinstance(ref, (str, list)):
                raise data.error(i, "reference", "expected a string or one assistant message")
            ref_text = _text(data, i, ref, "reference")
            fit = tk.fit(p_ids, tk.completion(ref_text))
            cut += int(fit[1])
            row["ref_ids"] = fit[0]
            rs = rec.get("reference_score", meta.get("reference_score"))
            row["ref_score"] = (_number(data, i, rs, "reference_score") if rs is not None
                                else max(row["scores"]))
        rows.append(row)
    _report(dropped, cut, len(data.records), tk.max_length)
    if not rows:
        raise UsageError(f"no record fits --max-length {tk.max_length}")
    return Built(rows, dropped, cut)


# --- TRL's conversational rows (sft, kto, simpo, orpo) ------------------------------------

def trl_rows(data: Data, method_data: str, chat: bool) -> list[dict]:
    """Records -> TRL dataset rows: prompt/completion (sft), prompt/completion/label
    (unpaired), prompt/chosen/rejected (pairs). Conversational when the tokenizer has a
    chat template, plain strings otherwise."""
    def prompt(i, p):
        if chat:
            return as_messages(p)
        if not isinstance(p, str):
            raise UsageError("the tokenizer has no chat template: message-list prompts "
                             "cannot be rendered")
        return p

    def comp(i, v, fld):
        text = _text(data, i, v, fld)
        return [{"role": "assistant", "content": text}] if chat else text

    rows = []
    for i, rec in enumerate(data.records):
        if method_data == "pairs":
            rows.append({"prompt": prompt(i, rec["prompt"]), "chosen": comp(i, rec["chosen"], "chosen"),
                         "rejected": comp(i, rec["rejected"], "rejected")})
        elif method_data == "unpaired":
            rows.append({"prompt": prompt(i, rec["prompt"]),
                         "completion": comp(i, rec["completion"], "completion"),
                         "label": bool(rec["label"])})
        elif method_data == "sft":
            kind = detect_kind(rec)
            if kind == "pair":
                value, fld = rec["chosen"], "chosen"
            elif kind == "samples":
                scored = [c for c in rec["completions"] if "score" in c]
                best = max(scored, key=lambda c: c["score"]) if scored else rec["completions"][0]
                value, fld = best["text"], "completions.text"
            else:
                if kind == "unpaired" and not rec["label"]:
                    continue  # an undesirable completion is not a target
                value, fld = rec["completion"], "completion"
            rows.append({"prompt": prompt(i, rec["prompt"]), "completion": comp(i, value, fld)})
        else:
            raise ValueError(method_data)
    if not rows:
        raise UsageError("no usable records (sft keeps only unpaired records with label true)")
    return rows
