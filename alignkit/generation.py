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

The second half of this module is the `gen-pairs` pipeline (samples records and the
pairing modes of DESIGN.md / ALGORITHMS.md: SePPO pairs against a reference, the
Nash-MD mixture, context-contrast negatives), plus `--shard` and `--resume-from`.
torch and transformers are imported inside functions only.
"""
from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from . import console
from .errors import AlignkitError, DataError, UsageError
from .records import Text, text_of

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
    batch_size: int = 8

    def check(self) -> "SampleParams":
        """Raise UsageError on an impossible setting (the CLI's exit 2)."""
        if self.n < 1:
            raise UsageError(f"-n/--num-samples must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise UsageError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UsageError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"--top-k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        return self


def render_prompt(tokenizer, prompt: Text, system: str | None = None, raw: bool = False) -> str:
    """The text the model continues.

    A string prompt goes through the tokenizer's chat template (with `system` as a
    system message, and the generation prompt added) when the tokenizer has one and
    `raw` is False; otherwise it is used as is. A message list always goes through the
    chat template (`system` is not added to it: it carries its own).
    """
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if isinstance(prompt, str):
        if raw or not has_template:
            if system:
                raise UsageError("--system needs the chat template "
                                 + ("(drop --raw)" if raw else "(the tokenizer has none)"))
            return prompt
        messages = ([{"role": "system", "content": system}] if system else []) + \
            [{"role": "user", "content": prompt}]
    else:
        if not has_template:
            raise UsageError("message-list prompts need a tokenizer with a chat template")
        messages = prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


_PREFIX_CACHE: dict[int, list[int]] = {}


def _special_prefix(tokenizer) -> list[int]:
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
    pre = _special_prefix(tokenizer)
    if pre and ids[:len(pre)] != pre:
        ids = pre + ids
    if not ids:
        fill = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if fill is None:
            raise AlignkitError("empty prompt and the tokenizer has no BOS/EOS token")
        ids = [fill]
    return ids


def encode_pair(tokenizer, rendered_prompt: str, completion: Text,
                add_eos: bool = True) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the tokenization `completion_logps` scores. The
    completion is encoded on its own (no special tokens), plus EOS when `add_eos`."""
    comp = list(tokenizer(text_of(completion), add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        comp.append(tokenizer.eos_token_id)
    return encode_prompt(tokenizer, rendered_prompt), comp


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

def _device(model):
    return next(model.parameters()).device


_CACHE_KW: dict[type, str] = {}


def _cache_kw(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; older model code (remote
    code, PEFT wrappers around it) still takes the old name."""
    t = type(model)
    if t not in _CACHE_KW:
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        params = inspect.signature(base.forward).parameters
        _CACHE_KW[t] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_KW[t]


def _out_cache(out):
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


def _left_pad(seqs: list[list[int]], pad_id: int, device):
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


def _pad_id(tokenizer) -> int:
    for t in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if t is not None:
            return int(t)
    return 0


def _check_same_vocab(model, ref_model) -> None:
    a = model.get_output_embeddings().weight.shape[0]
    b = ref_model.get_output_embeddings().weight.shape[0]
    if a != b:
        raise UsageError(f"the two models have different vocabularies ({a} vs {b} tokens): "
                         "the mixture needs models that share a tokenizer")


# --- token choice -------------------------------------------------------------------------

_BLOCK = 256


def _pick(logits, u, params: SampleParams):
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


# --- the decode loop ------------------------------------------------------------------------

def _forward_keep(model, keep: int, **kw):
    """A forward pass computing logits for the last `keep` positions only (older model
    code without `logits_to_keep` computes them all)."""
    try:
        out = model(**kw, logits_to_keep=keep)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        out = model(**kw)
    return out, out.logits[:, -keep:]


def _prefill(model, ids, mask, pos, rep):
    out, logits = _forward_keep(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos,
                                use_cache=True)
    cache = _out_cache(out)
    cache.reorder_cache(rep)
    return logits[:, -1].float()[rep], cache


def _step(model, cache, tok, mask, pos):
    out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None],
                use_cache=True, **{_cache_kw(model): cache})
    return out.logits[:, -1].float()


