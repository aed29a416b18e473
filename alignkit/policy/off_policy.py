"""Semi-off-policy group members for grpo and earl (`--off-policy FILE`; ALGORITHMS.md
Part D §11, SOPHIA's text-only core): the flags, their checks, the loader of the file and
`OffPolicyMixin`, the rollout and loss hooks `_GRPOBase` takes from it.

A samples file (gen-pairs', e.g. of a stronger model) is matched to the prompts by id,
else by `records.derive_id` of the prompt; a matched group of G keeps G − k policy
samples and takes k = floor(S·G) (at least 1 when S > 0, at most what the prompt has)
of the file's completions in its last places, cycling through them with the step.
They are tokenized by the policy's tokenizer (+ eos unless `finished: false`; cut at
--max-new-tokens, which drops their logp), scored by the same rewards, and the group
advantage is TRL's over the mixed group. Their PG term is −w·A·log πθ per token (no
PPO clip), w = min(πθ(y|x)/μ(y|x), κ) detached, `--off-policy-is sequence` or
`token-mean` (the default: exp of the log-ratio over the n policy tokens, as a
whole-sequence ratio between two models all but vanishes), μ the record's summed
`logp` (compared as given: its tokenizer and temperature are the file's), else πθ_old
on the same tokens (w = 1 at one iteration per rollout: reward-weighted SFT, the
ALGORITHMS.md fallback); κ `--off-policy-clip` (1.0; 0 = none). On-policy members keep
TRL's loss; the KL term covers every member; `kl_ref` is over the policy's samples.
metrics.jsonl: `off_policy/share`, `off_policy/reward`, `off_policy/weight`; samples.jsonl
marks them `source: "off-policy"`. earl's entropy gate multiplies their term per token
as it does TRL's. Simplified from SOPHIA: one stage (no on-policy
context + teacher reasoning split, no propagated context reward), any --loss but not
with --credit chunk; one process per group (a group split over processes stays on-policy).

Nothing here imports torch at module level (the Params are read when listing methods).
"""
from __future__ import annotations

import math

from .. import console
from ..errors import DataError, UsageError
from ..registry import Param

OFF_POLICY = Param("off_policy", str, None, "A samples JSONL (gen-pairs' output, e.g. of a "
                   "stronger model) whose completions join the groups of the prompts they match "
                   "(by id, else by the id derived from the prompt), scored by the same rewards, "
                   "with the group advantage over the mixed group and the PG term -w*A*log p, "
                   "w = min(pi/mu, kappa) detached (SOPHIA's text-only core, simplified: one "
                   "stage, no propagated context reward).", metavar="FILE")
OFF_POLICY_SHARE = Param("off_policy_share", float, 0.25, "--off-policy: share of each group of "
                         "--num-generations replaced by off-policy completions: floor(S*G), at "
                         "least 1 when S > 0 and the prompt has any, at most as many as it has.",
                         low=0.0, high=1.0)
OFF_POLICY_IS = Param("off_policy_is", str, "token-mean", "--off-policy importance weight: "
                      "sequence = min(pi(y|x)/mu(y|x), kappa); token-mean = min(exp((log pi - "
                      "log mu)/n), kappa), the geometric mean over the n policy tokens (the "
                      "default: a whole-sequence ratio between two models all but vanishes). mu "
                      "is the record's logp; without one (or when cut by --max-new-tokens), "
                      "pi_old on the same tokens (w = 1 at one iteration per rollout).",
                      choices=("sequence", "token-mean"))
OFF_POLICY_CLIP = Param("off_policy_clip", float, 1.0, "--off-policy: kappa, the truncation "
                        "of the importance weight (0 = no truncation).", low=0.0)
OFF_POLICY_PARAMS = (OFF_POLICY, OFF_POLICY_SHARE, OFF_POLICY_IS, OFF_POLICY_CLIP)


def check_off_policy(o: dict) -> dict:
    """--off-policy*: UsageError (exit 2) before any model loads; the OnlineContext
    settings ({} without --off-policy)."""
    if o["off_policy"] is None:
        for prm in OFF_POLICY_PARAMS[1:]:
            if o[prm.name] != prm.default:
                raise UsageError(f"{prm.flag_name} needs --off-policy FILE")
        return {}
    if o.get("credit") == "chunk":
        raise UsageError("--off-policy cannot be combined with --credit chunk")
    return {"off_share": o["off_policy_share"], "off_is": o["off_policy_is"],
            "off_clip": o["off_policy_clip"]}


def load_off_policy(path: str, records: list[dict]) -> dict[int, list[dict]]:
    """The off-policy completions per training record index: a samples file (DataError,
    exit 3, at file:line), matched by id, else by `records.derive_id` of the prompt (a
    prompt matched by neither gets none). Items {text, logp (None: absent), finished}."""
    from ..records import derive_id
    from ..recordset import load
    from ..text import completion_text
    off = load(path, "samples")
    by_id: dict[str, list[dict]] = {}
    by_prompt: dict[str, list[dict]] = {}
    for i, rec in enumerate(off.records):
        items = []
        for j, c in enumerate(rec["completions"]):
            try:
                text = completion_text(c["text"])
            except DataError as e:
                raise off.error(i, f"completions[{j}].text", e.problem) from None
            fin = c.get("finished", True)
            if not isinstance(fin, bool):
                raise off.error(i, f"completions[{j}].finished", "must be true or false")
            logp = c.get("logp")
            items.append({"text": text, "logp": None if logp is None else float(logp),
                          "finished": fin})
        by_id.setdefault(rec["id"], []).extend(items)
        by_prompt.setdefault(derive_id(rec["prompt"]), []).extend(items)
    out = {}
    for k, r in enumerate(records):
        items = by_id.get(r["id"]) or by_prompt.get(derive_id(r["prompt"]))
        if items:
            out[k] = items
    console.info(f"--off-policy: {sum(map(len, out.values()))} completions for {len(out)} of "
                 f"{len(records)} prompts")
    if not out:
        console.warn(f"--off-policy {path}: no record matches a training prompt (by id or "
                     "prompt); training is on-policy")
    return out


