"""`maxmin`: a hard-EM mixture of K Bradley-Terry reward models over users
(MaxMin-RLHF, ALGORITHMS.md Part B §6). TRL has no mixture of reward models; each
M-step is TRL's RewardTrainer (the BT loss), the EM loop around it is here.

- Initialise: the i-th user (ids sorted) goes to model i mod K.
- M-step: train model k (warm-started from its previous weights) on the pooled
  training pairs of its users, `--epochs`/`--max-steps` per M-step.
- E-step: reassign each user to argmax_k Σ_{pairs of u} log σ(r_k(y_c) − r_k(y_r) − m).
- Stop after `--em-iters` rounds (default 10, the paper's number of EM iterations) or
  when no user moves. A model left without users keeps its weights (a warning says so).

The margin m is the pair's `margin` field only with `--margin`, in both steps (the
M-step's RewardTrainer loss −log σ(r_c − r_r − m) and the E-step's log-likelihood), so
the E-step scores users with the likelihood the M-step maximises; by default m = 0 in
both (plain Bradley-Terry). alignkit.json records `"margin_used"`.

Folder layout (no config.json at the top, so a plain `rm:` loader refuses it):
`model-0/` .. `model-{K-1}/` (plain AutoModelForSequenceClassification folders, LoRA
merged), `assignment.json` ({user: k}), `alignkit.json` with `"rm_method": "maxmin"`, `k`.
Scoring (`MaxMinRewardModel`) aggregates the K rewards with `min` (the MaxMin
objective's per-sample min_k r_k), `mean`, or `user` (the model of the item's user).

Resume: the EM state (iteration, assignment, finished M-steps and their weights) is kept
in OUT.partial/em/; `--resume` skips finished M-steps and continues the interrupted one
from its checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import console
from ..errors import UsageError
from .common import (dataset, evaluate, now, pair_scores, report, reward_config, save_seq_cls,
                     seed_everything, tokenize_pairs, train_eval_sets, train_metrics, use_margin,
                     user_of, write_folder)
from .inference import METHOD_KEY, folder_info, seq_cls_rewards

if TYPE_CHECKING:
    from . import RMConfig

NAME = "maxmin"  # the "rm_method" of this layout
AGGREGATES = ("min", "mean", "user")  # the first is the default: the MaxMin objective
ASSIGNMENT = "assignment.json"


def initial_assignment(users: list[str], k: int) -> dict[str, int]:
    return {u: i % k for i, u in enumerate(sorted(users))}


def e_step(loglik: dict[str, list[float]]) -> dict[str, int]:
    """Each user to the model with the highest summed log σ(margin) (lowest index on ties)."""
    return {u: max(range(len(v)), key=lambda k: (v[k], -k)) for u, v in loglik.items()}


def user_logliks(records: list[dict], margins: list[list[float]],
                 offsets: Sequence[float] | None = None) -> dict[str, list[float]]:
    """Σ_{pairs of u} log σ(r_k(c) − r_k(r) − m_i) per user and model; margins[k][i] is
    r_k(c) − r_k(r) of pair i and offsets[i] its margin m_i (None: 0, plain BT)."""
    out: dict[str, list[float]] = {}
    for i, r in enumerate(records):
        row = out.setdefault(user_of(r), [0.0] * len(margins))
        off = 0.0 if offsets is None else offsets[i]
        for k, per_pair in enumerate(margins):
            m = per_pair[i] - off
            row[k] += -math.log1p(math.exp(-m)) if m > -30 else m  # log σ(m), stable
    return out


class _State:
    """EM progress in OUT.partial/em/state.json (for --resume)."""

    def __init__(self, work: Path):
        self.dir = work / "em"
        self.path = self.dir / "state.json"

    def load(self) -> dict | None:
        return json.loads(self.path.read_text()) if self.path.exists() else None

    def save(self, state: dict) -> None:
        from ..training import is_main_process
        if not is_main_process():  # one writer under a distributed launch
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.path)

    def model_dir(self, k: int) -> Path:
        return self.dir / f"model-{k}"


def train(pairs: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Hard-EM over K BT reward models; write the mixture folder."""
    from trl import RewardTrainer

    from ..models import load_seq_cls
    from ..training import is_main_process, lora_config, prepare_run, refuse_sharded, run_trainer

    refuse_sharded("train-rm --method maxmin")  # K models, scored between M-steps
    started = now()
    data, train_recs, eval_recs, inputs = train_eval_sets(pairs, cfg, opts.seed,
                                                          need_user=NAME)
    users = sorted({user_of(r) for r in data.records})
    if len(users) < cfg.k:
        console.warn(f"{len(users)} user(s) for --k {cfg.k}: some models get no users")
    work = prepare_run(out, opts)
    store = _State(work)
    state = (store.load() if opts.resume else None) or {
        "iteration": 0, "done": [], "assign": initial_assignment(users, cfg.k), "history": [],
        "train": {}}

    models, tok = [], None
    for k in range(cfg.k):
        seed_everything(opts.seed + k)  # distinct fresh heads
        src = store.model_dir(k) if store.model_dir(k).exists() else model_spec
        m, tok = load_seq_cls(src, opts.dtype)
        models.append(m)

    margin = use_margin(cfg, train_recs)
    rows = tokenize_pairs(tok, train_recs, opts.max_length, margin=margin)
    kept = [train_recs[row["index"]] for row in rows]
    offsets = [row["margin"] for row in rows] if margin else None  # the M-step's m
    while state["iteration"] < cfg.em_iters:
        it = state["iteration"]
        for k in range(cfg.k):
            if k in state["done"]:
                continue
            mine = [row for row, r in zip(rows, kept) if state["assign"][user_of(r)] == k]
            if not mine:
                console.warn(f"EM round {it}: model {k} has no users; its weights are kept")
            else:
                console.info(f"EM round {it}: training model {k} on {len(mine)} pair(s) of "
                             f"{sum(v == k for v in state['assign'].values())} user(s)")
                sub = work / f"em{it}-model{k}"
                if is_main_process():  # (another rank making it could race prepare_run)
                    sub.mkdir(parents=True, exist_ok=True)
                seed_everything(opts.seed + 1000 * it + k)
                # LoRA: a fresh adapter per M-step, merged after it, so every M-step
                # starts from the weights saved in OUT.partial/em/ (what --resume loads).
                trainer = RewardTrainer(
                    model=models[k], args=reward_config(opts, sub, cfg, seed=opts.seed + k),
                    train_dataset=dataset(mine), processing_class=tok,
                    peft_config=lora_config(opts, "SEQ_CLS"))
                run_trainer(trainer, sub, opts.resume)
                models[k] = trainer.model
                if hasattr(models[k], "merge_and_unload"):
                    models[k] = models[k].merge_and_unload()
                state["train"][f"model-{k}"] = train_metrics(trainer)
            _save_model(models[k], tok, store.model_dir(k))
            state["done"].append(k)
            store.save(state)
        margins = []
        for m in models:
            c, r = pair_scores(lambda p, cc, u: seq_cls_rewards(m, tok, p, cc,
                                                                max_length=opts.max_length), kept)
            margins.append([a - b for a, b in zip(c, r)])
        ll = user_logliks(kept, margins, offsets)
        new = e_step(ll)
        moved = sum(new[u] != state["assign"][u] for u in new)
        total = sum(v[new[u]] for u, v in ll.items())
        console.info(f"EM round {it}: {moved} user(s) moved; log-likelihood {total:.3f}")
        state["history"].append({"em_iter": it, "users_moved": moved, "loglik": round(total, 6),
                                 "users_per_model": _sizes(new, cfg.k)})
        state.update(iteration=it + 1, done=[], assign={**state["assign"], **new})
        store.save(state)
        if moved == 0:
            break

    mix = MaxMinRewardModel(models, tok, state["assign"], aggregate="user",
                            max_length=opts.max_length)
    metrics = evaluate(mix.score, eval_recs, with_users=True)
    if metrics:
        for agg in ("min", "mean"):
            mix.aggregate = agg
            metrics[f"accuracy_{agg}"] = evaluate(mix.score, eval_recs)["accuracy"]
        mix.aggregate = "user"
    report(metrics, "held-out (each user's model)")
    _write_metrics(work, state["history"], cfg.k)
    info = {METHOD_KEY: NAME, "backbone": model_spec, "k": cfg.k, "margin_used": margin,
            "assignment": state["assign"], "em_history": state["history"],
            "rm_options": cfg.as_dict(), "train_options": opts.as_dict(),
            "metrics": {"heldout": metrics, "train": state["train"]},
            "counts": {"pairs": len(data.records), "train": len(rows), "heldout": len(eval_recs),
                       "users": len(users), "users_per_model": _sizes(state["assign"], cfg.k)}}

    def write(tmp: Path) -> None:
        for k in range(cfg.k):
            shutil.copytree(store.model_dir(k), tmp / f"model-{k}")
        (tmp / ASSIGNMENT).write_text(json.dumps(state["assign"], indent=1, sort_keys=True) + "\n")

    write_folder(out, work, force=opts.force, write=write, info=info, started=started,
                 seed=opts.seed, inputs=inputs)
    return {"heldout": metrics}


