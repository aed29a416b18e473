"""BARFI-style learned reward blending (Gupta, Chandak et al., NeurIPS 2023; ALGORITHMS.md
Part D §9): `train-policy --method grpo --reward P --reward A --reward B
--reward-weights learn:P` trains on r_φ = 1·R_P + Σ_k φ_k·R_k and learns the weights φ of
the auxiliary rewards so that the policy update raises the primary reward P.

The bi-level objective max_φ J_P(θ(φ)), θ(φ) = one policy-gradient step on J_φ, in its
one-step (identity-Hessian) approximation: after θ' = θ + α·∇θ J_φ(θ),

    dJ_P(θ')/dφ_k ≈ α·⟨∇θ J_P, ∂(∇θ J_φ)/∂φ_k⟩ = α·⟨g_P, g_k⟩,

g_k = ∇θ of the policy-gradient surrogate of reward k alone. Here, on the trainable
parameters only (the LoRA adapter with --lora-r; every weight without), every
`--blend-every` N optimizer steps, on the first micro-batch of the step:

- the surrogate of reward k is S_k = −Σ_{i,t} A^k_i·log πθ(o_i,t)·m_i,t / Σ m (GRPO's
  loss at ρ = 1, token-mean aggregation), A^k the advantage of reward k alone: its
  group-mean-centred value, divided by the group std + 1e-4 (`--scale-rewards group`),
  the batch std (`batch`) or not (`none`), as GRPO does for the blend; a completion the
  scorer gave no value for reward k has A^k = 0;
- one forward pass and one backward per reward (K + 1 for K auxiliaries) give g_P and
  g_k; g_P is kept, each g_k is reduced to ⟨g_P, g_k⟩ and ‖g_k‖² (over processes: the
  mean of these scalars);
- the update (`blend_step`, pure): the inner product normalised to a cosine, so that the
  step does not depend on the gradient scale (LoRA vs full weights, reward scales) and
  α is folded into η_φ = `--blend-lr`:

      φ_k ← max(0, φ_k + η_φ·⟨g_P, g_k⟩ / (‖g_P‖·‖g_k‖))      (0 when a norm is 0),

  projected onto φ_k ≥ 0; the primary weight stays 1; every φ_k starts at 1.

The weights are the combined scorer's (`CombinedScorer.weights`): the one reward
function the trainer calls reads them, so the new φ scores the next rollout.
metrics.jsonl gets `reward_weight/<spec>` (every spec, every logging step) and
`blend/cos/<spec>` (the auxiliaries, on the steps that update); checkpoints keep φ.

Simplified against BARFI (whose formulas ALGORITHMS.md marks UNVERIFIED): φ are scalar
weights (BARFI's can be per state-action, and it learns a discount too); identity
Hessian (one inner step), not Neumann/implicit; the outer gradient ∇θ J_P is taken on
the same training batch, not a held-out primary set; the cosine normalisation is ours.
Methods: grpo, earl, gtpo (GRPO advantages); not rloo or the pair methods; not with
--calibrate (the combined score is replaced by its quantile).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

from ..errors import UsageError
from ..registry import Param

BLEND_EVERY = Param("blend_every", int, 1, "--reward-weights learn:PRIMARY (BARFI; grpo, earl, "
                    "gtpo): update the auxiliary reward weights every N optimizer steps (one "
                    "extra forward and one backward per reward on that step's first "
                    "micro-batch, on the trainable parameters). Simplified: scalar weights, "
                    "one-step identity-Hessian hypergradient, primary gradient on the same "
                    "batch (no held-out set), no learned discount.", low=1)
BLEND_LR = Param("blend_lr", float, 0.1, "--reward-weights learn:PRIMARY: step size of "
                 "phi_k <- max(0, phi_k + lr*cos(g_primary, g_k)), g the policy-gradient of "
                 "each reward alone (the policy lr folded in; cosine: our normalisation).",
                 low=0.0)
PARAMS = (BLEND_EVERY, BLEND_LR)
LEARN = "learn:"
STATE_FILE = "alignkit_blend_state.json"
METHODS = ("grpo", "earl", "gtpo")


# --- the pure update ------------------------------------------------------------------------

def blend_step(phi: Sequence[float], dots: Sequence[float], prim_sq: float,
               aux_sq: Sequence[float], lr: float) -> list[float]:
    """φ_k ← max(0, φ_k + lr·dots_k / (√prim_sq·√aux_sq_k)); the cosine is 0 when a norm is 0."""
    out = []
    for p, d, a in zip(phi, dots, aux_sq):
        denom = math.sqrt(max(prim_sq, 0.0)) * math.sqrt(max(a, 0.0))
        cos = d / denom if denom > 0 else 0.0
        out.append(max(0.0, float(p) + lr * cos))
    return out


def blend_update(phi: Sequence[float], g_prim, g_aux: Sequence, lr: float) -> list[float]:
    """The update from the gradient vectors themselves (lists or 1-D tensors): g_prim the
    primary's, g_aux[k] auxiliary k's."""
    gp = [float(x) for x in g_prim]
    dots, sq = [], []
    for g in g_aux:
        g = [float(x) for x in g]
        if len(g) != len(gp):
            raise ValueError("g_prim and every g_aux must have the same length")
        dots.append(sum(a * b for a, b in zip(gp, g)))
        sq.append(sum(b * b for b in g))
    return blend_step(phi, dots, sum(a * a for a in gp), sq, lr)


def component_advantages(rewards, group: int, scale: str = "group"):
    """[N, K] rewards (NaN: no value) -> [N, K] advantages per reward, GRPO's rule per
    column: centred on the group mean (groups of `group` consecutive rows), divided by
    the group std + 1e-4 ("group"), the batch std + 1e-4 ("batch") or nothing ("none");
    NaN rewards get advantage 0."""
    import torch
    r = rewards.float()
    n, k = r.shape
    g = r.view(n // group, group, k)
    ok = ~torch.isnan(g)
    cnt = ok.sum(1, keepdim=True).clamp(min=1)
    z = torch.where(ok, g, torch.zeros_like(g))
    mean = z.sum(1, keepdim=True) / cnt
    adv = torch.where(ok, g - mean, torch.zeros_like(g))
    if scale == "group":
        var = (adv ** 2).sum(1, keepdim=True) / (cnt - 1).clamp(min=1)
        adv = adv / (var.sqrt() + 1e-4)
    adv = adv.view(n, k)
    if scale == "batch":
        flat_ok = ~torch.isnan(r)
        std = torch.stack([r[flat_ok[:, j], j].std() if flat_ok[:, j].sum() > 1
                           else r.new_tensor(0.0) for j in range(k)])
        adv = adv / (torch.nan_to_num(std, nan=0.0) + 1e-4)
    return adv


# --- the command's side ---------------------------------------------------------------------

def primary_index(weights: str | None, specs: list[str]) -> int | None:
    """`learn:PRIMARY` -> PRIMARY's index in the --reward specs; None for fixed weights."""
    if not isinstance(weights, str) or not weights.startswith(LEARN):
        return None
    primary = weights[len(LEARN):].strip()
    if primary not in specs:
        raise UsageError(f"--reward-weights learn:{primary}: {primary!r} is not one of the "
                         f"--reward specs ({', '.join(specs)})")
    if len(specs) < 2:
        raise UsageError("--reward-weights learn:PRIMARY blends several rewards: give the "
                         "auxiliary rewards too (--reward PRIMARY --reward AUX ...)")
    return specs.index(primary)


