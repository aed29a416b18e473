"""`pal`: a pluralistic reward model, PAL-B form (ALGORITHMS.md Part B §5; RamyaLab's
`pal_rm_b`). TRL has no such model or loss: the loss is a Trainer subclass here.

K preference prototypes g_1..g_K (two-layer GELU MLPs over the prompt's pooled hidden
state), an item projector f (same shape, over the pooled hidden state of prompt +
completion) and per-user mixture weights w_i = softmax(W_i), W_i ~ N(0, I):

    r_i(x, y) = κ · cos(f(y), Σ_k w_ik g_k(x)),   κ = exp(logit_scale) ≤ 100 (init 1/0.07)

Loss: the 2-way cross-entropy over (r_chosen, r_rejected) = −log σ(r_c − r_r).
Learning rates per part: backbone `--lr`, projectors `--head-lr` (weight decay 0.01),
W `--user-lr`, logit_scale 0.1 (the paper's value). The defaults of `--head-lr` (1e-3)
and `--user-lr` (0.2) are higher than the paper's (1e-4, 5e-3), which trains far longer:
with smaller values a short run leaves the user weights near their random start (seen
on the two-group synthetic task, tiny-llama, 2 epochs: 0.5 mean per-user accuracy with
`--user-lr` 5e-2, 1.0 with 0.2 for three seeds).

Deviation from the paper: rewards are computed once per sequence from a pooled hidden
state (mean over tokens for encoders, the last token for causal LMs), not per token
from the first diverging token with cumulative weighting.

`--adapt-users` (the paper's few-shot "unseen user" setting): `--model` is a pal
folder; only the rows of W of users not in it are trained, from their pairs, with the
backbone and all projectors frozen; the pairs of known users are skipped. New users
start at W = 0 (the uniform mixture) rather than N(0, I), so a few pairs need not first
undo a random preference.

Folder layout (no config.json at the top, so it is never mistaken for a plain RM):
`backbone/` (a transformers AutoModel folder + tokenizer), `pal.safetensors` (projectors,
W, logit_scale), `users.json` (W's row order), `alignkit.json` with `"rm_method": "pal"`,
`k`, `dim`, `pooling`, `hidden`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .. import console
from ..errors import UsageError
from ..io import file_sha256
from .common import (LoggedMetrics, bt_losses, dataset, evaluate, now, pad_batch, pair_stats,
                     report, seed_everything, tokenize_pairs, train_eval_sets, train_metrics,
                     training_args, user_of, write_folder)
from .inference import METHOD_KEY, folder_info, render, render_prompts, token_ids

if TYPE_CHECKING:
    from . import RMConfig

NAME = "pal"  # the "rm_method" of this layout
WEIGHTS = "pal.safetensors"
USERS = "users.json"
LOGIT_SCALE_LR = 0.1


def _torch():
    import torch
    return torch


def build_model_class():
    """The PAL-B module (defined lazily: torch is imported only when training/scoring)."""
    torch = _torch()
    nn = torch.nn
    F = torch.nn.functional

    def mlp(hidden: int, dim: int):
        return nn.Sequential(nn.Linear(hidden, dim), nn.GELU(), nn.Linear(dim, dim))

    class PALModel(nn.Module):
        """r_i(x, y) = κ·cos(f(h(x, y)), Σ_k softmax(W_i)_k g_k(h(x)))."""

        def __init__(self, backbone, hidden: int, k: int, dim: int, n_users: int,
                     pooling: str, generator=None):
            super().__init__()
            self.backbone = backbone
            self.pooling = pooling
            self.item = mlp(hidden, dim)
            self.prototypes = nn.ModuleList(mlp(hidden, dim) for _ in range(k))
            self.user_logits = nn.Parameter(torch.randn(n_users, k, generator=generator))
            self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
            self.n_frozen_users = 0

        def pooled(self, ids, mask):
            frozen = not any(p.requires_grad for p in self.backbone.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                h = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
            h = h.float()
            if self.pooling == "mean":
                m = mask.unsqueeze(-1).to(h.dtype)
                return (h * m).sum(1) / m.sum(1).clamp(min=1)
            last = (mask.sum(1) - 1).clamp(min=0)
            return h[torch.arange(h.shape[0], device=h.device), last]

        def weights(self):
            """softmax(W) for every user; rows of frozen (known) users get no gradient."""
            W = self.user_logits
            n = self.n_frozen_users
            if n:
                W = torch.cat([W[:n].detach(), W[n:]], 0)
            return W.softmax(-1)

        def preference(self, prompt_h, w):
            g = torch.stack([p(prompt_h) for p in self.prototypes], 1)  # (B, K, d)
            return (w.unsqueeze(-1) * g).sum(1)

        def reward(self, item_h, pref):
            kappa = self.logit_scale.exp().clamp(max=100.0)
            return kappa * F.cosine_similarity(self.item(item_h), pref, dim=-1)

        def forward(self, input_ids, attention_mask, prompt_ids, prompt_mask, user):
            n = user.shape[0]
            pref = self.preference(self.pooled(prompt_ids, prompt_mask), self.weights()[user])
            r = self.reward(self.pooled(input_ids, attention_mask), torch.cat([pref, pref], 0))
            return r[:n], r[n:]

    return PALModel


def _collator(pad_id: int):
    torch = _torch()

    def collate(rows: list[dict]) -> dict:
        ids, mask = pad_batch([r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows],
                              pad_id)
        pids, pmask = pad_batch([r["prompt_ids"] for r in rows], pad_id)
        return {"input_ids": ids, "attention_mask": mask, "prompt_ids": pids,
                "prompt_mask": pmask, "user": torch.tensor([r["user"] for r in rows])}
    return collate


def make_trainer(model, args, rows, pad_id: int, cfg: RMConfig):
    """A transformers Trainer with the PAL-B loss and per-part learning rates."""
    from transformers import Trainer
    torch = _torch()

    class PALTrainer(LoggedMetrics, Trainer):
        """PAL-B pairwise loss −log σ(r_u(x, y_c) − r_u(x, y_r)) with user mixture
        weights (TRL has no pluralistic reward model or loss)."""

        loss_is_scaled_for_ga = False

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            rc, rr = model(**inputs)
            loss = bt_losses(rc, rr).mean()
            self.note(**pair_stats(rc.detach(), rr.detach()),
                      kappa=self.accelerator.unwrap_model(model).logit_scale.exp()
                      .clamp(max=100.0).item())
            return (loss, {"chosen": rc, "rejected": rr}) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                m = self.model
                head = [p for mod in (m.item, m.prototypes) for p in mod.parameters()
                        if p.requires_grad]
                groups = [
                    {"params": [p for p in m.backbone.parameters() if p.requires_grad],
                     "lr": self.args.learning_rate, "weight_decay": 0.0},
                    {"params": head, "lr": cfg.head_lr, "weight_decay": 0.01},
                    {"params": [m.user_logits], "lr": cfg.user_lr, "weight_decay": 0.0},
                    {"params": [m.logit_scale] if m.logit_scale.requires_grad else [],
                     "lr": LOGIT_SCALE_LR, "weight_decay": 0.0},
                ]
                self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]])
            return self.optimizer

    return PALTrainer(model=model, args=args, train_dataset=dataset(rows),
                      data_collator=_collator(pad_id))


# --- training -------------------------------------------------------------------------

def _pooling(config) -> str:
    arch = " ".join(getattr(config, "architectures", None) or [])
    return "last" if "ForCausalLM" in arch else "mean"


def _load_backbone(spec, dtype: str):
    from transformers import AutoConfig, AutoModel
    from trl.trainer.utils import disable_dropout_in_model

    from ..models import load_tokenizer, resolve, torch_dtype
    folder = resolve(spec)
    config = AutoConfig.from_pretrained(folder)
    backbone = AutoModel.from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True)
    disable_dropout_in_model(backbone)
    return backbone, load_tokenizer(folder), config


def train(pairs: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Train a PAL-B model (or, with cfg.adapt_users, fit new users' weights)."""
    from ..training import refuse_sharded
    refuse_sharded("train-rm --method pal")  # its own layout, saved part by part
    if cfg.adapt_users:
        return adapt_users(pairs, model_spec, out, opts, cfg)
    from ..training import lora_config, prepare_run
    torch = _torch()

    started = now()
    data, train_recs, eval_recs, inputs = train_eval_sets(pairs, cfg, opts.seed, need_user=NAME)
    users = sorted({user_of(r) for r in data.records})
    work = prepare_run(out, opts)
    seed_everything(opts.seed)
    backbone, tok, config = _load_backbone(model_spec, opts.dtype)
    peft = lora_config(opts, "FEATURE_EXTRACTION")
    if peft is not None:
        from peft import get_peft_model
        backbone = get_peft_model(backbone, peft)
    hidden = backbone.config.hidden_size
    gen = torch.Generator().manual_seed(opts.seed)
    model = build_model_class()(backbone, hidden, cfg.k, cfg.pal_dim, len(users),
                                _pooling(config), generator=gen)
    trainer, rows = _fit(model, tok, users, train_recs, opts, cfg, work)
    if peft is not None:
        model.backbone = model.backbone.merge_and_unload()
    rm = PALRewardModel(model, tok, users, max_length=opts.max_length)
    metrics = evaluate(rm.score, eval_recs, with_users=True)
    report(metrics)
    info = _info(model, model_spec, opts, cfg, metrics, trainer, data, rows, eval_recs)
    write_folder(out, work, force=opts.force, write=lambda tmp: rm.save(tmp), info=info,
                 started=started, seed=opts.seed, inputs=inputs)
    return {"heldout": metrics}