def _sizes(assign: dict[str, int], k: int) -> list[int]:
    return [sum(v == j for v in assign.values()) for j in range(k)]


def _write_metrics(work: Path, history: list[dict], k: int) -> None:
    """metrics.jsonl: each M-step's trainer lines tagged (em_iter, model), then the
    E-step line of that round (the main process writes it)."""
    from ..training import is_main_process
    if not is_main_process():
        return
    with open(work / "metrics.jsonl", "w", encoding="utf-8") as f:
        for h in history:
            it = h["em_iter"]
            for j in range(k):
                src = work / f"em{it}-model{j}" / "metrics.jsonl"
                if src.exists():
                    for line in src.read_text(encoding="utf-8").splitlines():
                        if line.strip():
                            f.write(json.dumps({"em_iter": it, "model": j, **json.loads(line)})
                                    + "\n")
            f.write(json.dumps({"event": "e_step", **h}) + "\n")


def _save_model(model, tok, folder: Path) -> None:
    """Weights after an M-step: written beside, then swapped in (by the main process;
    every rank holds the same weights and waits for it)."""
    from ..training import barrier, is_main_process
    if is_main_process():
        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_seq_cls(model, tok, tmp)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
    barrier()


def load_folder(folder: str | Path, *, user: str | None = None, aggregate: str | None = None,
                dtype: str = "auto", device: str | None = None,
                max_length: int = 1024) -> "MaxMinRewardModel":
    """The loader of this layout (see `inference.load_reward_model`); `aggregate` None is
    min, the MaxMin objective."""
    return MaxMinRewardModel.load(folder, aggregate=aggregate or AGGREGATES[0], user=user,
                                  dtype=dtype, device=device, max_length=max_length)