def check(method, options: dict, weights: str | None, specs: list[str], scoring) -> int | None:
    """UsageError (exit 2) before any model loads; the primary's index (None: no blend)."""
    k = primary_index(weights, specs)
    if k is None:
        given = [p.flag_name for p in PARAMS if options.get(p.name, p.default) != p.default]
        if given:
            raise UsageError(f"{', '.join(given)} needs --reward-weights learn:PRIMARY")
        return None
    if method.name not in METHODS:
        raise UsageError(f"--reward-weights learn: works with {', '.join(METHODS)} (GRPO "
                         f"advantages), not {method.name}")
    if scoring is not None and scoring.calibrate:
        raise UsageError("--reward-weights learn: cannot be combined with --calibrate (the "
                         "blended score is replaced by its quantile)")
    return k


def static_weights(weights: str | None) -> str | None:
    """The --reward-weights the scorer is built with (learn: starts from all 1)."""
    return None if isinstance(weights, str) and weights.startswith(LEARN) else weights


def trainer_class(cls, weights: str | None):
    """`cls`, or with learn: weights a subclass that learns them (BlendMixin first)."""
    if static_weights(weights) == weights:
        return cls
    return type(f"Blend{cls.__name__}", (BlendMixin, cls), {})


def attach(trainer, scorer, specs: list[str], weights: str | None, options: dict) -> None:
    """Set up the blend on a trainer built from `trainer_class` (a no-op otherwise)."""
    k = primary_index(weights, specs)
    if k is None or not isinstance(trainer, BlendMixin):
        return
    trainer.ak_blend = {"scorer": scorer, "specs": list(specs), "primary": k,
                        "every": options["blend_every"], "lr": options["blend_lr"],
                        "box": _record_components(scorer), "last": None}
    scorer.weights[k] = 1.0


