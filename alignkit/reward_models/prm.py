"""`prm`: a process reward model, one probability per reasoning step (Easy-to-Hard,
arXiv 2403.09472, and TRL's PRM recipe; ALGORITHMS.md Part D §1, §2).

TRL has no PRMTrainer any more (the installed TRL 1.16 ships none, not even under
`trl.experimental`), so the loss is a small Trainer subclass here, on the tokenisation
of TRL's `prm_trainer.tokenize_row`.

Input (one record per line, read with the strict reader of `alignkit.io`):

- TRL's PRM format: `{"prompt", "completions": [step_1, ..., step_K], "labels": [bool]*K}`;
- alignkit's own: `{"prompt", "completion": TEXT, "labels": [bool]*K}`, where TEXT is
  split into steps at `--step-separator` (default a blank line, "\\n\\n", the
  Easy-to-Hard/PRM800K splitter); pieces that are empty or only whitespace are dropped,
  so a trailing separator makes no extra step.

`prompt` is a string or a chat message list; `labels` are JSON booleans (or soft
labels, below), one per step; anything else is a DataError at file:line: field.

Tokenisation (TRL's): the prompt as `rm:DIR` renders it with the assistant turn opened
(`text.render_prompt_only`; without a chat template the prompt text and a blank line,
special tokens added), then each step tokenised on its own as `step + separator`
(no special tokens) and appended. The label of a step sits on the *last token of its
piece* (the separator's last token); every other position is ignored. A record is cut
at `--max-length` tokens: steps that no longer fit are dropped (from training, and
from scoring: they get no score).

Model and loss: `AutoModelForTokenClassification` with one logit z_t per token and
BCE-with-logits at the step positions, L = mean_k BCE(z_{t_k}, label_k) over the batch
(Easy-to-Hard's one-logit BCE, on TRL's one-token-per-step positions; simplified: no
`--train-on-every-token`, no 2-class softmax head, no `train_on_last_step_only`).
Step score p_k = σ(z_{t_k}): P(step k is correct). The last step also ends with the
separator (TRL's rule; Easy-to-Hard reads its final step at the token before EOS).
With `--lora-r` the head is trained in full (peft's TOKEN_CLS modules_to_save, kept out
of the LoRA targets) and the adapter is merged into the written folder.

Soft labels: a label may also be a probability in [0, 1] (BCE against it), e.g. a
Monte-Carlo step value. Samples records scored by `score -s mc-rollout:MODEL` are read
directly (`mc_rollout_records`): each completion's steps labelled with the value of the
state after each step, so `train-rm --method prm` on them trains step-level DAPO's
critic (ALGORITHMS.md Part D §3). Accuracy counts a label >= 0.5 as correct.

Not here (ALGORITHMS.md §1/§2 mappings): PROPA's MCTS tree values, PRM-shaped per-token rewards for PPO (`train-policy
--process-reward`); `train-policy --reward prm:DIR` uses the aggregate as the sequence
reward.

Aggregation of a completion's step scores (`aggregate`): min (default, as Easy-to-Hard's
RL code), prod, last (p_K) and mean. Which one the paper's re-ranking tables use is
UNVERIFIED; min is the default here.

Held-out metric: step accuracy (p_k > 0.5 against the label) over the held-out records'
steps (a seeded `--eval-split` share of the records, or `--eval-pairs` in the same
format), with the mean p of correct and of wrong steps.

Folder: a plain transformers `AutoModelForTokenClassification` folder (num_labels=1) +
tokenizer; alignkit.json has `"rm_method": "prm"`, `"step_separator"`, `"aggregate":
"min"` and the metrics. `score --scorer prm:DIR` (and `rm:DIR`, aggregated) load it
with `load_folder`.
"""
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import console
from ..errors import DataError, UsageError
from ..io import read_records
from ..records import check_text
from ..text import completion_text, has_chat_template, render_prompt_only
from .common import (LoggedMetrics, dataset, now, pad_batch, seed_everything, train_metrics,
                     training_args, write_folder)
from .inference import METHOD_KEY, folder_info

if TYPE_CHECKING:
    from . import RMConfig