def _sample_batch(model, prompt_ids: list[list[int]], seeds: list[int], params: SampleParams,
                  stop_ids: set[int], pad_id: int, ref_model=None, alpha: float = 0.0) -> list[dict]:
    """Sample `params.n` rows per prompt; returns B*n dicts in (prompt, j) order with
    token_ids, logp (model, temperature 1), and logp_ref / logp_mix with a ref model."""
    import torch
    device = _device(model)
    n, steps = params.n, params.max_new_tokens
    ids, mask, pos = _left_pad(prompt_ids, pad_id, device)
    rep = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)
    logits, cache = _prefill(model, ids, mask, pos, rep)
    if ref_model is not None:
        rlogits, rcache = _prefill(ref_model, ids.to(_device(ref_model)), mask.to(_device(ref_model)),
                                   pos.to(_device(ref_model)), rep.to(_device(ref_model)))
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
        tok = _pick(dist["logp_mix"][0] if ref_model is not None else logits,
                    uniforms[rows, t], params)
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
                rcache.reorder_cache(keep.to(_device(ref_model)))
        mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
        pos = pos + 1
        logits = _step(model, cache, tok, mask, pos)
        if ref_model is not None:
            rd = _device(ref_model)
            rlogits = _step(ref_model, rcache, tok.to(rd), mask.to(rd), pos.to(rd))
    out = []
    for r in range(rows_total):
        row = {"token_ids": tokens[r], "finished": finished[r]}
        row.update({k: float(v[r]) for k, v in sums.items()})
        out.append(row)
    return out


