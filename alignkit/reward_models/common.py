"""What the reward-model trainers share: reading and splitting pairs, tokenising them the
way the `rm:DIR` scorer does, held-out metrics and writing the output folder.

Input format: `rm_inputs` from `alignkit.reward_models.inference` (one implementation
for training and scoring), tokenised with special tokens only when the tokenizer has no
chat template. Pairs longer than `--max-length` tokens are dropped, as TRL's
RewardTrainer does, and counted.

Held-out metrics (ALGORITHMS.md Part C): pair accuracy with ties counted as wrong, per
`meta.subset` when present and weighted by subset size (`alignkit.stats.rm_accuracy`),
the mean margin r(chosen) − r(rejected), and per-user accuracy when pairs carry
`meta.user`.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from .. import console
from ..errors import DataError, UsageError
from ..io import atomic_dir, discard_folder, manifest, read_records
from .inference import render, render_prompts, token_ids

if TYPE_CHECKING:
    from . import RMConfig


@dataclass
class PairSet:
    """Pairs read from one file, with where they came from."""
    records: list[dict]
    path: str
    sha256: str | None


def user_of(record: dict) -> str | None:
    u = (record.get("meta") or {}).get("user")
    return None if u is None else str(u)


def subset_of(record: dict) -> str | None:
    s = (record.get("meta") or {}).get("subset")
    return None if s is None else str(s)


def load_pairs(path: str, *, need_user: str | None = None) -> PairSet:
    """Read and validate pair records; `need_user` (a method name) requires `meta.user`
    on every pair (a string or an integer)."""
    reader = read_records(path, "pair")
    records = []
    for rec in reader:
        meta = rec.get("meta") or {}
        if "user" in meta and not (isinstance(meta["user"], (str, int))
                                   and not isinstance(meta["user"], bool)):
            raise DataError("must be a string or an integer", reader.name, reader.line,
                            "meta.user")
        if need_user and "user" not in meta:
            raise DataError(f"missing: --method {need_user} needs a user id on every pair",
                            reader.name, reader.line, "meta.user")
        if "subset" in meta and not isinstance(meta["subset"], str):
            raise DataError("must be a string", reader.name, reader.line, "meta.subset")
        records.append(rec)
    return PairSet(records, reader.name, reader.sha256)


def split_pairs(records: list[dict], frac: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, eval): a seeded `frac` share of each user's pairs (of all pairs
    when there are no users) is held out; every user keeps at least one training pair."""
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"--eval-split must be in [0, 1), got {frac}")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(str(user_of(r)), []).append(i)
    rng = random.Random(seed)
    held: set[int] = set()
    for key in sorted(groups):
        idx = list(groups[key])
        rng.shuffle(idx)
        n = min(int(round(frac * len(idx))), len(idx) - 1)
        held.update(idx[:n])
    train = [i for i in range(len(records)) if i not in held]
    return train, sorted(held)


def train_eval_sets(pairs_path: str, cfg: RMConfig, seed: int,
                    need_user: str | None = None) -> tuple[PairSet, list[dict], list[dict], dict]:
    """(all pairs, train records, held-out records, input sha256s) from the flags."""
    data = load_pairs(pairs_path, need_user=need_user)
    inputs = {data.path: data.sha256}
    if cfg.eval_pairs:
        held = load_pairs(cfg.eval_pairs, need_user=need_user)
        inputs[held.path] = held.sha256
        unknown = sorted({user_of(r) for r in held.records} - {user_of(r) for r in data.records})
        if need_user and unknown:
            raise UsageError(f"--eval-pairs: user(s) {', '.join(unknown[:5])} have no pairs in "
                             f"{data.path}; --method {need_user} scores each user with what "
                             "it learned from that user's pairs")
        return data, data.records, held.records, inputs
    tr, ev = split_pairs(data.records, cfg.eval_split, seed)
    return data, [data.records[i] for i in tr], [data.records[i] for i in ev], inputs


# --- tokenising -----------------------------------------------------------------------

def use_margin(cfg: RMConfig, records: list[dict]) -> bool:
    """Whether training uses the pairs' `margin` field: only with --margin (a parameter
    of the methods that declare it) and when some pair has one. Otherwise the loss is
    plain Bradley-Terry, −log σ(r_c − r_r), whatever the pairs carry (relabel writes
    `margin` = score_chosen − score_rejected on every pair); a note says so."""
    has = sum("margin" in r for r in records)
    if not cfg.margin:
        if has:
            console.info(f"{has} pair(s) carry a margin field; it is not used (plain "
                         "Bradley-Terry; --margin trains with it)")
        return False
    if not has:
        console.warn("--margin: no pair has a margin field; plain Bradley-Terry")
    return bool(has)


