"""`value`: a token-level value model for Value Augmented Sampling (VAS; ALGORITHMS.md
Part B §12 and Part D §13).

VAS (arXiv 2405.06639) steers a frozen policy at decoding time with a value function
V(s) of the partial completion s, trained on samples of that frozen policy; the policy
itself is never trained. This module trains V and loads it as a guide for the sampler
(`alignkit.generation`, `--value-guide DIR[:BETA]` in gen-pairs and eval).

Model: a causal LM backbone (`AutoModel`, e.g. LlamaModel: hidden states and a KV
cache) plus a linear head hidden -> 1, applied at every token. V(t), the value at the
position of completion token t, is the value of the state "prompt + tokens 0..t". We
use a bare backbone + head rather than AutoModelForTokenClassification because the
latter returns no KV cache, which guided decoding needs.

Targets (TRL's VAS branch reading, Part D §13): the reward is the completion's `score`
(or `scores[KEY]` with --reward-key KEY) at its last token, 0 elsewhere;
δ_t = r_t + γ·V_old(t+1) − V_old(t) with V_old(T) = 0; A_t = Σ_l (γλ)^l δ_{t+l};
R_t = A_t + V_old(t), where V_old comes from a no-grad pass at the start of each epoch
(`td_lambda_targets`). Loss ½·mean over tokens of (V(t) − R_t)², Adam, no clipping.
The head starts at V ≡ the mean training reward (zero weights, that bias), so the
first epoch's targets bootstrap from an unbiased V_old: from a random head, a short
run (one epoch or less) leaves every non-final token near the head's random output
while the final token learns the reward, and a guide then mostly rewards ending.
Defaults γ = 1, λ = 0.95. Simplifications: no reward whitening; --epochs is rounded
up to whole epochs (TRL's VAS uses 2); no LoRA and no --resume (a small hand-written
loop, not a HF Trainer). The held-out metric is the terminal value's MSE against the
reward (`eval_split` of the records, whole prompts held out).

Input: samples records (`gen-pairs` then `score`): completions' text is tokenized as
the sampler and the trainers do (`generation.encode_pair`, EOS appended when the
completion's `finished` is not false), cut to --max-length.

Folder (own layout, `"rm_method": "value"` in alignkit.json): `backbone/` (the
backbone and its tokenizer) and `value_head.safetensors`. `load_folder(...).score(...)`
is the terminal value V(T−1) (a reward-model interface for `rm:` style use);
`load_guide(folder, beta)` gives the sampler's guide object.
"""
from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ..errors import DataError, UsageError

if TYPE_CHECKING:
    from . import RMConfig

NAME = "value"
HEAD = "value_head.safetensors"
FLAG = "--value-guide"


# --- the targets (pure) ----------------------------------------------------------------

def td_lambda_targets(values: Sequence[float], reward: float, gamma: float = 1.0,
                      lam: float = 0.95) -> list[float]:
    """GAE returns R_t = A_t + V(t) of one completion of T tokens: reward at t = T−1,
    V(T) = 0, δ_t = r_t + γ·V(t+1) − V(t), A_t = δ_t + γλ·A_{t+1}."""
    T = len(values)
    out = [0.0] * T
    adv = 0.0
    for t in reversed(range(T)):
        r = float(reward) if t == T - 1 else 0.0
        nxt = float(values[t + 1]) if t + 1 < T else 0.0
        delta = r + gamma * nxt - float(values[t])
        adv = delta + gamma * lam * adv
        out[t] = adv + float(values[t])
    return out


# --- the model -------------------------------------------------------------------------

def build_model_class():
    import torch

    class ValueModel(torch.nn.Module):
        """backbone (hidden states + KV cache) and a linear head: one value per token."""

        def __init__(self, backbone, hidden: int):
            super().__init__()
            self.backbone = backbone
            self.head = torch.nn.Linear(hidden, 1)

        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None,
                    use_cache: bool = False):
            from ..generation import cache_kw, out_cache
            kw = {cache_kw(self.backbone): cache} if cache is not None else {}
            out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                                position_ids=position_ids, use_cache=use_cache, **kw)
            h = out.last_hidden_state
            v = self.head(h.to(self.head.weight.dtype)).squeeze(-1).float()
            return v, (out_cache(out) if use_cache else None)

    return ValueModel


