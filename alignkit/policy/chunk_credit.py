"""IPA's chunk-level credit for grpo and earl (`--credit chunk`; ALGORITHMS.md Part D §4,
the ROME report's reading): `ChunkCreditMixin`, the rollout and loss hooks of
`online_trainers._GRPOCredit` (see its docstring for the loss), over the pure functions
of `online_losses` (chunk_ids, chunk_ratios, chunk_clipped_loss, chunk_topr_loss)."""
from __future__ import annotations

import torch

from . import online_losses as L


class ChunkCreditMixin:
    """--credit / --chunk-by / --chunk-clip, and the entropy bonus on the tokens the PG
    term acts on; before `_GRPOBase` in `_GRPOCredit`'s bases."""


    credit, chunk_by, chunk_clip, _ak_gate = "token", "newline", "ppo", None

    def __init__(self, *args, credit: str = "token", chunk_by: str | None = None,
                 chunk_clip: str = "ppo", **kwargs):
        self.credit, self.chunk_by, self.chunk_clip = credit, chunk_by or "newline", chunk_clip
        self._ak_gate = None
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.credit == "chunk":
            ids, mask = out["completion_ids"], out["completion_mask"]
            chunk = torch.zeros_like(ids)
            for i in range(ids.size(0)):
                n = int(mask[i].sum().item())
                if n:
                    row = ids[i, :n].tolist()
                    chunk[i, :n] = L.chunk_ids(L.token_pieces(self._ak.tokenizer, row), self.chunk_by)
            out["chunk_ids"] = chunk
        return out

    def _compute_loss(self, model, inputs):
        self._ak_last_entropies, self._ak_gate = None, None
        if self.credit == "chunk":
            return self._chunk_loss(model, inputs)
        loss = super()._compute_loss(model, inputs)
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float()
        if self._ak_gate is not None:  # earl: the bonus acts on the gated tokens, as the PG term
            mask = mask * self._ak_gate.float()
        return self._ak_entropy_term(loss, self._ak_last_entropies, mask, self._ga_scale())

    def _chunk_loss(self, model, inputs):
        from .online_trainers import global_mean

        logps, entropies = self._forward(model, inputs)
        mask = inputs["completion_mask"].float()
        old = self._ak_old_logps(logps, inputs)
        adv = inputs["advantages"]
        ratio, rho, counts = L.chunk_ratios(logps, old, inputs["chunk_ids"], mask)
        if self.chunk_clip == "ipa":
            per = L.chunk_topr_loss(logps, ratio, adv)
        else:
            per = L.chunk_clipped_loss(ratio, adv, self.epsilon_low, self.epsilon_high)
        bonus_mask = mask
        if self.top_entropy_quantile < 1.0:  # earl's gate (TRL applies it before the KL)
            gate = self.get_high_entropy_mask(entropies, mask, 1 - self.top_entropy_quantile).float()
            per, bonus_mask = per * gate, mask * gate
        if self.beta != 0.0:
            d = inputs["ref_per_token_logps"] - logps
            per = per + self.beta * (torch.exp(d) - d - 1)
        loss = self._ak_aggregate(per, mask, inputs)
        metrics = self._metrics["train" if self.model.training else "eval"]
        real = (counts > 0).float()
        a = adv[:, None] if adv.dim() == 1 else adv[:, :1]
        clipped = ((rho < 1 - self.epsilon_low) & (a < 0)) | ((rho > 1 + self.epsilon_high) & (a > 0))
        metrics["chunk/per_completion"].append(self.accelerator.gather(real.sum(-1)).mean().item())
        metrics["chunk/clip_frac"].append(global_mean(self, clipped.float(), real))
        metrics["entropy"].append(global_mean(self, entropies.detach(), mask))
        return self._ak_entropy_term(loss, entropies, bonus_mask, self._ga_scale())