def sample(model, tokenizer, prompts: list, params: SampleParams, *, system: str | None = None,
           raw: bool = False, ref_model=None, alpha: float = 0.0, progress_desc: str = "sampling",
           keys: list[str] | None = None, return_ids: bool = False, progress=None) -> list[list[dict]]:
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

    Randomness: sample j of prompt i uses its own stream seeded by
    (params.seed, keys[i], j); `keys` default to the prompts' positions, so callers that
    sample the same prompts repeatedly (online training) must change `params.seed`.
    The global torch RNG is not used. `progress`: an open `console.progress` task to
    advance instead of opening a bar named `progress_desc`.
    """
    import torch
    params.check()
    if ref_model is not None:
        if not 0.0 <= alpha <= 1.0:
            raise UsageError(f"--alpha must be in [0, 1], got {alpha}")
        _check_same_vocab(model, ref_model)
    if keys is None:
        keys = [str(i) for i in range(len(prompts))]
    if len(keys) != len(prompts):
        raise ValueError("keys must have one entry per prompt")
    encoded = [encode_prompt(tokenizer, render_prompt(tokenizer, p, system, raw)) for p in prompts]
    stops, pad = stop_token_ids(model, tokenizer), _pad_id(tokenizer)
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[list[dict] | None] = [None] * len(prompts)

    def run(task):
        with torch.inference_mode(), _eval_mode(model, ref_model):
            for start in range(0, len(order), params.batch_size):
                idx = order[start:start + params.batch_size]
                seeds = [row_seed(params.seed, keys[i], j) for i in idx for j in range(params.n)]
                rows = _sample_batch(model, [encoded[i] for i in idx], seeds, params, stops, pad,
                                     ref_model, alpha)
                for b, i in enumerate(idx):
                    results[i] = [_finish_row(tokenizer, r, stops, return_ids)
                                  for r in rows[b * params.n:(b + 1) * params.n]]
                task.advance(len(idx))

    if progress is not None:
        run(progress)
    else:
        with console.progress(progress_desc, total=len(prompts)) as task:
            run(task)
    return results  # type: ignore[return-value]


def _finish_row(tokenizer, row: dict, stops: set[int], return_ids: bool) -> dict:
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

def token_logps(model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 8,
                pad_id: int = 0) -> list[list[float]]:
    """Per-token log-probabilities of each completion (ids) given its prompt (ids), by one
    teacher-forced forward pass per batch (left padded; only the completion positions'
    logits are computed)."""
    import torch
    device = _device(model)
    out: list[list[float] | None] = [None] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i][0]) + len(pairs[i][1]))
    with torch.inference_mode(), _eval_mode(model):
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            k_max = max(len(pairs[i][1]) for i in idx)
            if k_max == 0:
                for i in idx:
                    out[i] = []
                continue
            for i in idx:
                if not pairs[i][0]:
                    raise AlignkitError("cannot score a completion after an empty prompt")
            ids, mask, pos = _left_pad([pairs[i][0] + pairs[i][1] for i in idx], pad_id, device)
            logits = _forward_keep(model, k_max + 1, input_ids=ids, attention_mask=mask,
                                   position_ids=pos)[1][:, :-1]
            for b, i in enumerate(idx):
                comp = pairs[i][1]
                if not comp:
                    out[i] = []
                    continue
                row = logits[b, k_max - len(comp):].float()
                target = torch.tensor(comp, device=device)[:, None]
                lp = row.gather(1, target).squeeze(1) - torch.logsumexp(row, dim=-1)
                out[i] = lp.double().cpu().tolist()
    return out  # type: ignore[return-value]


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
    per = token_logps(model, pairs, batch_size=batch_size, pad_id=_pad_id(tokenizer))
    return per if per_token else [float(sum(x)) for x in per]


# --- vLLM engine --------------------------------------------------------------------------------

def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def sample_vllm(model_spec: str, tokenizer, prompts: list, params: SampleParams, *,
                system: str | None = None, raw: bool = False, dtype: str = "auto",
                keys: list[str] | None = None, trust_remote_code: bool = False) -> list[list[dict]]:
    """`sample` through vLLM (the optional extra): same prompt rendering and encoding,
    one request per (prompt, j) with the same per-sample seed, `logp` from vLLM's raw
    (pre-temperature) log-probabilities of the sampled tokens. Full model folders only."""
    if not vllm_available():
        raise UsageError("--engine vllm needs vLLM, which is not installed: "
                         "pip install 'alignkit[vllm]' (or use --engine hf)")
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    from .models import adapter_base, resolve
    params.check()
    folder = resolve(model_spec)
    if adapter_base(folder):
        raise UsageError(f"{model_spec}: --engine vllm takes a full model folder; merge the "
                         "adapter first (train with --merge-lora) or use --engine hf")
    keys = keys or [str(i) for i in range(len(prompts))]
    vdtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    try:
        llm = LLM(model=str(folder), dtype=vdtype, seed=params.seed,
                  trust_remote_code=trust_remote_code, logprobs_mode="raw_logprobs")
    except TypeError as e:
        if "logprobs_mode" not in str(e):
            raise
        raise AlignkitError("--engine vllm needs vLLM >= 0.10.2 (raw log-probabilities, "
                            "`logprobs_mode`); upgrade vllm or use --engine hf") from None
    stops = stop_token_ids(_GenCfg(folder), tokenizer)
    requests, sampling = [], []
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, p, system, raw))
        for j in range(params.n):
            requests.append({"prompt_token_ids": ids})
            sampling.append(VllmParams(
                n=1, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens, seed=row_seed(params.seed, keys[i], j) % (2**31),
                logprobs=0, stop_token_ids=sorted(stops), skip_special_tokens=True))
    outputs = llm.generate(requests, sampling)
    flat = []
    for o in outputs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        logp = sum(step[t].logprob for step, t in zip(c.logprobs or [], ids))
        flat.append(_finish_row(tokenizer, {"token_ids": ids, "logp": float(logp),
                                            "finished": c.finish_reason == "stop"}, stops, False))
    return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]


class _GenCfg:
    """Just enough of a model for `stop_token_ids`: the folder's generation config."""

    def __init__(self, folder: Path):
        path = Path(folder) / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        self.generation_config = type("G", (), {"eos_token_id": eos})()


# ======================================================================================
# The gen-pairs pipeline
# ======================================================================================