class MaxMinRewardModel:
    """Scores with the K models: `score(prompts, completions, users=None)`.

    aggregate `min` (min_k r_k), `mean` (mean_k r_k) or `user` (r of the model assigned
    to the item's user: the entry of `users`, else the `user` given at load time).
    """

    def __init__(self, models: list, tokenizer, assignment: dict[str, int], *,
                 aggregate: str = "mean", user: str | None = None, max_length: int = 1024):
        if aggregate not in AGGREGATES:
            raise UsageError(f"aggregate must be one of {', '.join(AGGREGATES)}, got {aggregate!r}")
        self.models, self.tokenizer, self.assignment = models, tokenizer, assignment
        self.aggregate, self.user, self.max_length = aggregate, user, max_length
        if user is not None:
            self._model_of(user)

    def _model_of(self, user: Any) -> int:
        key = str(user)
        if key not in self.assignment:
            shown = ", ".join(sorted(self.assignment)[:10])
            raise UsageError(f"user {key!r} is not in this maxmin model (known: {shown})")
        return self.assignment[key]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        per = [seq_cls_rewards(m, self.tokenizer, prompts, completions,
                               max_length=self.max_length) for m in self.models]
        if self.aggregate == "min":
            return [min(v) for v in zip(*per)]
        if self.aggregate == "mean":
            return [sum(v) / len(v) for v in zip(*per)]
        out = []
        for i in range(len(prompts)):
            u = users[i] if users is not None and users[i] is not None else self.user
            if u is None:
                raise UsageError("aggregate 'user' needs a user id (meta.user or --user)")
            out.append(per[self._model_of(u)][i])
        return out

    @classmethod
    def load(cls, folder: str | Path, *, aggregate: str = "mean", user: str | None = None,
             dtype: str = "auto", device: str | None = None,
             max_length: int = 1024) -> "MaxMinRewardModel":
        from ..models import load_seq_cls
        folder = Path(folder)
        info = folder_info(folder)
        if info.get(METHOD_KEY) != NAME:
            raise UsageError(f"{folder}: not a maxmin reward-model folder")
        models, tok = [], None
        for k in range(int(info["k"])):
            m, tok = load_seq_cls(folder / f"model-{k}", dtype)
            if device:
                m.to(device)
            models.append(m)
        assignment = json.loads((folder / ASSIGNMENT).read_text())
        return cls(models, tok, assignment, aggregate=aggregate, user=user,
                   max_length=max_length)