def _record_components(scorer) -> dict:
    """Keep the per-scorer values of the combined scorer's last call (`box["per"]`)."""
    box: dict[str, Any] = {"per": None}
    raw = scorer._raw

    def recording(items):
        per, total = raw(items)
        box["per"] = per
        return per, total

    scorer._raw = recording
    return box


class BlendMixin:
    """The learned blend on a GRPO-family trainer (see the module docstring)."""

    ak_blend: dict | None = None

    def _ak_weights(self) -> list[float]:
        return list(self.ak_blend["scorer"].weights)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        b = self.ak_blend
        if b is None or not self.model.training:
            return out
        import torch
        names = b["scorer"].names
        per = b["box"]["per"] or []
        n = out["completion_ids"].size(0)
        local = torch.tensor([[row.get(s, float("nan")) for s in names] for row in per[:n]],
                             dtype=torch.float32, device=out["completion_ids"].device)
        glob = self.accelerator.gather(local)
        adv = component_advantages(glob, self.num_generations, str(self.scale_rewards))
        i = self.accelerator.process_index
        out["blend_adv"] = adv[i * n:(i + 1) * n]
        return out

    def _compute_loss(self, model, inputs):
        b = self.ak_blend
        if b is not None and self.model.training:
            step = self.state.global_step
            if step % b["every"] == 0 and b["last"] != step and "blend_adv" in inputs:
                b["last"] = step
                self._ak_blend_update(model, inputs)
            metrics = self._metrics["train"]
            for spec, w in zip(b["specs"], self._ak_weights()):
                metrics[f"reward_weight/{spec}"].append(float(w))
        return super()._compute_loss(model, inputs)

    def _ak_blend_update(self, model, inputs) -> None:
        import torch
        b = self.ak_blend
        net = self.accelerator.unwrap_model(model)
        params = [p for p in net.parameters() if p.requires_grad]
        logps, _ = self._forward(net, inputs, entropy=False)
        mask = inputs["completion_mask"].to(logps.dtype)
        adv = inputs["blend_adv"].to(logps.dtype)
        denom = mask.sum().clamp(min=1.0)
        aux = [k for k in range(adv.size(1)) if k != b["primary"]]

        def grad(k: int, retain: bool):
            s = -(adv[:, k:k + 1] * logps * mask).sum() / denom
            gs = torch.autograd.grad(s, params, retain_graph=retain, allow_unused=True)
            return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                              for g, p in zip(gs, params)])

        gp = grad(b["primary"], True)
        dots, sq = [], []
        for j, k in enumerate(aux):
            g = grad(k, j < len(aux) - 1)
            dots.append(gp @ g)
            sq.append(g @ g)
            del g
        stats = torch.stack([gp @ gp, *dots, *sq])
        if self.accelerator.num_processes > 1:
            stats = self.accelerator.reduce(stats, reduction="mean")
        stats = stats.tolist()
        m = len(aux)
        weights = self._ak_weights()
        new = blend_step([weights[k] for k in aux], stats[1:1 + m], stats[0], stats[1 + m:],
                         b["lr"])
        metrics = self._metrics["train"]
        for k, phi, d, a in zip(aux, new, stats[1:1 + m], stats[1 + m:]):
            b["scorer"].weights[k] = phi
            den = math.sqrt(stats[0]) * math.sqrt(a)
            metrics[f"blend/cos/{b['specs'][k]}"].append(d / den if den > 0 else 0.0)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.ak_blend is not None and self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"weights": self._ak_weights()}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if self.ak_blend is not None and path and os.path.exists(path):
            with open(path) as f:
                self.ak_blend["scorer"].weights[:] = json.load(f)["weights"]