def tokenize_pairs(tokenizer, records: list[dict], max_length: int, *,
                   with_prompt: bool = False, user_index: dict[str, int] | None = None,
                   what: str = "training", margin: bool = False) -> list[dict]:
    """Rows for the Trainer: chosen_ids, rejected_ids, index (into `records`), margin
    (only with `margin=True`, see `use_margin`; 0 for pairs without one), prompt_ids and
    user (when asked). Over-long pairs are dropped."""
    prompts = [r["prompt"] for r in records]
    chosen = token_ids(tokenizer, render(tokenizer, prompts, [r["chosen"] for r in records]))
    rejected = token_ids(tokenizer, render(tokenizer, prompts, [r["rejected"] for r in records]))
    prompt_ids = token_ids(tokenizer, render_prompts(tokenizer, prompts)) if with_prompt else None
    has_margin = margin and any("margin" in r for r in records)
    rows, dropped = [], 0
    for i, r in enumerate(records):
        if max(len(chosen[i]), len(rejected[i])) > max_length:
            dropped += 1
            continue
        row = {"chosen_ids": chosen[i], "rejected_ids": rejected[i], "index": i}
        if has_margin:
            row["margin"] = float(r.get("margin", 0.0))
        if with_prompt:
            row["prompt_ids"] = prompt_ids[i][:max_length]
        if user_index is not None:
            row["user"] = user_index[user_of(r)]
        rows.append(row)
    if dropped:
        console.warn(f"{dropped} {what} pair(s) longer than --max-length {max_length} tokens "
                     "were skipped")
    if records and not rows:
        raise UsageError(f"every {what} pair is longer than --max-length {max_length}")
    return rows