def _load_backbone(spec, dtype: str):
    from transformers import AutoModel

    from ..models import load_tokenizer, resolve, torch_dtype
    folder = resolve(spec)
    backbone = AutoModel.from_pretrained(folder, dtype=torch_dtype(dtype), use_safetensors=True)
    return backbone, load_tokenizer(folder)


# --- the data ----------------------------------------------------------------------------

def read_samples(path: str, reward_key: str | None) -> tuple[list[dict], str]:
    """[{prompt, text, finished, reward, group}] from a samples file (strict reader);
    a completion without the reward -> DataError at file:line:field. Returns (items, sha)."""
    from ..io import read_records
    reader = read_records(path, "samples")
    items = []
    for g, rec in enumerate(reader):
        for j, c in enumerate(rec["completions"]):
            where = f"completions[{j}]." + ("score" if reward_key is None else f"scores.{reward_key}")
            r = c.get("score") if reward_key is None else (c.get("scores") or {}).get(reward_key)
            if not isinstance(r, (int, float)) or isinstance(r, bool) or not math.isfinite(r):
                raise DataError("missing reward (run `alignkit score` first"
                                + (", or pass --reward-key" if reward_key is None else "") + ")",
                                reader.name, reader.line, where)
            items.append({"prompt": rec["prompt"], "text": c["text"], "reward": float(r),
                          "finished": c.get("finished") is not False, "group": g})
    return items, reader.sha256 or ""


def _tokenize(tok, items: list[dict], max_length: int) -> list[tuple[list[int], int]]:
    """(ids of prompt + completion, number of completion tokens kept) per item."""
    from ..text import encode_pair, render_prompt
    rows = []
    for it in items:
        p, c = encode_pair(tok, render_prompt(tok, it["prompt"]), it["text"], it["finished"])
        c = c[:max(1, max_length - len(p))]
        p = p[-max(1, max_length - len(c)):]
        rows.append((p + c, len(c)))
    return rows


def _values(model, rows, pad: int, device, grad: bool = False):
    """Per-row values of the completion positions (list of 1-D tensors)."""
    import torch
    from ..generation import left_pad
    ids, mask, pos = left_pad([r[0] for r in rows], pad, device)
    with torch.enable_grad() if grad else torch.no_grad():
        v, _ = model(ids, attention_mask=mask, position_ids=pos)
    return [v[b, v.shape[1] - n:] for b, (_, n) in enumerate(rows)]


# --- training ------------------------------------------------------------------------------