MODES = ("samples", "reference", "mixture", "contrast")
_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class GenPairsOptions:
    """Everything `alignkit gen-pairs` asks for (see the command's help)."""
    model: str | None = None
    params: SampleParams = field(default_factory=SampleParams)
    dtype: str = "auto"
    system: str | None = None
    raw: bool = False
    engine: str = "hf"
    pair_with_reference: str | None = None
    mixture: str | None = None
    alpha: float | None = None
    contrast_prompt: str | None = None
    shard: tuple[int, int] | None = None
    resume_from: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @property
    def mode(self) -> str:
        if self.pair_with_reference:
            return "reference"
        if self.mixture:
            return "mixture"
        if self.contrast_prompt:
            return "contrast"
        return "samples"

    @property
    def sampler_spec(self) -> str:
        """The model that samples: REF in --pair-with-reference mode, else --model."""
        return self.pair_with_reference or self.model  # type: ignore[return-value]

    def check(self) -> "GenPairsOptions":
        modes = [f for f, v in (("--pair-with-reference", self.pair_with_reference),
                                ("--mixture", self.mixture),
                                ("--contrast-prompt", self.contrast_prompt)) if v]
        if len(modes) > 1:
            raise UsageError(f"choose one pairing mode, not {' and '.join(modes)}")
        if self.pair_with_reference and self.model and self.model != self.pair_with_reference:
            raise UsageError("--pair-with-reference REF samples from REF; drop --model "
                             "(or give the same model)")
        if not self.sampler_spec:
            raise UsageError("--model is required (or --pair-with-reference REF)")
        if self.alpha is not None and not self.mixture:
            raise UsageError("--alpha only applies with --mixture REF")
        if self.mixture:
            if self.alpha is None:
                self.alpha = 0.5
            if not 0.0 <= self.alpha <= 1.0:
                raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.engine not in ("hf", "vllm"):
            raise UsageError(f"--engine must be hf or vllm, got {self.engine!r}")
        if self.engine == "vllm":
            if self.mode != "samples":
                raise UsageError("--engine vllm supports plain sampling only; pairing modes "
                                 "(--pair-with-reference, --mixture, --contrast-prompt) need --engine hf")
            if not vllm_available():
                raise UsageError("--engine vllm needs vLLM, which is not installed: "
                                 "pip install 'alignkit[vllm]' (or use --engine hf)")
        if self.dtype not in _DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.system and self.raw:
            raise UsageError("--system needs the chat template; it cannot be used with --raw")
        if self.contrast_prompt is not None and not self.contrast_prompt.strip():
            raise UsageError("--contrast-prompt needs a meta field name")
        self.params.check()
        return self


# --- input records ----------------------------------------------------------------------------

def given_answer(record: dict):
    """The prompt record's given answer: `meta.chosen`, else a top-level `chosen`."""
    meta = record.get("meta")
    if isinstance(meta, dict) and meta.get("chosen") is not None:
        return meta["chosen"]
    return record.get("chosen")


def _check_text(value, field_name: str) -> None:
    from .records import _TEXT, _check
    _check(value, _TEXT, field_name)


def remove_context(prompt: Text, context) -> Text:
    """The prompt with the context string(s) cut out (whitespace tidied)."""
    parts = [context] if isinstance(context, str) else list(context)

    def cut(s: str) -> str:
        # mark each cut, then join its two sides with the whitespace they need: a blank
        # line where the cut touched a line break, else one space; the rest is untouched
        for c in parts:
            s = re.sub(r"[ \t]*" + re.escape(c) + r"[ \t]*", "\x00", s)
        s = re.sub(r"\n*(?:\x00\n*)+", lambda m: "\n\n" if "\n" in m.group(0) else " ", s)
        return s.strip()

    if isinstance(prompt, str):
        return cut(prompt)
    return [{**m, "content": cut(m["content"])} for m in prompt]


def _check_context(record: dict, field_name: str) -> None:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    ctx = meta.get(field_name)
    where = f"meta.{field_name}"
    if ctx is None:
        raise DataError(f"missing: --contrast-prompt {field_name} needs the context to remove",
                        field=where)
    parts = [ctx] if isinstance(ctx, str) else ctx
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise DataError("expected a non-empty string or list of strings", field=where)
    full = record["prompt"] if isinstance(record["prompt"], str) else \
        "\n".join(m["content"] for m in record["prompt"])
    for p in parts:
        if p not in full:
            raise DataError("context not found in the prompt", field=where)


