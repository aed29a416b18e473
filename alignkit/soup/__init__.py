"""Model merging (`merge-soup`): a registry of merge methods and a streaming merge.

Methods (ALGORITHMS.md Part B §14; τ_i = θ_i − θ_base, all arithmetic in float32):

- `linear`: θ = Σ w_i θ_i / Σ w_i (`--no-normalize`: Σ w_i θ_i). The SALSA soup (§11).
- `uniform`: the plain mean of the models (linear with equal weights).
- `slerp`: two models, v0 = the base (or the first model), v1 = the other; per tensor
  Ω = arccos(⟨v̂0, v̂1⟩), θ = [sin((1−t)Ω) v0 + sin(tΩ) v1] / sin Ω, lerp when |cos Ω| > 0.9995.
- `task-arithmetic`: θ = θ_base + λ Σ w_i τ_i.
- `ties`: trim each τ_i to its k = round(density·numel) largest |τ_i|; elect a sign per entry,
  γ = sign(Σ w_i τ̂_i) (`sum`) or sign(Σ sign(w_i τ̂_i)) (`count`), ties going to +; merge the
  agreeing entries Σ w_i τ̂_i·1[sign(w_i τ̂_i) = γ], divided by Σ w_i·1[...] when normalising
  (entries where none agree stay at the base); θ = θ_base + λ·merged.
- `dare-linear` / `dare-ties`: drop each entry of τ_i with probability 1 − density (a
  Bernoulli mask from a generator seeded by (seed, tensor name, model index), see
  `dare_mask`, so a tensor's mask does not depend on sharding or order), then task
  arithmetic or the TIES election above. Rescale: `density` (default) divides the kept
  entries by density as in the DARE paper, which keeps E[τ̃] = τ entry by entry;
  mergekit instead rescales each masked task vector to its original L1 norm
  (`--rescale l1`): the norm then holds exactly per tensor rather than in expectation
  (on large tensors the factor is close to 1/density anyway); `none` keeps the kept
  entries as they are.

Streaming: inputs are read tensor by tensor with positioned reads (`os.preadv`) straight
into one tensor buffer, not through `safetensors.safe_open`: safe_open memory-maps the
file and every page it touches stays resident while the handle is open, so reading
three 540 MB inputs that way grows RSS by ~1.6 GB (measured: +525 MB per fully read
input). The safetensors header is parsed and validated here (8-byte length + JSON).
Output shards are planned from the inputs' shapes before any arithmetic, the header
is written first and each merged tensor is appended as soon as it is computed, so peak
memory is about one tensor per input plus one output tensor (`linear` and
`task-arithmetic` accumulate, holding two or three tensors at a time).

Inputs: full model folders (sharded or not; `model.safetensors.index.json` is read) or
PEFT LoRA adapter folders. An adapter is always merged into its own base first, tensor
by tensor (W = W_base + s·B·A, s = alpha/r or alpha/√r with rsLoRA; `modules_to_save`
tensors replace the base's), so every method sees it as a full model; adapters of
different ranks (or on different but compatible bases) mix freely with full models.
Adapters are never averaged in adapter space, even when they share base and rank: the
mean of the B's times the mean of the A's is not the mean of the B·A's, so that would
not be the soup of the models. An adapter's own (small) tensors are read whole. DoRA,
non-LoRA adapters and adapters that change a tied embedding are refused.

Tied embeddings: an input whose config ties word embeddings has no output head of its
own (the file may lack `lm_head.weight`, and transformers ignores it when present). If
every input is tied, the output is tied and holds no head; otherwise the output is
untied and its head merges each input's effective head (a tied input contributes its
input embedding), and config.json says `tie_word_embeddings: false`.

Non-float tensors (rare integer buffers) are copied from the reference model.
"""
from __future__ import annotations

from .methods import (METHODS, Job, MergeConfig, Method, Param, all_params, build_config,
                      dare_drop, dare_mask, methods_help, param_help, parse_size, parse_weights,
                      register, ties_combine, trim_top)


def merge(cfg: MergeConfig, output, *, force: bool = False) -> dict:
    """Merge the models of `cfg` into the folder `output` (atomically); see engine.merge."""
    from .engine import merge as _merge
    return _merge(cfg, output, force=force)


__all__ = ["METHODS", "Job", "MergeConfig", "Method", "Param", "all_params", "build_config",
           "dare_drop", "dare_mask", "merge", "methods_help", "param_help", "parse_size",
           "parse_weights", "register", "ties_combine", "trim_top"]