def train(path: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Fit a value model on samples records of the frozen policy; writes the folder."""
    import torch

    from ..training import prepare_run, refuse_sharded
    from .common import now, seed_everything, write_folder
    refuse_sharded("train-rm --method value")
    if opts.lora_r:
        raise UsageError("--method value trains the full backbone; drop --lora-r")
    if opts.resume:
        raise UsageError("--method value cannot --resume (a short hand-written loop)")
    started = now()
    items, sha = read_samples(path, cfg.reward_key)
    groups = sorted({it["group"] for it in items})
    rng = random.Random(opts.seed)
    n_eval = int(len(groups) * cfg.eval_split) if len(groups) > 1 else 0
    held = set(rng.sample(groups, n_eval))
    train_items = [it for it in items if it["group"] not in held]
    eval_items = [it for it in items if it["group"] in held]
    work = prepare_run(out, opts)
    seed_everything(opts.seed)
    backbone, tok = _load_backbone(model_spec, opts.dtype)
    model = build_model_class()(backbone, backbone.config.hidden_size)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    rows = _tokenize(tok, train_items, opts.max_length)
    rewards = [it["reward"] for it in train_items]
    with torch.no_grad():  # V_old ≡ mean reward at the start: the first epoch's TD(λ)
        model.head.weight.zero_()  # targets bootstrap from it, not from a random head
        model.head.bias.fill_(sum(rewards) / max(1, len(rewards)))
    optim = torch.optim.Adam(model.parameters(), lr=opts.lr)
    bs, step, log = opts.batch_size, 0, []
    for epoch in range(max(1, math.ceil(opts.epochs))):
        model.eval()  # V_old: a no-grad pass before the epoch
        targets = []
        for s in range(0, len(rows), bs):
            for v, r in zip(_values(model, rows[s:s + bs], pad, device),
                            rewards[s:s + bs]):
                targets.append(torch.tensor(td_lambda_targets(v.tolist(), r, cfg.gamma, cfg.lam)))
        model.train()
        order = list(range(len(rows)))
        random.Random(opts.seed + epoch).shuffle(order)
        for s in range(0, len(order), bs):
            idx = order[s:s + bs]
            vs = _values(model, [rows[i] for i in idx], pad, device, grad=True)
            v = torch.cat(vs)
            R = torch.cat([targets[i] for i in idx]).to(v)
            loss = 0.5 * ((v - R) ** 2).mean()
            optim.zero_grad()
            loss.backward()
            optim.step()
            step += 1
            log.append({"step": step, "epoch": epoch, "loss": float(loss.detach())})
            if 0 < opts.max_steps <= step:
                break
        if 0 < opts.max_steps <= step:
            break
    model.eval()
    with open(work / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in log)
    metrics = _terminal_mse(model, tok, eval_items, opts.max_length, pad, device)
    train_mse = _terminal_mse(model, tok, train_items, opts.max_length, pad, device)
    info = {"rm_method": NAME, "backbone": model_spec, "hidden": backbone.config.hidden_size,
            "rm_options": cfg.as_dict(), "train_options": opts.as_dict(),
            "targets": {"kind": "gae", "gamma": cfg.gamma, "lam": cfg.lam,
                        "reward": cfg.reward_key or "score"},
            "metrics": {"heldout": metrics, "train": {"terminal_mse": train_mse, "steps": step,
                                                      "loss": log[-1]["loss"] if log else None}},
            "counts": {"completions": len(items), "train": len(train_items),
                       "heldout": len(eval_items)}}

    def write(tmp: Path) -> None:
        from safetensors.torch import save_file
        model.backbone.save_pretrained(tmp / "backbone", safe_serialization=True)
        tok.save_pretrained(tmp / "backbone")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.head.state_dict().items()},
                  str(tmp / HEAD), metadata={"format": "pt"})
    write_folder(out, work, force=opts.force, write=write, info=info, started=started,
                 seed=opts.seed, inputs={path: sha} if path != "-" else {})
    return {"heldout": metrics}


def _terminal_mse(model, tok, items, max_length, pad, device):
    if not items:
        return None
    rows = _tokenize(tok, items, max_length)
    err = [(float(v[-1]) - it["reward"]) ** 2 for s in range(0, len(rows), 16)
           for v, it in zip(_values(model, rows[s:s + 16], pad, device), items[s:s + 16])]
    return {"terminal_mse": sum(err) / len(err), "n": len(err)}


# --- loading: the reward-model interface and the sampler's guide ------------------------------

def _load(folder: str | Path, dtype: str = "auto", device: str | None = None):
    from safetensors.torch import load_file

    from .inference import folder_info
    folder = Path(folder)
    info = folder_info(folder) if folder.is_dir() else {}
    if info.get("rm_method") != NAME or not (folder / HEAD).exists():
        raise UsageError(f"{folder}: not a value-model folder (train-rm --method value)")
    backbone, tok = _load_backbone(folder / "backbone", dtype)
    model = build_model_class()(backbone, int(info["hidden"]))
    model.head.load_state_dict(load_file(str(folder / HEAD)))
    model.head.to(next(backbone.parameters()).device)
    if device:
        model.to(device)
    return model.eval(), tok


def load_folder(folder: str | Path, *, user: str | None = None, aggregate: str | None = None,
                dtype: str = "auto", device: str | None = None, max_length: int = 1024):
    """The loader of this layout (see `inference.load_reward_model`): scores are the
    terminal value V(T−1) (user and aggregate unused)."""
    model, tok = _load(folder, dtype, device)
    return ValueRewardModel(model, tok, max_length)


class ValueRewardModel:
    def __init__(self, model, tokenizer, max_length: int = 1024):
        self.model, self.tokenizer, self.max_length = model, tokenizer, max_length

    def score(self, prompts: Sequence[Any], completions: Sequence[Any],
              users: Sequence[Any] | None = None) -> list[float]:
        tok = self.tokenizer
        items = [{"prompt": p, "text": c, "finished": True} for p, c in zip(prompts, completions)]
        rows = _tokenize(tok, items, self.max_length)
        device = next(self.model.parameters()).device
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        return [float(v[-1]) for s in range(0, len(rows), 16)
                for v in _values(self.model, rows[s:s + 16], pad, device)]


class ValueGuide:
    """A sampler guide (the protocol of `generation._sample_batch`): V(s·a) for the
    top-k candidates a of each row. Batching: the value model keeps its own KV cache of
    the prefix s (R rows); `values` copies it, repeats each row k times and runs one
    forward of R·k single tokens (the candidates) over it. When every sampled token was a
    candidate, `advance` keeps the matching rows of that copy (no second forward);
    otherwise it runs the sampled tokens over the prefix cache."""

    def __init__(self, model, beta: float, name: str = ""):
        self.model, self.beta, self.name = model, float(beta), name
        self.cache = self._cand = self._ccache = None

    def start(self, ids, mask, pos, rep) -> None:
        _, cache = self.model(ids, attention_mask=mask, position_ids=pos, use_cache=True)
        cache.reorder_cache(rep)
        self.cache = cache

    def values(self, cand, mask, pos):
        """cand (R, k) token ids; mask (R, L+1) with the candidate column; pos (R,) the
        candidates' position. Returns (R, k) float values."""
        import torch
        R, k = cand.shape
        rep = torch.arange(R, device=cand.device).repeat_interleave(k)
        cc = copy.deepcopy(self.cache)
        cc.reorder_cache(rep)
        v, cc = self.model(cand.reshape(-1, 1), attention_mask=mask[rep],
                           position_ids=pos[rep][:, None], cache=cc, use_cache=True)
        self._cand, self._ccache = cand, cc
        return v[:, -1].view(R, k)

    def advance(self, tok, mask, pos) -> None:
        """The sampled tokens tok (R,) join the prefix (mask/pos as for the policy step)."""
        import torch
        hit = None if self._cand is None else self._cand == tok[:, None]
        if hit is not None and bool(hit.any(-1).all()):
            k = self._cand.shape[1]
            sel = torch.arange(len(tok), device=tok.device) * k + hit.float().argmax(-1)
            self._ccache.reorder_cache(sel)
            self.cache = self._ccache
        else:
            _, self.cache = self.model(tok[:, None], attention_mask=mask,
                                       position_ids=pos[:, None], cache=self.cache,
                                       use_cache=True)
        self._cand = self._ccache = None

    def keep(self, idx) -> None:
        """Drop finished rows: keep rows `idx` of the prefix cache (and of the candidates')."""
        import torch
        self.cache.reorder_cache(idx)
        if self._cand is not None:
            k = self._cand.shape[1]
            self._ccache.reorder_cache((idx[:, None] * k + torch.arange(k, device=idx.device)).reshape(-1))
            self._cand = self._cand[idx]


def parse_guides(specs: Sequence[str] | None) -> list[dict]:
    """`--value-guide DIR[:BETA]` values -> [{"dir", "beta"}] (β 1.0 by default). A bad
    β or a folder that is not a value model is a UsageError naming the flag."""
    out = []
    for spec in specs or []:
        d, beta = spec, 1.0
        head, sep, tail = spec.rpartition(":")
        if sep and not Path(spec).is_dir():
            d = head
            try:
                beta = float(tail)
            except ValueError:
                raise UsageError(f"{FLAG} {spec!r}: BETA must be a number, got {tail!r}") from None
            if not math.isfinite(beta):
                raise UsageError(f"{FLAG} {spec!r}: BETA must be finite")
        if not d or not (Path(d) / HEAD).exists():
            raise UsageError(f"{FLAG} {spec!r}: {d or '(empty)'} is not a value-model folder "
                             "(train-rm --method value)")
        out.append({"dir": d, "beta": beta})
    return out


def load_guides(guides: Sequence[dict], policy, dtype: str = "auto") -> list[ValueGuide]:
    """The sampler's guide objects for parsed `--value-guide`s, on the policy's device;
    the value model must share the policy's vocabulary."""
    device = next(policy.parameters()).device
    want = policy.get_input_embeddings().weight.shape[0]
    out = []
    for g in guides:
        model, _ = _load(g["dir"], dtype, str(device))
        have = model.backbone.get_input_embeddings().weight.shape[0]
        if have != want:
            raise UsageError(f"{FLAG} {g['dir']}: its vocabulary ({have} tokens) is not the "
                             f"sampling model's ({want})")
        out.append(ValueGuide(model, g["beta"], g["dir"]))
    return out
