"""Continuous batching for the sampler: a fixed set of decode slots over one KV buffer.

`generation.sample` used to decode a batch of prompts until its last row finished,
dropping finished rows from a `DynamicCache` that grows by concatenation. On a CPU that
leaves most of the time outside the matrix products: every step copies the whole cache
(`torch.cat` per layer), and the batch shrinks to a few skinny rows near its end, where
bf16 matrix products run far below peak. This module keeps the rows busy instead:

- `S` slots (the sampler's `batch_size * n` rows) share one preallocated key/value
  buffer per layer, `[S, kv_heads, capacity, head_dim]`; a decode step writes each
  slot's new key/value at its own position (no concatenation) and attends over the
  filled width under a per-slot mask;
- a slot whose sample ends (EOS or `max_new_tokens`) takes the next sample from the
  queue at once: prompts are prefilled in batches (one prefill per prompt, as before)
  and their KV rows are copied into each slot that samples them;
- once the queue is empty and half the slots are idle, the buffer is compacted to the
  busy slots, so the tail of a run does not pay for idle rows.

Sampling itself is unchanged: each sample draws from its own uniform stream (one per
token, `generation.pick_tokens`), so a sample's tokens do not depend on which slot, batch or
step it ran in (up to float round-off), and `logp` is summed from the same logits.

Used for decoder-only models whose every layer is full attention under the `sdpa` or
`eager` implementation (Llama, Qwen2, SmolLM, Phi, ...); other models (sliding-window
or hybrid layers) keep the batch loop in `generation.py`. `ALIGNKIT_SLOTS=0` turns the
slots off. torch and transformers are imported inside functions only.
"""
from __future__ import annotations

import os