def _fit(model, tok, users: list[str], records: list[dict], opts, cfg: RMConfig, work: Path):
    """Train `model` on `records` (W rows in `users` order); return (trainer, rows)."""
    from ..training import run_trainer
    index = {u: i for i, u in enumerate(users)}
    rows = tokenize_pairs(tok, records, opts.max_length, with_prompt=True, user_index=index)
    trainer = make_trainer(model, training_args(opts, work), rows, tok.pad_token_id, cfg)
    run_trainer(trainer, work, opts.resume)
    return trainer, rows


def _info(model, backbone_spec, opts, cfg, metrics, trainer, data, rows, eval_recs,
          **extra) -> dict:
    return {METHOD_KEY: NAME, "backbone": backbone_spec, "margin_used": False,  # no margin term
            "k": len(model.prototypes),
            "dim": model.item[-1].out_features, "pooling": model.pooling,
            "hidden": model.item[0].in_features, "rm_options": cfg.as_dict(),
            "train_options": opts.as_dict(),
            "metrics": {"heldout": metrics, "train": train_metrics(trainer)},
            "counts": {"pairs": len(data.records), "train": len(rows), "heldout": len(eval_recs),
                       "users": int(model.user_logits.shape[0])}, **extra}


def adapt_users(pairs: str, pal_folder: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Fit W rows of the users in `pairs` that `pal_folder` does not know; everything
    else stays frozen. Writes a new pal folder holding all users."""
    from ..training import prepare_run
    torch = _torch()

    started = now()
    data, train_recs, eval_recs, inputs = train_eval_sets(pairs, cfg, opts.seed, need_user=NAME)
    known = set(json.loads((Path(pal_folder) / USERS).read_text()))
    new_users = sorted({user_of(r) for r in data.records} - known)
    if not new_users:
        raise UsageError(f"--adapt-users: every user in {data.path} is already in {pal_folder}")
    skipped = sum(user_of(r) in known for r in train_recs)
    if skipped:
        console.warn(f"--adapt-users: {skipped} training pair(s) of users already in "
                     f"{pal_folder} were skipped (only new users are fitted)")
    train_recs = [r for r in train_recs if user_of(r) not in known]
    eval_recs = [r for r in eval_recs if user_of(r) not in known]
    work = prepare_run(out, opts)
    seed_everything(opts.seed)
    base = PALRewardModel.load(pal_folder, dtype=opts.dtype)
    model, tok = base.model, base.tokenizer
    for p in model.parameters():
        p.requires_grad_(False)
    n_old, k = model.user_logits.shape
    fresh = torch.zeros(len(new_users), k)  # the uniform mixture: no random side to undo
    model.user_logits = torch.nn.Parameter(torch.cat([model.user_logits.data, fresh], 0))
    model.n_frozen_users = n_old
    users = base.users + new_users
    trainer, rows = _fit(model, tok, users, train_recs, opts, cfg, work)
    model.n_frozen_users = 0
    rm = PALRewardModel(model, tok, users, max_length=opts.max_length)
    metrics = evaluate(rm.score, eval_recs, with_users=True)
    report(metrics, "held-out (new users)")
    info = _info(model, folder_info(pal_folder).get("backbone"), opts, cfg, metrics, trainer,
                 data, rows, eval_recs, adapted_from=str(pal_folder), new_users=new_users)
    inputs[str(Path(pal_folder) / WEIGHTS)] = file_sha256(Path(pal_folder) / WEIGHTS)
    write_folder(out, work, force=opts.force, write=lambda tmp: rm.save(tmp), info=info,
                 started=started, seed=opts.seed, inputs=inputs)
    return {"heldout": metrics}


# --- scoring ----------------------------------------------------------------------------

def load_folder(folder: str | Path, *, user: str | None = None, aggregate: str | None = None,
                dtype: str = "auto", device: str | None = None,
                max_length: int = 1024) -> "PALRewardModel":
    """The loader of this layout (see `inference.load_reward_model`; `aggregate` unused)."""
    return PALRewardModel.load(folder, user=user, dtype=dtype, device=device,
                               max_length=max_length)


class PALRewardModel:
    """Scores with a PAL-B model: `score(prompts, completions, users=None)`.

    Each item is scored with its user's mixture weights: the entry of `users` when
    given, else the `user` chosen at load time, else the mean of all known users'
    weights (the population's mixture).
    """

    def __init__(self, model, tokenizer, users: list[str], *, user: str | None = None,
                 max_length: int = 1024, batch_size: int = 16):
        self.model, self.tokenizer, self.users = model, tokenizer, list(users)
        self.index = {u: i for i, u in enumerate(self.users)}
        self.max_length, self.batch_size = max_length, batch_size
        self.user = None if user is None else self._row(user)

    def _row(self, user: Any) -> int:
        key = str(user)
        if key not in self.index:
            shown = ", ".join(self.users[:10]) + (" ..." if len(self.users) > 10 else "")
            raise UsageError(f"user {key!r} is not in this pal model (known: {shown}); fit "
                             "new users with `train-rm --method pal --adapt-users`")
        return self.index[key]

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        torch = _torch()
        m = self.model
        m.eval()
        device = next(m.parameters()).device
        tok = self.tokenizer
        texts = token_ids(tok, render(tok, prompts, completions))
        ptexts = token_ids(tok, render_prompts(tok, prompts))
        out: list[float] = []
        with torch.inference_mode():
            W = m.weights()
            mean_w = W.mean(0)
            for s in range(0, len(texts), self.batch_size):
                sl = slice(s, s + self.batch_size)
                w = []
                for j in range(s, min(s + self.batch_size, len(texts))):
                    u = users[j] if users is not None and users[j] is not None else None
                    row = self._row(u) if u is not None else self.user
                    w.append(mean_w if row is None else W[row])
                ids, mask = pad_batch([t[:self.max_length] for t in texts[sl]], tok.pad_token_id)
                pids, pmask = pad_batch([t[:self.max_length] for t in ptexts[sl]], tok.pad_token_id)
                pref = m.preference(m.pooled(pids.to(device), pmask.to(device)), torch.stack(w))
                r = m.reward(m.pooled(ids.to(device), mask.to(device)), pref)
                out.extend(float(v) for v in r.float().tolist())
        return out

    def save(self, folder: Path) -> None:
        from safetensors.torch import save_file
        m = self.model
        m.backbone.save_pretrained(folder / "backbone", safe_serialization=True)
        self.tokenizer.save_pretrained(folder / "backbone")
        state = {k: v.detach().cpu().contiguous() for k, v in m.state_dict().items()
                 if not k.startswith("backbone.")}
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt"})
        (folder / USERS).write_text(json.dumps(self.users, ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, folder: str | Path, *, user: str | None = None, dtype: str = "auto",
             device: str | None = None, max_length: int = 1024) -> "PALRewardModel":
        from safetensors.torch import load_file
        folder = Path(folder)
        info = folder_info(folder)
        if info.get(METHOD_KEY) != NAME or not (folder / WEIGHTS).exists():
            raise UsageError(f"{folder}: not a pal reward-model folder")
        backbone, tok, _ = _load_backbone(folder / "backbone", dtype)
        users = json.loads((folder / USERS).read_text())
        model = build_model_class()(backbone, int(info["hidden"]), int(info["k"]),
                                    int(info["dim"]), len(users), info["pooling"])
        missing, unexpected = model.load_state_dict(load_file(str(folder / WEIGHTS)), strict=False)
        if unexpected or [k for k in missing if not k.startswith("backbone.")]:
            raise UsageError(f"{folder}/{WEIGHTS}: does not match alignkit.json "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        if device:
            model.to(device)
        model.eval()
        return cls(model, tok, users, user=user, max_length=max_length)