NAME = "prm"
DEFAULT_SEPARATOR = "\n\n"
AGGREGATES = ("min", "prod", "last", "mean")
IGNORE = -100


# --- steps and aggregation ------------------------------------------------------------

def decode_separator(text: str) -> str:
    """The --step-separator value with the escapes \\n, \\t, \\r and \\\\ decoded (a shell
    passes them literally); an empty separator is a UsageError."""
    out, i = [], 0
    table = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text) and text[i + 1] in table:
            out.append(table[text[i + 1]])
            i += 2
        else:
            out.append(text[i])
            i += 1
    sep = "".join(out)
    if not sep:
        raise UsageError("--step-separator must not be empty")
    return sep


def split_steps(text: str, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """The steps of a completion: `text` split at `separator`, without the pieces that
    are empty or only whitespace."""
    return [s for s in text.split(separator) if s.strip()]


def aggregate(scores: Sequence[float], how: str = "min") -> float:
    """One completion score from its step scores p_1..p_K: min_k p_k, Π_k p_k, p_K or
    the mean."""
    if not scores:
        raise ValueError("no step scores to aggregate")
    if how == "min":
        return min(scores)
    if how == "prod":
        return math.prod(scores)
    if how == "last":
        return scores[-1]
    if how == "mean":
        return sum(scores) / len(scores)
    raise UsageError(f"prm: --aggregate must be one of {' | '.join(AGGREGATES)}, got {how!r}")


def check_aggregate(how: str | None) -> str:
    how = how or AGGREGATES[0]
    if how not in AGGREGATES:
        raise UsageError(f"prm: --aggregate must be one of {' | '.join(AGGREGATES)} for a "
                         f"process reward model, got {how!r}")
    return how


# --- reading step-labelled records ------------------------------------------------------

def parse_record(rec: dict, separator: str) -> dict:
    """{"prompt", "steps", "labels"} from one record of either format (DataError with
    the field on a bad one)."""
    if "prompt" not in rec:
        raise DataError("missing", field="prompt")
    check_text(rec["prompt"], "prompt")
    if "completions" in rec:
        steps = rec["completions"]
        if not isinstance(steps, list) or not steps:
            raise DataError("must be a non-empty list of step strings (TRL's PRM format)",
                            field="completions")
        for i, s in enumerate(steps):
            if not isinstance(s, str) or not s.strip():
                raise DataError("must be a non-empty string (one step)",
                                field=f"completions[{i}]")
    elif "completion" in rec:
        if not isinstance(rec["completion"], str):
            raise DataError("must be a string (split into steps at the step separator)",
                            field="completion")
        steps = split_steps(rec["completion"], separator)
        if not steps:
            raise DataError("has no step (only separators or whitespace)", field="completion")
    else:
        raise DataError("missing: give `completions` (a list of steps) or `completion` "
                        "(a text split at --step-separator)", field="completions")
    labels = rec.get("labels")
    if not isinstance(labels, list):
        raise DataError("missing or not a list: one label per step", field="labels")
    if len(labels) != len(steps):
        raise DataError(f"has {len(labels)} label(s) for {len(steps)} step(s)", field="labels")
    for i, v in enumerate(labels):
        if not (isinstance(v, bool) or (isinstance(v, (int, float)) and 0.0 <= v <= 1.0)):
            raise DataError(f"must be true, false or a probability in [0, 1], got {v!r}",
                            field=f"labels[{i}]")
    return {"prompt": rec["prompt"], "steps": list(steps), "labels": list(labels)}


def mc_rollout_records(rec: dict) -> list[dict]:
    """Critic records from a samples record scored by `score -s mc-rollout:MODEL`
    (step-level DAPO's stage A): one per completion with `mc_rollout`, its steps with the
    soft labels v̂(s_1), ..., v̂(s_{K-1}), outcome: the label of step k is the Monte-Carlo
    value of the state after it (the last step's, the completion's own outcome), so
    P(step k) estimates V(s_{k+1}) as step-dapo's `--critic` reads it."""
    out = []
    for j, c in enumerate(rec["completions"]):
        mc = c.get("mc_rollout") if isinstance(c, dict) else None
        if mc is None:
            continue
        where = f"completions[{j}].mc_rollout"
        steps, values, outcome = mc.get("steps"), mc.get("step_values"), mc.get("outcome")
        if not (isinstance(steps, list) and steps and all(isinstance(x, str) for x in steps)):
            raise DataError("must be a non-empty list of strings", field=f"{where}.steps")
        if not (isinstance(values, list) and len(values) == len(steps)):
            raise DataError("must have one value per step", field=f"{where}.step_values")
        labels = list(values[1:]) + [outcome]
        for i, v in enumerate(labels):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
                name = f"{where}.outcome" if i == len(labels) - 1 else f"{where}.step_values[{i + 1}]"
                raise DataError(f"must be a value in [0, 1] (a 0/1 verifier), got {v!r}",
                                field=name)
        out.append({"prompt": rec["prompt"], "steps": steps, "labels": [float(v) for v in labels]})
    return out


def load_step_records(path: str, separator: str) -> tuple[list[dict], str, str | None]:
    """(parsed records, file name, sha256) of a step-labelled file."""
    reader = read_records(path)
    out = []
    for rec in reader:
        try:
            comps = rec.get("completions")
            if isinstance(comps, list) and comps and isinstance(comps[0], dict):
                out.extend(mc_rollout_records(rec))  # samples scored by mc-rollout
            else:
                out.append(parse_record(rec, separator))
        except DataError as e:
            raise e.at(reader.name, reader.line) from None
    return out, reader.name, reader.sha256


# --- tokenising --------------------------------------------------------------------------

def encode_steps(tokenizer, prompt: Any, steps: Sequence[str], separator: str,
                 max_length: int) -> tuple[list[int], list[int]]:
    """(input ids, index of each step's last token) for prompt + steps; steps that do
    not fit in `max_length` tokens are left out (fewer indices than steps)."""
    chat = has_chat_template(tokenizer)
    prefix = render_prompt_only(tokenizer, prompt) + ("" if chat else DEFAULT_SEPARATOR)
    ids = list(tokenizer(prefix, add_special_tokens=not chat)["input_ids"])[:max_length]
    ends: list[int] = []
    if not steps:
        return ids, ends
    pieces = tokenizer([s + separator for s in steps], add_special_tokens=False)["input_ids"]
    for piece in pieces:
        if not piece or len(ids) + len(piece) > max_length:
            break
        ids.extend(piece)
        ends.append(len(ids) - 1)
    return ids, ends


def training_rows(tokenizer, records: list[dict], separator: str, max_length: int) -> list[dict]:
    rows, cut, dropped = [], 0, 0
    for r in records:
        ids, ends = encode_steps(tokenizer, r["prompt"], r["steps"], separator, max_length)
        if not ends:
            dropped += 1
            continue
        cut += len(ends) < len(r["steps"])
        labels = [IGNORE] * len(ids)
        for t, lab in zip(ends, r["labels"]):
            labels[t] = float(lab)
        rows.append({"input_ids": ids, "labels": labels})
    if cut or dropped:
        console.warn(f"--max-length {max_length}: {cut} record(s) lost their last steps, "
                     f"{dropped} had no step that fits and were skipped")
    if records and not rows:
        raise UsageError(f"no training record has a step within --max-length {max_length}")
    return rows


def _collator(pad_id: int):
    import torch

    def collate(rows: list[dict]) -> dict:
        ids, mask = pad_batch([r["input_ids"] for r in rows], pad_id)
        labels = torch.full(ids.shape, float(IGNORE))
        for i, r in enumerate(rows):
            labels[i, :len(r["labels"])] = torch.tensor(r["labels"], dtype=torch.float)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return collate


def step_loss(logits, labels):
    """(mean BCE-with-logits at the labelled positions, step accuracy) of a batch;
    logits (B, T) float, labels (B, T) with IGNORE elsewhere."""
    import torch.nn.functional as F
    at = labels != IGNORE
    z, y = logits[at], labels[at].float()
    loss = F.binary_cross_entropy_with_logits(z, y)  # soft targets: BCE against v̂
    acc = ((z > 0) == (y >= 0.5)).float().mean()
    return loss, acc


def make_trainer(model, args, rows: list[dict], pad_id: int):
    from transformers import Trainer

    class PRMTrainer(LoggedMetrics, Trainer):
        """BCE at each step's last token (TRL has no PRMTrainer in 1.16)."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
            logits = out.logits[..., 0].float()
            loss, acc = step_loss(logits, inputs["labels"])
            self.note(step_accuracy=acc.item())
            return (loss, {"logits": logits}) if return_outputs else loss

    return PRMTrainer(model=model, args=args, train_dataset=dataset(rows),
                      data_collator=_collator(pad_id))


# --- the model --------------------------------------------------------------------------

def load_token_cls(spec, dtype: str = "auto"):
    """(AutoModelForTokenClassification with one logit, tokenizer) from a model folder
    or embedded name (a causal LM gets a fresh head)."""
    import transformers
    from transformers import AutoModelForTokenClassification

    from ..models import check_weights, load_tokenizer, quiet_transformers, resolve, torch_dtype
    quiet_transformers()
    transformers.logging.set_verbosity_error()
    folder = resolve(spec)
    check_weights(folder, False)
    model = AutoModelForTokenClassification.from_pretrained(
        folder, num_labels=1, dtype=torch_dtype(dtype), use_safetensors=True)
    tok = load_tokenizer(folder)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return model, tok


class PRMRewardModel:
    """Step scores and aggregated scores of a prm folder's model."""

    def __init__(self, model, tokenizer, separator: str = DEFAULT_SEPARATOR, *,
                 aggregate: str | None = None, max_length: int = 1024, batch_size: int = 8):
        self.model, self.tokenizer, self.separator = model, tokenizer, separator
        self.aggregate = check_aggregate(aggregate)
        self.max_length, self.batch_size = max_length, batch_size

    def step_probs(self, prompts: Sequence[Any],
                   steps: Sequence[Sequence[str]]) -> list[list[float]]:
        """σ(z) at each step's last token, per item (steps past max_length get none)."""
        import torch
        enc = [encode_steps(self.tokenizer, p, s, self.separator, self.max_length)
               for p, s in zip(prompts, steps)]
        out: list[list[float]] = [[] for _ in enc]
        m = self.model
        was = m.training
        m.eval()
        device = next(m.parameters()).device
        order = sorted(range(len(enc)), key=lambda i: -len(enc[i][0]))
        with torch.inference_mode():
            for s in range(0, len(order), max(1, self.batch_size)):
                idx = [i for i in order[s:s + self.batch_size] if enc[i][1]]
                if not idx:
                    continue
                ids, mask = pad_batch([enc[i][0] for i in idx], self.tokenizer.pad_token_id)
                z = m(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[..., 0]
                p = torch.sigmoid(z.float()).cpu()
                for row, i in enumerate(idx):
                    out[i] = [float(p[row, t]) for t in enc[i][1]]
        m.train(was)
        return out

    def step_scores(self, prompts: Sequence[Any], completions: Sequence[Any]) -> list[list[float]]:
        steps = [split_steps(completion_text(c), self.separator) for c in completions]
        return self.step_probs(prompts, steps)

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        """The aggregate of each completion's step scores (0.0 for one with no step that
        fits: `rm:DIR` needs a number; the `prm:DIR` scorer leaves such items unscored)."""
        return [aggregate(s, self.aggregate) if s else 0.0
                for s in self.step_scores(prompts, completions)]


def load_folder(folder: str | Path, *, user: str | None = None, aggregate: str | None = None,
                dtype: str = "auto", device: str | None = None,
                max_length: int = 1024, batch_size: int = 8) -> PRMRewardModel:
    """The loader of this layout (see `inference.load_reward_model`; `user` unused)."""
    info = folder_info(folder)
    if info.get(METHOD_KEY) != NAME:
        raise UsageError(f"{folder}: not a prm reward-model folder (train one with "
                         "`train-rm --method prm`)")
    how = check_aggregate(aggregate)
    model, tok = load_token_cls(folder, dtype)
    if device:
        model.to(device)
    model.eval()
    return PRMRewardModel(model, tok, info.get("step_separator", DEFAULT_SEPARATOR),
                          aggregate=how, max_length=max_length, batch_size=batch_size)


# --- training ----------------------------------------------------------------------------

def split_records(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) indices: a seeded `frac` share held out, at least one kept."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = min(int(round(frac * n)), n - 1)
    return sorted(idx[k:]), sorted(idx[:k])


def heldout_metrics(prm: PRMRewardModel, records: list[dict]) -> dict | None:
    """step_accuracy (p > 0.5 vs label), n_steps, n_records, mean p of correct / wrong steps."""
    if not records:
        return None
    probs = prm.step_probs([r["prompt"] for r in records], [r["steps"] for r in records])
    pairs = [(p, lab) for ps, r in zip(probs, records) for p, lab in zip(ps, r["labels"])]
    if not pairs:
        return None
    good = [p for p, lab in pairs if lab >= 0.5]
    bad = [p for p, lab in pairs if lab < 0.5]
    return {"step_accuracy": round(sum((p > 0.5) == (lab >= 0.5) for p, lab in pairs)
                                   / len(pairs), 6),
            "mean_abs_error": round(sum(abs(p - float(lab)) for p, lab in pairs) / len(pairs), 6),
            "n_steps": len(pairs), "n_records": len(records),
            "mean_p_correct": round(sum(good) / len(good), 6) if good else None,
            "mean_p_wrong": round(sum(bad) / len(bad), 6) if bad else None}


def train(pairs: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Train a PRM on the step-labelled records at `pairs` (see the module docstring)."""
    from trl.trainer.utils import disable_dropout_in_model

    from ..training import lora_config, prepare_run, refuse_sharded, run_trainer

    refuse_sharded("train-rm --method prm")  # held-out scoring outside the Trainer
    sep = (DEFAULT_SEPARATOR if cfg.step_separator is None
           else decode_separator(cfg.step_separator))
    started = now()
    records, name, sha = load_step_records(pairs, sep)
    inputs = {name: sha}
    if cfg.eval_pairs:
        eval_recs, ename, esha = load_step_records(cfg.eval_pairs, sep)
        inputs[ename] = esha
        train_recs = records
    else:
        tr, ev = split_records(len(records), cfg.eval_split, opts.seed)
        train_recs, eval_recs = [records[i] for i in tr], [records[i] for i in ev]
    work = prepare_run(out, opts)
    seed_everything(opts.seed)
    model, tok = load_token_cls(model_spec, opts.dtype)
    disable_dropout_in_model(model)
    peft = lora_config(opts, "TOKEN_CLS")
    if peft is not None:  # the head is trained in full (TOKEN_CLS modules_to_save), not LoRA'd
        from peft import get_peft_model
        peft.exclude_modules = sorted(set(peft.exclude_modules or ()) | {"score", "classifier"})
        model = get_peft_model(model, peft)
    rows = training_rows(tok, train_recs, sep, opts.max_length)
    seed_everything(opts.seed)
    trainer = make_trainer(model, training_args(opts, work), rows, tok.pad_token_id)
    run_trainer(trainer, work, opts.resume)
    model = trainer.model
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    prm = PRMRewardModel(model, tok, sep, max_length=opts.max_length)
    metrics = heldout_metrics(prm, eval_recs)
    if metrics:
        console.info(f"held-out: step accuracy {metrics['step_accuracy']:.4f} "
                     f"(n={metrics['n_steps']} steps, {metrics['n_records']} records)")
    else:
        console.warn("no held-out records (use --eval-split or --eval-pairs for metrics)")
    info = {METHOD_KEY: NAME, "backbone": model_spec, "step_separator": sep,
            "aggregate": AGGREGATES[0], "head": "token-classification, 1 logit, BCE at "
            "each step's last token", "rm_options": cfg.as_dict(),
            "train_options": opts.as_dict(),
            "metrics": {"heldout": metrics, "train": train_metrics(trainer)},
            "counts": {"records": len(records),
                       "train": len(rows), "heldout": len(eval_recs),
                       "train_steps": sum(sum(v != IGNORE for v in r["labels"]) for r in rows)}}

    def write(tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    write_folder(out, work, force=opts.force, write=write, info=info, started=started,
                 seed=opts.seed, inputs=inputs)
    return {"heldout": metrics}