def supported(model) -> bool:
    """Whether the slot decoder can run `model` (see the module docstring)."""
    if os.environ.get("ALIGNKIT_SLOTS", "1") == "0":
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = getattr(base, "config", None)
    if cfg is None or getattr(cfg, "is_encoder_decoder", False):
        return False
    if getattr(cfg, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if getattr(cfg, "sliding_window", None) or getattr(cfg, "attention_chunk_size", None):
        return False
    kinds = set(getattr(cfg, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"}


def _slot_layer_class():
    from transformers.cache_utils import DynamicLayer

    class SlotLayer(DynamicLayer):
        """One layer of the slot buffer: writes the step's key/value at each slot's
        position and returns the filled width (a view, no copy)."""

        def __init__(self, state, keys, values):
            super().__init__()
            self.state, self.keys, self.values = state, keys, values
            self.device, self.is_initialized = keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            st = self.state
            self.keys[st.rows, :, st.lens] = key_states[:, :, 0]
            self.values[st.rows, :, st.lens] = value_states[:, :, 0]
            return self.keys[:, :, :st.width], self.values[:, :, :st.width]

        def get_seq_length(self) -> int:
            return self.state.width

        def get_mask_sizes(self, query_length: int):
            return self.state.width, 0

    return SlotLayer


class _State:
    """What every layer of the buffer shares: slot positions and the attended width."""

    def __init__(self, slots: int, device):
        import torch
        self.rows = torch.arange(slots, device=device)
        self.lens = torch.zeros(slots, dtype=torch.long, device=device)
        self.width = 1


def decode(model, prompt_ids: list[list[int]], seeds: list[list[int]], params, stop_ids: set[int],
           pad_id: int, on_prompt_done) -> None:
    """Sample `params.n` rows for each prompt (token-id lists, processed in the given
    order) with `seeds[i][j]` the stream seed of sample j of prompt i. Calls
    `on_prompt_done(i, rows)` once all n rows of prompt i are finished, each row a dict
    `{"token_ids", "finished", "logp"}` in j order."""
    import torch

    from transformers.cache_utils import Cache

    from .generation import cache_kw, model_device, forward_keep, left_pad, out_cache, pick_tokens

    device = model_device(model)
    n, steps = params.n, params.max_new_tokens
    n_slots = max(1, min(params.batch_size * n, len(prompt_ids) * n))
    capacity = max(len(p) for p in prompt_ids) + steps + 1
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    additive = base.config._attn_implementation == "eager"
    cache_kw = cache_kw(model)
    SlotLayer = _slot_layer_class()

    queue = [(i, j) for i in range(len(prompt_ids)) for j in range(n)]
    queue.reverse()                                    # pop() takes the next sample
    prefilled: dict[int, dict] = {}                    # prompt -> kv rows, first logits
    next_prefill = 0
    remaining = {}                                     # prompt -> samples not yet assigned
    results: dict[int, list] = {}

    st = _State(n_slots, device)
    layers: list = []                                  # SlotLayer per model layer
    logits = None                                      # [S, V] float32
    sample_of = [None] * n_slots                       # slot -> (prompt, j) or None
    step_of = [0] * n_slots
    tokens: list[list[int]] = [[] for _ in range(n_slots)]
    sums = [0.0] * n_slots
    uniforms: list = [None] * n_slots
    pending = torch.zeros(n_slots, dtype=torch.bool)   # slot has logits not yet sampled
    fed = torch.full((n_slots,), pad_id, dtype=torch.long)

    def prefill_more():
        nonlocal next_prefill, logits
        chunk = list(range(next_prefill, min(len(prompt_ids), next_prefill + params.batch_size)))
        next_prefill = chunk[-1] + 1
        ids, mask, pos = left_pad([prompt_ids[i] for i in chunk], pad_id, device)
        out, last = forward_keep(model, 1, input_ids=ids, attention_mask=mask, position_ids=pos,
                                  use_cache=True)
        cache = out_cache(out)
        width = ids.shape[1]
        if not layers:
            for lay in cache.layers:
                k = lay.keys
                shape = (n_slots, k.shape[1], capacity, k.shape[3])
                layers.append(SlotLayer(st, k.new_zeros(shape), lay.values.new_zeros(shape)))
            logits = torch.zeros((n_slots, last.shape[-1]), dtype=torch.float32, device=device)
        first = last[:, -1].float()
        for b, i in enumerate(chunk):
            length = len(prompt_ids[i])
            prefilled[i] = {"kv": [(lay.keys[b, :, width - length:], lay.values[b, :, width - length:])
                                   for lay in cache.layers],
                            "len": length, "logits": first[b]}
            remaining[i] = n

    def assign(slot: int) -> None:
        i, j = queue.pop()
        while i not in prefilled:
            prefill_more()
        p = prefilled[i]
        for lay, (k, v) in zip(layers, p["kv"]):
            lay.keys[slot, :, :p["len"]] = k
            lay.values[slot, :, :p["len"]] = v
        st.lens[slot] = p["len"]
        logits[slot] = p["logits"]
        remaining[i] -= 1
        if remaining[i] == 0:
            del prefilled[i], remaining[i]
        sample_of[slot], step_of[slot], tokens[slot], sums[slot] = (i, j), 0, [], 0.0
        uniforms[slot] = torch.rand(steps, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(seeds[i][j]))
        pending[slot] = True

    def finish(slot: int, done: bool) -> None:
        i, j = sample_of[slot]
        rows = results.setdefault(i, [None] * n)
        rows[j] = {"token_ids": tokens[slot], "finished": done, "logp": sums[slot]}
        sample_of[slot] = None
        st.lens[slot] = 0
        if all(r is not None for r in rows):
            on_prompt_done(i, results.pop(i))

    while True:
        for s in range(len(sample_of)):
            if sample_of[s] is None and queue:
                assign(s)
        picks = pending.nonzero().squeeze(1)
        if picks.numel():
            lg = logits[picks.to(device)]
            u = torch.stack([uniforms[s][step_of[s]] for s in picks.tolist()])
            tok = pick_tokens(lg, u, params)
            lp = (lg.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(lg, dim=-1)).double().cpu()
            pending[picks] = False
            freed = False
            for s, tk, x in zip(picks.tolist(), tok.tolist(), lp.tolist()):
                tokens[s].append(tk)
                sums[s] += x
                step_of[s] += 1
                fed[s] = tk
                if tk in stop_ids or step_of[s] == steps:
                    finish(s, tk in stop_ids)
                    freed = True
            if freed and queue:
                continue                               # refill before the next forward
        busy = [s for s in range(len(sample_of)) if sample_of[s] is not None]
        if not busy:
            break
        if not queue and len(busy) * 2 <= len(sample_of) and len(sample_of) > 1:
            keep = torch.tensor(busy, dtype=torch.long)
            keep_d = keep.to(device)
            for lay in layers:
                lay.keys, lay.values = lay.keys[keep_d], lay.values[keep_d]
            st.rows, st.lens = st.rows[:len(busy)], st.lens[keep_d]
            logits, pending, fed = logits[keep_d], pending[keep], fed[keep]
            sample_of[:] = [sample_of[s] for s in busy]
            step_of[:] = [step_of[s] for s in busy]
            tokens[:] = [tokens[s] for s in busy]
            sums[:] = [sums[s] for s in busy]
            uniforms[:] = [uniforms[s] for s in busy]
            busy = list(range(len(busy)))  # every slot left is busy
        st.width = int(st.lens.max()) + 1
        span = torch.arange(st.width, device=device)[None, :]
        valid = span <= st.lens[:, None]
        mask = valid[:, None, None, :]
        if additive:
            mask = torch.zeros(mask.shape, dtype=layers[0].keys.dtype, device=device).masked_fill(
                ~mask, torch.finfo(layers[0].keys.dtype).min)
        _, last = forward_keep(model, 1, input_ids=fed.to(device)[:, None], attention_mask=mask,
                                position_ids=st.lens[:, None], use_cache=True,
                                **{cache_kw: Cache(layers=layers)})
        logits = last[:, -1].float()
        pending = torch.zeros(len(sample_of), dtype=torch.bool)
        pending[busy] = True
        st.lens += pending.to(st.lens.device).long()