def read_prompts(path: str, opts: GenPairsOptions) -> tuple[list[dict], str | None]:
    """Validated prompt records of the shard, checked for the mode's needs up front
    (so bad data fails before a model is loaded). Returns (records, input sha256)."""
    from .io import in_shard, read_records
    reader = read_records(path, "prompt", unique_ids=True)
    records = []
    for rec in reader:
        try:
            if opts.mode == "reference":
                ans = given_answer(rec)
                if ans is None:
                    raise DataError("missing: --pair-with-reference needs the given answer "
                                    "(meta.chosen or chosen)", field="chosen")
                _check_text(ans, "meta.chosen" if isinstance(rec.get("meta"), dict)
                            and "chosen" in rec["meta"] else "chosen")
            elif opts.mode == "contrast":
                _check_context(rec, opts.contrast_prompt)  # type: ignore[arg-type]
                ans = given_answer(rec)
                if ans is not None:
                    _check_text(ans, "chosen")
        except DataError as e:
            raise e.at(reader.name, reader.line) from None
        if in_shard(rec["id"], opts.shard):
            records.append({"id": rec["id"], **rec})  # a derived id goes first too
    return records, reader.sha256


# --- resume -------------------------------------------------------------------------------------

def _prompt_id(rec: dict) -> str:
    return rec.get("prompt_id", rec.get("id"))


def _iter_resume_lines(path: str):
    """(line number, raw line, record) of an earlier output; a truncated or broken last
    line is skipped with a warning, a broken line elsewhere is a DataError."""
    from .io import parse_json_line
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = parse_json_line(raw.rstrip(b"\r\n"))
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise DataError("expected a record with a string id")
        except DataError as e:
            if i == len(lines):
                console.warn(f"{path}:{i}: ignoring the truncated last line ({e.problem})")
                return
            raise e.at(path, i) from None
        yield i, raw if raw.endswith(b"\n") else raw + b"\n", rec


def resume_state(path: str | None, per_prompt: int) -> set[str]:
    """Prompt ids complete in an earlier output (all `per_prompt` records present).
    A missing file means nothing is done yet (a cron job's first run)."""
    if not path:
        return set()
    if not Path(path).exists():
        console.info(f"--resume-from {path}: no such file yet; starting from the beginning")
        return set()
    counts: dict[str, int] = {}
    for _, _, rec in _iter_resume_lines(path):
        pid = _prompt_id(rec)
        counts[pid] = counts.get(pid, 0) + 1
    return {pid for pid, c in counts.items() if c >= per_prompt}


# --- building records --------------------------------------------------------------------------

