"""Per-token log-probabilities of a causal LM on CPU, without the full logits tensor.

TRL's DPO trainer patches the model with a fused LM head (`add_fused_lm_head`): the
forward returns per-token log-probs (and entropy, mean logit, top-1 flags for its
metrics) computed over vocabulary tiles. On CUDA that is a Triton kernel over the
labelled positions only. On CPU, TRL scores every position of the padded batch,
prompts and padding included, with a torch fallback that makes a dozen full passes
(and fresh multi-hundred-megabyte temporaries) per tile: with SmolLM2's 49k
vocabulary that is most of a DPO step.

`fused_forward` computes the same `FusedCausalLMOutput` fields on CPU from the
backbone's hidden states: only the positions with a label, in row chunks small enough
to stay in the allocator's heap, with a custom autograd function that keeps the
hidden states and the log-normaliser and recomputes each chunk's logits in backward
(the memory profile of TRL's kernel). The values match TRL's head (tests compare
them, gradients included). For models it does not cover (logit soft-capping or
scaling, MoE router losses, non-CPU devices) `supported` says no and the caller keeps
the model's own fused head. Entropy comes without a gradient (DPO only logs it).
"""
from __future__ import annotations

import torch

CHUNK_ROWS = 128  # 128 x 49152 fp32 logits = 25 MB: below glibc's largest mmap threshold
STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


class _ChunkedLogProb(torch.autograd.Function):
    """log p(target) per row of `hidden` [N, D] under `weight` [V, D] (+ bias), and the
    requested statistics (no gradient) of each row's distribution."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, dtype, outputs, temperature=1.0):
        n = hidden.size(0)
        logp = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        stats = {k: hidden.new_empty(n, dtype=torch.bool if k == "is_top1" else torch.float32)
                 for k in outputs if k in STATS}
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        for s in range(0, n, CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, n)
            z = _logits(hidden[s:e].to(dtype), w, b, temperature)
            norm = torch.logsumexp(z, dim=-1)
            t = targets[s:e].unsqueeze(-1)
            zt = z.gather(-1, t).squeeze(-1)
            lse[s:e] = norm
            logp[s:e] = zt - norm
            if "entropy" in stats:
                p = torch.exp(z - norm.unsqueeze(-1))
                stats["entropy"][s:e] = norm - (p * z).sum(-1)
            if "log_sum_sq_probs" in stats:
                stats["log_sum_sq_probs"][s:e] = torch.logsumexp(2 * z, dim=-1) - 2 * norm
            if "mean_logits" in stats:
                stats["mean_logits"][s:e] = z.mean(-1)
            if "is_top1" in stats:
                stats["is_top1"][s:e] = z.argmax(-1) == targets[s:e]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.dtype = dtype
        ctx.temperature = temperature
        ctx.mark_non_differentiable(*stats.values())
        return (logp, *stats.values())

    @staticmethod
    def backward(ctx, grad_logp, *_):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, t = ctx.dtype, ctx.temperature
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        w = weight.to(dtype)
        b = bias.to(dtype) if bias is not None else None
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
        for s in range(0, hidden.size(0), CHUNK_ROWS):
            e = min(s + CHUNK_ROWS, hidden.size(0))
            h = hidden[s:e].to(dtype)
            g = grad_logp[s:e].float()
            # d log p_t / d z_j = 1[j = t] - p_j
            gz = torch.exp(_logits(h, w, b, t) - lse[s:e].unsqueeze(-1)).mul_(-g.unsqueeze(-1))
            gz.scatter_add_(-1, targets[s:e].unsqueeze(-1), g.unsqueeze(-1))
            gz = (gz / t if t != 1.0 else gz).to(dtype)  # z = (h w^T + b) / t
            if need_h:
                grad_h[s:e] = (gz @ w).to(hidden.dtype)
            if need_w:
                grad_w += (gz.t() @ h).float()
            if need_b:
                grad_b += gz.float().sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None,
                grad_b.to(bias.dtype) if need_b else None, None, None, None, None)


def _logits(h, w, b, temperature=1.0):
    z = h @ w.t()
    if b is not None:
        z = z + b
    z = z.float()
    return z / temperature if temperature != 1.0 else z


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def supported(model) -> bool:
    """Whether `fused_forward` computes this model's head exactly: a CPU causal LM with
    a plain linear head (no soft-capping, logit scaling or MoE router loss)."""
    base = _base(model)
    try:
        cfg = base.config.get_text_config()
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return False
    if head is None or not isinstance(head, torch.nn.Linear) or head.weight.device.type != "cpu":
        return False
    if base.config is not cfg:  # vision-language wrappers: leave them to TRL
        return False
    if any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in
           ("final_logit_softcapping", "logit_scale", "output_multiplier", "lm_head_multiplier",
            "logits_scaling")):
        return False
    if getattr(cfg, "output_router_logits", False):
        return False
    return hasattr(base, base.base_model_prefix)


def enabled(model) -> bool:
    """Whether alignkit's trainers use this head for `model`: `supported`, unless the
    environment sets ALIGNKIT_CPU_HEAD=0 (TRL's fused head then, for comparison)."""
    import os
    return os.environ.get("ALIGNKIT_CPU_HEAD", "1") != "0" and supported(model)


def fused_forward(model, input_ids, attention_mask, labels, outputs=("log_probs",) + STATS,
                  temperature: float = 1.0, fp32_head: bool = False):
    """`model(input_ids, attention_mask, labels=labels, fused_lm_head=True)` for a model
    that `supported` accepts: a `FusedCausalLMOutput` whose per-token fields are
    [N, T-1], zero where the next-token label is -100. `temperature` divides the logits
    and `fp32_head` computes the head in float32 under autocast, as TRL's
    `add_fused_lm_head(temperature=, cast_lm_head_to_fp32=)` do (the online trainers)."""
    from trl.trainer.utils import FusedCausalLMOutput
    base = _base(model)
    backbone = getattr(base, base.base_model_prefix)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask,
                      use_cache=False).last_hidden_state[:, :-1]
    shifted = labels[:, 1:]
    mask = shifted != -100
    head = base.get_output_embeddings()
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else hidden.dtype
    if fp32_head:
        dtype = torch.float32
    wanted = tuple(k for k in STATS if k in outputs)
    with torch.autocast("cpu", enabled=False):
        values = _ChunkedLogProb.apply(hidden[mask], head.weight, head.bias, shifted[mask], dtype,
                                       wanted, float(temperature))
    fields = {}
    for name, v in zip(("log_probs", *wanted), values):
        fields[name] = v.new_zeros(mask.shape).masked_scatter(mask, v)
    loss = -fields["log_probs"].sum() / mask.sum().clamp(min=1)
    return FusedCausalLMOutput(loss=loss, label_mask=mask, **fields)