def pad_batch(seqs: list[list[int]], pad_id: int):
    """Right-padded (input_ids, attention_mask) tensors."""
    import torch
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def ids_rewards(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    """Rewards of already-tokenised sequences under a sequence-classification model."""
    import torch
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    with torch.inference_mode():
        for s in range(0, len(seqs), batch_size):
            ids, mask = pad_batch(seqs[s:s + batch_size], pad_id)
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out.extend(float(v) for v in logits[:, 0].float().tolist())
    model.train(was_training)
    return out


def preference_collator(pad_id: int):
    """TRL's DataCollatorForPreference (chosen rows first, then rejected; margin)."""
    from trl.trainer.reward_trainer import DataCollatorForPreference
    return DataCollatorForPreference(pad_token_id=pad_id)


def seed_everything(seed: int) -> None:
    """Seed python/numpy/torch; also silence transformers' own progress bars (loading
    and writing weights), since progress goes through alignkit.console only."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.set_seed(seed)


# --- scoring and metrics --------------------------------------------------------------

def pair_scores(score: Callable[[list, list, list | None], list[float]],
                records: list[dict], with_users: bool = False) -> tuple[list[float], list[float]]:
    """(rewards of chosen, rewards of rejected) from a `score(prompts, completions,
    users)` function."""
    prompts = [r["prompt"] for r in records]
    users = [user_of(r) for r in records] if with_users else None
    both = score(prompts + prompts, [r["chosen"] for r in records] + [r["rejected"] for r in records],
                 (users + users) if users is not None else None)
    n = len(records)
    return both[:n], both[n:]


def heldout_metrics(records: list[dict], chosen: Sequence[float],
                    rejected: Sequence[float]) -> dict:
    """accuracy (ties wrong, subset-size weighted), n, mean_margin, per_subset (when
    pairs carry meta.subset), per_user and mean_user_accuracy (when they carry meta.user)."""
    from ..stats import rm_accuracy
    subsets = [subset_of(r) for r in records]
    acc = rm_accuracy(list(zip(chosen, rejected, subsets)))
    out: dict[str, Any] = {
        "accuracy": round(acc["accuracy"], 6), "n": acc["n"],
        "mean_margin": round(sum(c - r for c, r in zip(chosen, rejected)) / len(records), 6),
    }
    if any(s is not None for s in subsets):
        out["per_subset"] = {k: {"accuracy": round(v["accuracy"], 6), "n": v["n"]}
                             for k, v in sorted(acc["per_subset"].items())}
    users = [user_of(r) for r in records]
    if any(u is not None for u in users):
        per = rm_accuracy(list(zip(chosen, rejected, users)))["per_subset"]
        out["per_user"] = {k: {"accuracy": round(v["accuracy"], 6), "n": v["n"]}
                           for k, v in sorted(per.items())}
        out["mean_user_accuracy"] = round(
            sum(v["accuracy"] for v in per.values()) / len(per), 6)
    return out


def evaluate(score, records: list[dict], with_users: bool = False) -> dict | None:
    """Held-out metrics of a `score(prompts, completions, users)` function, or None
    when there are no held-out pairs."""
    if not records:
        return None
    c, r = pair_scores(score, records, with_users)
    return heldout_metrics(records, c, r)


def report(metrics: dict | None, label: str = "held-out") -> None:
    """Held-out metrics on stderr."""
    if not metrics:
        console.warn("no held-out pairs (use --eval-split or --eval-pairs for metrics)")
        return
    console.info(f"{label}: accuracy {metrics['accuracy']:.4f} (n={metrics['n']}), "
                 f"mean margin {metrics['mean_margin']:.4f}")
    for key, title in (("per_subset", "subset"), ("per_user", "user")):
        for name, v in (metrics.get(key) or {}).items():
            console.info(f"  {title} {name}: accuracy {v['accuracy']:.4f} (n={v['n']})")
    if "mean_user_accuracy" in metrics:
        console.info(f"  mean per-user accuracy {metrics['mean_user_accuracy']:.4f}")


# --- training plumbing ------------------------------------------------------------------

def reward_config(opts, work: Path, cfg: RMConfig, **over):
    """TRL RewardConfig from the shared flags (pairs are pre-tokenised, so max_length
    only filters)."""
    from trl import RewardConfig

    from ..training import trainer_kwargs
    kw = trainer_kwargs(opts, work)
    kw.update(max_length=opts.max_length, disable_dropout=True,
              center_rewards_coefficient=cfg.center_rewards or None)
    kw.update(over)
    return RewardConfig(**kw)


def training_args(opts, work: Path, **over):
    """transformers TrainingArguments from the shared flags (custom-loss trainers)."""
    from transformers import TrainingArguments

    from ..training import trainer_kwargs
    kw = trainer_kwargs(opts, work)
    kw.update(over)
    return TrainingArguments(**kw)


def dataset(rows: list[dict]):
    import datasets
    from datasets import Dataset
    datasets.disable_progress_bars()  # progress goes through alignkit.console only
    if not rows:
        raise UsageError("no training pairs")
    return Dataset.from_list(rows)


def bt_losses(chosen, rejected, margin=None):
    """Per-pair Bradley-Terry loss −log σ(r_c − r_r − m) (ALGORITHMS.md Part B §4)."""
    import torch.nn.functional as F
    diff = chosen - rejected
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff)


def split_rewards(model, inputs):
    """Rewards of a batch from DataCollatorForPreference: (chosen, rejected)."""
    import torch
    out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                use_cache=False)
    return torch.chunk(out.logits.squeeze(-1).float(), 2)


class LoggedMetrics:
    """Mixin for the custom-loss Trainer subclasses: values noted at each step
    (accuracy, margin, ...) are averaged into the next training log line, as TRL's
    trainers do, so they reach metrics.jsonl."""

    def note(self, **values: float) -> None:
        store = self.__dict__.setdefault("_rm_metrics", {})
        for k, v in values.items():
            store.setdefault(k, []).append(float(v))

    def log(self, logs: dict, start_time: float | None = None) -> None:
        store = self.__dict__.get("_rm_metrics") or {}
        if store and "loss" in logs:
            logs.update({k: sum(v) / len(v) for k, v in store.items()})
            store.clear()
        super().log(logs, start_time)


def pair_stats(chosen, rejected) -> dict:
    """Batch accuracy (ties wrong) and mean margin, as plain floats."""
    return {"accuracy": (chosen > rejected).float().mean().item(),
            "margin": (chosen - rejected).mean().item()}


def train_metrics(trainer) -> dict:
    from ..training import final_metrics
    return {k: v for k, v in final_metrics(trainer).items() if isinstance(v, (int, float))}


def write_folder(out: str | Path, work: Path, *, force: bool, write: Callable[[Path], None],
                 info: dict, started: float, seed: int, inputs: dict) -> Path:
    """The output folder of a non-bt method, atomically (as training.save_output does
    for one model): `write(tmp)` fills it, then metrics.jsonl and alignkit.json. Under
    a distributed launch only the main process writes, and every rank waits for it."""
    out = Path(out)
    from ..training import barrier, finish_folder, is_main_process
    barrier()
    if is_main_process():
        with atomic_dir(out, force=force) as tmp:
            write(tmp)
            finish_folder(tmp, work, manifest(inputs=inputs, seed=seed, started=started,
                                              **info), final=out)
        discard_folder(work, out)
    barrier()
    return out


def save_seq_cls(model, tokenizer, folder: Path) -> None:
    """A plain AutoModelForSequenceClassification folder (LoRA merged)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def now() -> float:
    return time.time()


def ceil_keep(n: int, rate: float) -> int:
    """⌈(1 − rate)·n⌉, at least 1."""
    return max(1, math.ceil((1.0 - rate) * n - 1e-9))