def _as_completion(text: str, prompt: Text):
    """A completion in the prompt's format (TRL: conversational prompt -> message list)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


def _given_completion(ans, prompt: Text):
    return _as_completion(text_of(ans), prompt) if isinstance(ans, str) != isinstance(prompt, str) else ans


def _gen_block(opts: GenPairsOptions, spec: str, sha: str, **extra) -> dict:
    p = opts.params
    gen = {"model": spec, "model_sha256": sha, "temperature": p.temperature, "top_p": p.top_p,
           "max_new_tokens": p.max_new_tokens, "seed": p.seed, "top_k": p.top_k, "n": p.n,
           "dtype": opts.dtype, "engine": opts.engine}
    if opts.system:
        gen["system"] = opts.system
    if opts.raw:
        gen["raw"] = True
    gen.update(extra)
    return gen


def _completion_entry(s: dict, prompt: Text, extra_keys=("logp_ref", "logp_mix")) -> dict:
    entry = {"text": _as_completion(s["text"], prompt), "logp": s["logp"],
             "n_tokens": s["n_tokens"], "finished": s["finished"]}
    entry.update({k: s[k] for k in extra_keys if k in s})
    return entry


def _pair_records(rec: dict, chosen: list, rejected: list, lp_c: list, lp_r: list,
                  gen: dict, n: int) -> list[dict]:
    out = []
    for j in range(n):
        r = {**rec, "chosen": chosen[j], "rejected": rejected[j],
             "ref_logp_chosen": lp_c[j], "ref_logp_rejected": lp_r[j], "gen": gen}
        if n > 1:
            r = {"id": f"{rec['id']}-{j}", "prompt_id": rec["id"],
                 **{k: v for k, v in r.items() if k != "id"}}
        out.append(r)
    return out


class _Pipeline:
    """Loads the models once and turns chunks of prompt records into output records."""

    def __init__(self, opts: GenPairsOptions):
        from .models import load_causal_lm, load_tokenizer, model_sha256
        self.opts = opts
        spec = opts.sampler_spec
        self.spec, self.sha = spec, model_sha256(spec)
        self.ref = None
        device = _auto_device()
        if opts.engine == "vllm":
            self.model, self.tok = None, load_tokenizer(spec, opts.trust_remote_code)
        else:
            self.model, self.tok = load_causal_lm(
                spec, opts.dtype, allow_pickle=opts.allow_pickle,
                trust_remote_code=opts.trust_remote_code, device=device)
        extra: dict[str, Any] = {}
        if opts.mode == "mixture":
            self.ref, _ = load_causal_lm(opts.mixture, opts.dtype, allow_pickle=opts.allow_pickle,
                                         trust_remote_code=opts.trust_remote_code, device=device)
            _check_same_vocab(self.model, self.ref)
            extra["mixture"] = {"ref": opts.mixture, "ref_sha256": model_sha256(opts.mixture),
                                "alpha": opts.alpha}
        elif opts.mode == "reference":
            extra["pairing"] = "reference"
        elif opts.mode == "contrast":
            extra["pairing"] = "contrast"
            extra["contrast_field"] = opts.contrast_prompt
        self.gen = _gen_block(opts, spec, self.sha, **extra)
        self.tokens = 0
        self.has_template = bool(getattr(self.tok, "chat_template", None))

    def _render(self, prompt: Text) -> str:
        return render_prompt(self.tok, prompt, self.opts.system, self.opts.raw)

    def _sample(self, prompts: list, keys: list[str], task) -> list[list[dict]]:
        o = self.opts
        if o.engine == "vllm":
            res = sample_vllm(self.spec, self.tok, prompts, o.params, system=o.system, raw=o.raw,
                              dtype=o.dtype, keys=keys, trust_remote_code=o.trust_remote_code)
            task.advance(len(prompts))
        else:
            res = sample(self.model, self.tok, prompts, o.params, system=o.system, raw=o.raw,
                         ref_model=self.ref, alpha=o.alpha or 0.0, keys=keys, return_ids=True,
                         progress=task)
        self.tokens += sum(s["n_tokens"] for group in res for s in group)
        return res

    def process(self, records: list[dict], task) -> list[dict]:
        mode = self.opts.mode
        keys = [r["id"] for r in records]
        if mode in ("samples", "mixture"):
            groups = self._sample([r["prompt"] for r in records], keys, task)
            return [{**rec, "completions": [_completion_entry(s, rec["prompt"]) for s in group],
                     "gen": self.gen} for rec, group in zip(records, groups)]
        if mode == "reference":
            return self._reference_pairs(records, keys, task)
        return self._contrast_pairs(records, keys, task)

    def _score_given(self, records: list[dict], answers: list) -> list[float]:
        rendered = [self._render(r["prompt"]) for r in records]
        return completion_logps(self.model, self.tok, rendered, answers,
                                batch_size=self.opts.params.batch_size)

    def _reference_pairs(self, records, keys, task) -> list[dict]:
        """SePPO: chosen = the given answer, rejected = a sample from REF; both sides'
        log-probabilities under REF."""
        n = self.opts.params.n
        groups = self._sample([r["prompt"] for r in records], keys, task)
        answers = [given_answer(r) for r in records]
        lp_given = self._score_given(records, answers)
        out = []
        for rec, group, ans, lp in zip(records, groups, answers, lp_given):
            chosen = [_given_completion(ans, rec["prompt"])] * n
            rejected = [_as_completion(s["text"], rec["prompt"]) for s in group]
            out += _pair_records(rec, chosen, rejected, [lp] * n, [s["logp"] for s in group],
                                 self.gen, n)
        return out

    def _contrast_pairs(self, records, keys, task) -> list[dict]:
        """Hallucination-style negatives: rejected = a sample with the context removed,
        chosen = a sample with the full prompt (or the given answer); both scored under
        the full prompt."""
        field_name, n = self.opts.contrast_prompt, self.opts.params.n
        reduced = [remove_context(r["prompt"], r["meta"][field_name]) for r in records]
        neg = self._sample(reduced, [f"{k}\x00contrast" for k in keys], task)
        answers = [given_answer(r) for r in records]
        need = [i for i, a in enumerate(answers) if a is None]
        pos_groups = dict(zip(need, self._sample([records[i]["prompt"] for i in need],
                                                 [keys[i] for i in need], _NullTask())))
        given_lp = dict(zip(
            [i for i, a in enumerate(answers) if a is not None],
            self._score_given([r for r, a in zip(records, answers) if a is not None],
                              [a for a in answers if a is not None])))
        # the negatives were sampled under the reduced prompt: rescore under the full one
        full_ids = [encode_prompt(self.tok, self._render(r["prompt"])) for r in records]
        neg_lp = token_logps(self.model, [(full_ids[i], s["token_ids"]) for i, g in enumerate(neg)
                                          for s in g],
                             batch_size=self.opts.params.batch_size * n, pad_id=_pad_id(self.tok))
        out = []
        for i, rec in enumerate(records):
            p = rec["prompt"]
            rejected = [_as_completion(s["text"], p) for s in neg[i]]
            lp_r = [float(sum(x)) for x in neg_lp[i * n:(i + 1) * n]]
            if i in pos_groups:
                chosen = [_as_completion(s["text"], p) for s in pos_groups[i]]
                lp_c = [s["logp"] for s in pos_groups[i]]
            else:
                chosen = [_given_completion(answers[i], p)] * n
                lp_c = [given_lp[i]] * n
            out += _pair_records(rec, chosen, rejected, lp_c, lp_r, self.gen, n)
        return out


class _NullTask:
    def advance(self, n: int = 1, **_):
        pass


def _auto_device() -> str | None:
    import torch
    return "cuda" if torch.cuda.is_available() else None


def run_gen_pairs(input_path: str, output: str, opts: GenPairsOptions,
                  chunk_prompts: int | None = None) -> dict:
    """The whole `gen-pairs` command: read, skip what --resume-from has, sample in
    chunks (records are written and flushed chunk by chunk, in input order), write the
    manifest. Returns the manifest's counts."""
    from .io import RecordWriter, manifest, write_manifest
    started = time.time()
    opts.check()
    records, in_sha = read_prompts(input_path, opts)
    per_prompt = opts.params.n if opts.mode in ("reference", "contrast") else 1
    done = resume_state(opts.resume_from, per_prompt)
    wanted = {r["id"] for r in records}
    todo = [r for r in records if r["id"] not in done]
    if done:
        console.info(f"--resume-from: {len(wanted & done)} prompt(s) already done, {len(todo)} to go")
    pipe = _Pipeline(opts) if todo else None
    chunk = chunk_prompts or max(opts.params.batch_size * 8, 64)
    copied = written = 0
    t_sample = 0.0
    with RecordWriter(output) as w:
        if done:
            for _, raw, rec in _iter_resume_lines(opts.resume_from):  # type: ignore[arg-type]
                pid = _prompt_id(rec)
                if pid in done and pid in wanted:
                    w.write(rec)
                    copied += 1
        if pipe is not None:
            with console.progress("gen-pairs", total=len(todo)) as task:
                for start in range(0, len(todo), chunk):
                    t0 = time.time()
                    out = pipe.process(todo[start:start + chunk], task)
                    t_sample += time.time() - t0
                    w.write_all(out)
                    written += len(out)
                    if output == "-":
                        sys.stdout.flush()  # a redirect keeps whole chunks for --resume-from
    tokens = pipe.tokens if pipe else 0
    counts = {"prompts": len(records), "prompts_sampled": len(todo), "records_copied": copied,
              "records_written": written, "tokens": tokens}
    inputs = {input_path: in_sha or ""}
    if pipe is not None:
        inputs[f"model:{pipe.spec}"] = pipe.sha
        if opts.mixture:
            inputs[f"ref:{opts.mixture}"] = pipe.gen["mixture"]["ref_sha256"]
    write_manifest(output, manifest(
        inputs=inputs, seed=opts.params.seed, counts=counts, started=started,
        mode=opts.mode, gen=pipe.gen if pipe else None,
        tokens_per_s=round(tokens / t_sample, 2) if t_sample else None,
        options={k: v for k, v in asdict(opts).items() if k != "params"}))
    return counts