class OffPolicyMixin:
    """The --off-policy hooks of `online_trainers._GRPOBase` (before OnlineMixin in its
    bases, so `super()` reaches OnlineMixin's rollout and TRL's loss)."""

    # --- semi-off-policy members (--off-policy; ALGORITHMS.md Part D §11, SOPHIA) -----------
    # A group of G = num_generations keeps its first G - k policy samples and takes k
    # completions of the off-policy file in its last places (k = off_policy_count:
    # floor(share·G), at least 1, at most what the prompt has; picked cycling through the
    # prompt's list from (step·k) mod n). They are tokenized with the policy's tokenizer
    # (text, then eos unless the record says finished: false; cut at max_new_tokens, which
    # drops their logp), scored by the same reward functions, and TRL's advantage is taken
    # over the mixed group. In the loss their PG term is −w·A·log πθ (online_losses), w the
    # detached, clipped importance weight; on-policy members keep TRL's loss unchanged.

    def _ak_mix_off_policy(self, rows: list[dict], G: int) -> list[dict]:
        from . import online_losses as L
        ctx, batch = self._ak, getattr(self, "_ak_batch_rows", None)
        if not G or batch is None or len(batch) != len(rows):
            if not getattr(self, "_ak_off_warned", False):
                console.warn("--off-policy: this rollout's groups are split over processes; "
                             "its completions are all on-policy")
                self._ak_off_warned = True
            return rows
        out, step = list(rows), self.state.global_step
        for start in range(0, len(rows), G):
            pool = ctx.off_policy.get(batch[start], [])
            k = L.off_policy_count(ctx.off_share, G, len(pool))
            for j in range(k):
                item = pool[(step * k + j) % len(pool)]
                out[start + G - k + j] = self._ak_off_row(item)
        return out

    def _ak_off_row(self, item: dict) -> dict:
        """A sampler row for one off-policy completion (policy tokenizer, eos, cut)."""
        from ..text import encode_completion
        tok = self._ak.tokenizer
        ids = encode_completion(tok, item["text"], add_eos=item.get("finished", True) is not False)
        logp, finished = item.get("logp"), item.get("finished", True) is not False
        if len(ids) > self.max_completion_length:
            ids, logp, finished = ids[:self.max_completion_length], None, False
        return {"token_ids": ids, "text": item["text"], "logp": logp, "n_tokens": len(ids),
                "finished": finished, "off_policy": True}

    def _generate_and_score_completions(self, inputs):
        self._ak_batch_rows = [x.get("row") for x in inputs]
        out = super()._generate_and_score_completions(inputs)
        if self._ak.off_policy is None:
            return out
        import torch
        device = out["completion_ids"].device
        rows = self._ak_rows if self.model.training else [{}] * len(inputs)
        off = torch.tensor([bool(r.get("off_policy")) for r in rows], device=device)
        mu = [r["logp"] if r.get("off_policy") and r.get("logp") is not None else math.nan
              for r in rows]
        out["ak_off"] = off
        out["ak_off_mu"] = torch.tensor(mu, device=device, dtype=torch.float64)
        mode = "train" if self.model.training else "eval"
        all_off = self.accelerator.gather(off)
        self._metrics[mode]["off_policy/share"].append(all_off.float().mean().item())
        if self._ak_rewards is not None and bool(all_off.any()):
            r = self._ak_rewards[:, 0].to(device)[all_off]
            self._metrics[mode]["off_policy/reward"].append(torch.nanmean(r.float()).item())
        return out

    def _compute_loss(self, model, inputs):
        """TRL's loss with the off-policy members' advantages zeroed (their KL term stays),
        plus their weighted term −w·A·log πθ aggregated by the same --loss normaliser."""
        off = inputs.get("ak_off")
        if off is None:
            return super()._compute_loss(model, inputs)
        adv = inputs["advantages"]
        keep = (~off).to(adv.dtype)
        loss = super()._compute_loss(model, {**inputs, "advantages":
                                             adv * (keep if adv.dim() == 1 else keep[:, None])})
        return loss + self._ak_off_policy_loss(self._ak_last_logps, inputs)

    def _ak_off_policy_loss(self, logps, inputs: dict):
        import torch

        from . import online_losses as L
        ctx, off = self._ak, inputs["ak_off"]
        mask = (inputs["completion_mask"] * inputs.get("tool_mask", 1)).float()
        old = self._ak_old_logps(logps, inputs)
        mu = inputs["ak_off_mu"]  # NaN: no behaviour logp, πθ_old on the same tokens instead
        mu = torch.where(torch.isnan(mu), (old.double() * mask).sum(-1), mu)
        seq = (logps.detach().double() * mask).sum(-1)
        w = L.off_policy_weights(seq, mu, mask.sum(-1), ctx.off_is, ctx.off_clip) * off
        per = L.off_policy_token_loss(logps, w, inputs["advantages"])
        if getattr(self, "_ak_gate", None) is not None:  # earl: TRL's pass set the entropy gate
            per = per * self._ak_gate.to(per.dtype)
        mode = "train" if self.model.training else "eval"
        term = self._ak_aggregate(per, mask, inputs)  # --loss's aggregation, as TRL's loss
        totals = self.accelerator.reduce(torch.stack([w.sum(), off.double().sum()]), reduction="sum")
        if totals[1] > 0:
            self._metrics[mode]["off_policy/weight"].append((totals[0] / totals[1]).item())
        return term
