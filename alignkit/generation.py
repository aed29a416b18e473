"""The sampler: one implementation used by `gen-pairs`, online training and `eval`.

`sample` draws N completions per prompt with a hand-written batched decode loop over
Hugging Face models (not `model.generate`), because every consumer needs things that
`generate` does not give cheaply:

- one prefill per prompt: the prompt batch (left padded, prompts sorted by length) is
  run once and its KV cache is repeated N times (`Cache.reorder_cache`), so N samples
  cost one prompt pass, not N;
- rows that reach an end-of-sequence token leave the batch (cache rows dropped), so
  the remaining steps run on fewer rows;
- `logp`: the summed log-probability of each sampled token under the sampling model at
  temperature 1 (its own distribution, before temperature/top-k/top-p), computed from
  the logits the loop already has;
- the geometric mixture softmax((1-a)*logits_policy + a*logits_ref) (Nash-MD / IPO-MD),
  with the reference model decoded in lockstep;
- determinism that does not depend on batching: sample j of a prompt draws its random
  numbers from its own stream keyed by (seed, prompt key, j), consumed by
  inverse-CDF sampling (one uniform per token), so the same prompt gets the same
  samples whatever batch, shard or resume split it lands in (up to float round-off
  of different padding).

`completion_logps` / `encode_pair` are the teacher-forced side: the same prompt
encoding as the sampler, so a sampled completion scored by token ids reproduces its
`logp`.

The `gen-pairs` pipeline built on it lives in `alignkit/gen_pairs.py`. torch and
transformers are imported inside functions only.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import math
from dataclasses import dataclass

from . import console, slots
from .errors import AlignkitError, UsageError
from .text import encode_pair, encode_prompt, render_prompt  # noqa: F401  (the sampler's text layer)

# ======================================================================================
# The sampler
# ======================================================================================


@dataclass
class SampleParams:
    """Sampling settings. `batch_size` counts prompts per batch (each expanded to `n`
    rows). `top_k=0` and `top_p=1.0` disable those filters; `temperature=0` is greedy."""
    n: int = 4
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 128
    seed: int = 0
    batch_size: int = 32  # ~1.6x the rate of 8 on SmolLM2 on 2 cores (README, Benchmarks)

    def check(self) -> "SampleParams":
        """Raise UsageError on an impossible setting (the CLI's exit 2)."""
        if self.n < 1:
            raise UsageError(f"-n/--num-samples must be >= 1, got {self.n}")
        if not 0 <= self.temperature < math.inf:  # also refuses nan
            raise UsageError(f"--temperature must be >= 0 and finite, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self


def stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the generation config's and the tokenizer's EOS."""
    ids: set[int] = set()
    cfg = getattr(model, "generation_config", None)
    eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def row_seed(seed: int, key: str, j: int) -> int:
    """The random-stream seed of sample j of the prompt keyed `key`."""
    digest = hashlib.sha256(f"{seed}\x00{key}\x00{j}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


# --- model plumbing --------------------------------------------------------------------

def context_length(model) -> int | None:
    """The model's context in tokens (`max_position_embeddings`), None if it has none."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    n = getattr(getattr(base, "config", None), "max_position_embeddings", None)
    return n if isinstance(n, int) and n > 0 else None


def model_device(model):
    return next(model.parameters()).device


_CACHE_KW: dict[type, str] = {}


def cache_kw(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; older model code (remote
    code, PEFT wrappers around it) still takes the old name."""
    t = type(model)
    if t not in _CACHE_KW:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        _CACHE_KW[t] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[t]


def out_cache(out):
    c = getattr(out, "cache", None)
    return c if c is not None else out.past_key_values


@contextlib.contextmanager
def _eval_mode(*models):
    """Sample and score in eval mode (no dropout; the KV cache works with gradient
    checkpointing), then restore each model's mode (online trainers pass the policy)."""
    models = [m for m in models if m is not None]
    was = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, w in zip(models, was):
            m.train(w)


def _no_grad(model):
    """`torch.inference_mode()`, or `torch.no_grad()` for a model sharded by FSDP2: its
    parameters are gathered during the forward, and gathered under inference mode they
    cannot be updated by the training step that follows."""
    import torch
    sharded = any(type(p).__name__ == "DTensor" for p in model.parameters())
    return torch.no_grad() if sharded else torch.inference_mode()


def left_pad(seqs: list[list[int]], pad_id: int, device):
    import torch
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def check_same_vocab(model, ref_model) -> None:
    a = model.get_output_embeddings().weight.shape[0]
    b = ref_model.get_output_embeddings().weight.shape[0]
    if a != b:
        raise UsageError(f"the two models have different vocabularies ({a} vs {b} tokens): "
                         "the mixture needs models that share a tokenizer")


# --- token choice -------------------------------------------------------------------------

_BLOCK = 256


def pick_tokens(logits, u, params: SampleParams):
    """Choose one token per row from logits (R, V) (float32; any per-row offset, e.g.
    log-probabilities) with uniforms u (R,) in [0, 1): temperature, then top-k, then
    top-p, then inverse-CDF sampling. Greedy when the temperature is 0.

    The inverse CDF is two-level (block sums, then a cumsum inside the chosen block of
    256 tokens), which costs a few ms per step at 32 rows x 49k tokens where a
    full-vocabulary float64 cumsum costs ~30 ms on a CPU.
    """
    import torch
    if params.temperature <= 0:
        return logits.argmax(-1)
    x = logits / params.temperature if params.temperature != 1.0 else logits
    rows, vocab = x.shape
    if 0 < params.top_k < vocab:
        kth = torch.topk(x, params.top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if params.top_p < 1.0:
        sx, si = torch.sort(x, dim=-1, descending=True)
        sp = torch.softmax(sx, dim=-1)
        drop_sorted = (sp.cumsum(-1) - sp) > params.top_p  # the top token always stays
        drop = torch.zeros_like(drop_sorted).scatter(-1, si, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    p = (x - x.amax(dim=-1, keepdim=True)).exp_()
    nb = -(-vocab // _BLOCK)
    if nb * _BLOCK != vocab:
        p = torch.nn.functional.pad(p, (0, nb * _BLOCK - vocab))
    blocks = p.view(rows, nb, _BLOCK)
    bcdf = blocks.sum(-1).double().cumsum(-1)
    target = u.to(bcdf.device) * bcdf[:, -1]
    b = _search(bcdf, target)
    before = torch.where(b > 0, bcdf.gather(1, (b - 1).clamp(min=0)[:, None]).squeeze(1),
                         torch.zeros_like(target))
    inner = blocks[torch.arange(rows, device=p.device), b].double().cumsum(-1)
    return b * _BLOCK + _search(inner, target - before)


def _search(cdf, target):
    """First index whose cumulative mass exceeds target, never a zero-mass index."""
    import torch
    idx = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    last = (cdf < cdf[:, -1:]).sum(-1)  # the last index that adds mass
    return torch.minimum(idx, last)


# --- value guides (VAS, ALGORITHMS.md Part B §12) -------------------------------------------

VAS_TOP_K = 10  # candidates per step whose logits a value guide adjusts


def vas_adjust(logits, idx, values, betas):
    """z'(a) = z(a) + Σ_i β_i·(V_i(s·a) − mean_topk V_i) for the candidates idx (R, k);
    the other tokens keep z. `values`: one (R, k) tensor per guide."""
    out = logits.clone()
    bonus = sum(b * (v.to(out) - v.to(out).mean(-1, keepdim=True)) for v, b in zip(values, betas))
    return out.scatter_add_(1, idx, bonus)


def _guided(logits, guides, mask, pos):
    """The sampling logits with every guide's VAS term: top-k of `logits` (the logits
    tokens are drawn from, before temperature), V(s·a) of each candidate from each guide
    (`guide.values(cand, mask + candidate column, position)`)."""
    import torch
    idx = torch.topk(logits, min(VAS_TOP_K, logits.shape[-1]), dim=-1).indices
    m = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
    vals = [g.values(idx, m, pos + 1) for g in guides]
    return vas_adjust(logits, idx, vals, [g.beta for g in guides])


# --- the decode loop ------------------------------------------------------------------------

def forward_keep(model, keep: int, **kw):
    """A forward pass computing logits for the last `keep` positions only (older model
    code without `logits_to_keep` computes them all).

    The model's head then gets `hidden[:, -keep:]`, a strided view. For a frozen head
    (requires_grad False: a merged adapter, a reference or judge model) torch's CPU
    matmul does not fold a strided 3-D input into one matrix product; it takes a batched
    product that first copies the whole vocabulary weight once per row: 1.6 s instead of
    8 ms for SmolLM2's head on a 32-prompt prefill, so a merged model sampled at 175
    tokens/s instead of 302. A pre-hook on the head makes its input contiguous."""
    head = _output_head(model)
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        try:
            out = model(**kw, logits_to_keep=keep)
        except TypeError as e:
            if "logits_to_keep" not in str(e):
                raise
            out = model(**kw)
    finally:
        if hook is not None:
            hook.remove()
    return out, out.logits[:, -keep:]


def _output_head(model):
    try:
        return model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None


def _contiguous_input(module, args):
    return (args[0].contiguous(), *args[1:]) if args else None


def _prefill(model, ids, mask, pos, rep):
    out, logits = forward_keep(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=True)
    cache = out_cache(out)
    cache.reorder_cache(rep)
    return logits[:, -1].float()[rep], cache


def _step(model, cache, tok, mask, pos):
    out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                use_cache=True, **{cache_kw(model): cache})
    return out.logits[:, -1].float()


def _sample_batch(model, prompt_ids: list[list[int]], seeds: list[int], params: SampleParams,
                  stop_ids: set[int], pad_id: int, ref_model=None, alpha: float = 0.0,
                  guides=None) -> list[dict]:
    """Sample `params.n` rows per prompt; returns B*n dicts in (prompt, j) order with
    token_ids, logp (model, temperature 1), and logp_ref / logp_mix with a ref model.
    `guides`: value guides (`sample`) that shift the sampling logits, not `logp`."""
    import torch
    device = model_device(model)
    n, steps = params.n, params.max_new_tokens
    ids, mask, pos = left_pad(prompt_ids, pad_id, device)
    rep = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
    logits, cache = _prefill(model, ids, mask, pos, rep)
    if ref_model is not None:
        rlogits, rcache = _prefill(ref_model, ids.to(model_device(ref_model)), mask.to(model_device(ref_model)),
                                   pos.to(model_device(ref_model)), rep.to(model_device(ref_model)))
    for g in guides or ():
        g.start(ids, mask, pos, rep)
    mask, pos = mask[rep], pos[rep, -1]
    rows_total = len(rep)
    uniforms = torch.stack([torch.rand(steps, dtype=torch.float64,
                                       generator=torch.Generator().manual_seed(s)) for s in seeds])
    rows = torch.arange(rows_total)            # active row -> original row (cpu)
    tokens: list[list[int]] = [[] for _ in range(rows_total)]
    finished = [False] * rows_total
    sums = {"logp": torch.zeros(rows_total, dtype=torch.float64)}
    if ref_model is not None:
        sums["logp_ref"] = torch.zeros(rows_total, dtype=torch.float64)
        sums["logp_mix"] = torch.zeros(rows_total, dtype=torch.float64)
    for t in range(steps):
        # (logits, log-normaliser) of each distribution whose logp is recorded
        dist = {"logp": (logits, torch.logsumexp(logits, dim=-1))}
        if ref_model is not None:
            rlogits = rlogits.to(device)
            mix = (1.0 - alpha) * (logits - dist["logp"][1][:, None]) + \
                alpha * (rlogits - torch.logsumexp(rlogits, dim=-1, keepdim=True))
            dist.update(logp_ref=(rlogits, torch.logsumexp(rlogits, dim=-1)),
                        logp_mix=(mix, torch.logsumexp(mix, dim=-1)))
        drawn = dist["logp_mix"][0] if ref_model is not None else logits
        if guides:
            drawn = _guided(drawn, guides, mask, pos)
        tok = pick_tokens(drawn, uniforms[rows, t], params)
        for name, (lg, norm) in dist.items():
            sums[name][rows] += (lg.gather(1, tok[:, None]).squeeze(1) - norm).double().cpu()
        done = []
        for r, tk in zip(rows.tolist(), tok.tolist()):
            tokens[r].append(tk)
            if tk in stop_ids:
                finished[r] = True
            done.append(tk in stop_ids)
        if t == steps - 1 or all(done):
            break
        if any(done):
            keep = torch.tensor([i for i, d in enumerate(done) if not d], dtype=torch.long)
            keep_d = keep.to(device)
            cache.reorder_cache(keep_d)
            rows, tok, mask, pos = rows[keep], tok[keep_d], mask[keep_d], pos[keep_d]
            if ref_model is not None:
                rcache.reorder_cache(keep.to(model_device(ref_model)))
            for g in guides or ():
                g.keep(keep_d)
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        logits = _step(model, cache, tok, mask, pos)
        if ref_model is not None:
            rd = model_device(ref_model)
            rlogits = _step(ref_model, rcache, tok.to(rd), mask.to(rd), pos.to(rd))
        for g in guides or ():
            g.advance(tok, mask, pos)
    out = []
    for r in range(rows_total):
        row = {"token_ids": tokens[r], "finished": finished[r]}
        row.update({k: float(v[r]) for k, v in sums.items()})
        out.append(row)
    return out


def sample(model, tokenizer, prompts: list, params: SampleParams, *, system: str | None = None,
           raw: bool = False, ref_model=None, alpha: float = 0.0, progress_desc: str = "sampling",
           keys: list[str] | None = None, return_ids: bool = False, progress=None,
           guides=None) -> list[list[dict]]:
    """Sample `params.n` completions for each prompt (a string or a message list).

    Returns, per prompt, n dicts `{"text", "logp", "n_tokens", "finished"}`:
    - `text`: the decoded completion, without the EOS token and special tokens;
    - `n_tokens`: the sampled tokens, counting the EOS token when `finished`;
    - `logp`: the summed log-probability of those tokens (EOS included) under `model`
      at temperature 1, i.e. the model's own distribution before temperature, top-k
      and top-p. It equals `completion_logps(..., add_eos=finished)` on the same token
      ids. With `ref_model`, tokens are drawn from the per-token geometric mixture
      softmax((1-alpha)*logits_model + alpha*logits_ref) (then temperature/top-k/top-p),
      `logp` stays the log-probability under `model`, and the dicts also carry
      `logp_ref` (under `ref_model`) and `logp_mix` (under the untempered mixture);
    - `token_ids` too when `return_ids`.

    `guides` (Value Augmented Sampling; e.g. `reward_models.value.load_guides`): at each
    step the top-k (VAS_TOP_K = 10) tokens of the sampling logits z get
    z(a) + Σ_i β_i·(V_i(s·a) − mean_topk V_i), the other tokens keep z (ALGORITHMS.md
    Part B §12), before temperature/top-k/top-p; `logp` stays the base model's. A guide
    has `beta`, `start(ids, mask, pos, rep)`, `values(cand, mask, pos) -> (R, k)`,
    `advance(tok, mask, pos)` and `keep(rows)`. Guided sampling uses the batch loop
    (not the slots).

    Randomness: sample j of prompt i uses its own stream seeded by
    (params.seed, keys[i], j); `keys` default to the prompts' positions, so callers that
    sample the same prompts repeatedly (online training) must change `params.seed`.
    The global torch RNG is not used. `progress`: an open `console.progress` task to
    advance instead of opening a bar named `progress_desc`.
    """
    params.check()
    context = context_length(model)
    if context is not None and params.max_new_tokens > context:
        raise UsageError(f"--max-new-tokens {params.max_new_tokens} exceeds the model's context "
                         f"of {context} tokens (config.max_position_embeddings)")
    if ref_model is not None:
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {alpha}")
        check_same_vocab(model, ref_model)
    if keys is None:
        keys = [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")
    encoded = [encode_prompt(tokenizer, render_prompt(tokenizer, p, system, raw)) for p in prompts]
    stops, pad = stop_token_ids(model, tokenizer), pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[dict] | None] = [None] * len(prompts)

    def run(task):
        with _no_grad(model), _eval_mode(model, ref_model):
            if ref_model is None and not guides and slots.supported(model):
                def done(k, rows):
                    i = order[k]
                    results[i] = [finish_row(tokenizer, r, stops, return_ids) for r in rows]
                    task.advance(1)
                seeds = [[row_seed(params.seed, keys[i], j) for j in range(params.n)] for i in order]
                slots.decode(model, [encoded[i] for i in order], seeds, params, stops, pad, done)
                return
            for start in range(0, len(order), params.batch_size):
                idx = order[start:start + params.batch_size]
                seeds = [row_seed(params.seed, keys[i], j) for i in idx for j in range(params.n)]
                rows = _sample_batch(model, [encoded[i] for i in idx], seeds, params, stops, pad,
                                     ref_model, alpha, guides)
                for b, i in enumerate(idx):
                    results[i] = [finish_row(tokenizer, r, stops, return_ids)
                                  for r in rows[b * params.n:(b + 1) * params.n]]
                task.advance(len(idx))

    if progress is not None:
        run(progress)
    else:
        with console.progress(progress_desc, total=len(prompts)) as task:
            run(task)
    return results  # type: ignore[return-value]


def finish_row(tokenizer, row: dict, stops: set[int], return_ids: bool) -> dict:
    ids = row["token_ids"]
    content = ids[:-1] if row["finished"] and ids and ids[-1] in stops else ids
    out = {"text": tokenizer.decode(content, skip_special_tokens=True), "logp": row["logp"],
           "n_tokens": len(ids), "finished": row["finished"]}
    for k in ("logp_ref", "logp_mix"):
        if k in row:
            out[k] = row[k]
    if return_ids:
        out["token_ids"] = ids
    return out


# --- teacher forcing ---------------------------------------------------------------------------

def completion_logits(models: list, pairs: list[tuple[list[int], list[int]]], *,
                      batch_size: int, pad_id: int):
    """Teacher-forced logits of each model at the completion positions of (prompt ids,
    completion ids) pairs: the one batching that `token_logps` and eval's KL pass share.

    Pairs are sorted by total length, taken `batch_size` at a time, left padded, and
    every model runs one forward per batch computing only the last positions' logits
    (`forward_keep`). Yields (the batch's pair indices, one [tokens, V] tensor per model,
    the completion ids [tokens]): rows are the batch's completion positions, pair after
    pair in index order; a pair with an empty completion has no rows, and a batch of
    empty completions yields nothing."""
    import torch
    device = model_device(models[0])
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        keep = max(len(pairs[i][1]) for i in idx)
        if keep == 0:
            continue
        ids, mask, pos = left_pad([pairs[i][0] + pairs[i][1] for i in idx], pad_id, device)
        sel = torch.zeros((len(idx), keep), dtype=torch.bool, device=device)
        for b, i in enumerate(idx):  # logits at position t-1 predict token t
            sel[b, keep - len(pairs[i][1]):] = True
        logits = [forward_keep(m, keep + 1, input_ids=ids, attention_mask=mask,
                               position_ids=pos)[1][:, :-1][sel] for m in models]
        targets = torch.tensor([t for i in idx for t in pairs[i][1]], dtype=torch.long,
                               device=device)
        yield idx, logits, targets


def token_logps(model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 8,
                pad_id: int = 0) -> list[list[float]]:
    """Per-token log-probabilities of each completion (ids) given its prompt (ids), by one
    teacher-forced forward pass per batch (`completion_logits`: left padded; only the
    completion positions' logits are computed)."""
    import torch
    if any(c and not p for p, c in pairs):
        raise AlignkitError("cannot score a completion after an empty prompt")
    out: list[list[float]] = [[] for _ in pairs]
    with _no_grad(model), _eval_mode(model):
        for idx, (logits,), targets in completion_logits([model], pairs, batch_size=batch_size,
                                                         pad_id=pad_id):
            rows = logits.float()
            lp = (rows.gather(1, targets[:, None]).squeeze(1)
                  - torch.logsumexp(rows, dim=-1)).double().cpu()
            at = 0
            for i in idx:
                c = len(pairs[i][1])
                out[i] = lp[at:at + c].tolist()
                at += c
    return out


def completion_logps(model, tokenizer, rendered_prompts: list[str], completions: list, *,
                     batch_size: int = 8, per_token: bool = False,
                     add_eos: bool | list[bool] = True) -> list[float] | list[list[float]]:
    """Teacher-forced log-probabilities of completion tokens given rendered prompts
    (tokenized by `encode_pair`): the sum per completion, or the per-token list.
    `add_eos` may be a list (one flag per completion, e.g. a sample's `finished`)."""
    if len(rendered_prompts) != len(completions):
        raise ValueError("rendered_prompts and completions must have the same length")
    flags = add_eos if isinstance(add_eos, list) else [add_eos] * len(completions)
    pairs = [encode_pair(tokenizer, p, c, e) for p, c, e in zip(rendered_prompts, completions, flags)]
    per = token_logps(model, pairs, batch_size=batch_size, pad_id=pad_id(tokenizer))
    return per if per_token else [float(sum(x)) for x in per]
