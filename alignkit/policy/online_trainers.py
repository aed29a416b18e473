"""The online trainers: TRL's GRPOTrainer and RLOOTrainer, sampling with alignkit's
sampler, plus GRPOTrainer subclasses for the losses TRL lacks.

- `OnlineMixin` (every online trainer): completions come from `alignkit.generation.sample`
  (the chat-template prompt encoding of gen-pairs and eval, per-sample random streams
  keyed by (seed, step, process)), not from `model.generate`, or, with `--engine vllm`
  (`OnlineContext.engine`), from a `VllmEngine` with the same prompt encoding and
  per-sample seeds. The engine samples from its own copy of the weights: before
  sampling at every step that is a multiple of `sync_every` (and at the first sampling)
  the policy's full weights are pushed into it (`weight_sync.sync_to_engine`), so with
  sync_every K > 1 the samples lag the policy by up to K-1 steps (slightly off-policy),
  and their `logp` is the engine's; `logp_ref` is then teacher-forced by the HF
  reference (`generation.token_logps`), as with LoRA on the HF engine. One process only.
  It logs `kl_ref`, the
  sequence-level log-ratio mean_i [log πθ(y_i) − log πref(y_i)] of the sampled
  completions (temperature 1; an estimate of KL(πθ‖πref) when sampling at
  temperature 1 from the policy), and every `sample_every` steps writes the sampled
  completions with their rewards to `samples.jsonl` (samples records). The reference
  is a separate model (full fine-tuning, `--ref-model`, ipo-md) or, with LoRA, the
  base with the adapter disabled.
- Every trainer: `entropy_coef` C (--entropy-coef) makes the loss loss − C·Ĥ, Ĥ the
  mean token entropy (TRL's fused head, which keeps the gradient) over the tokens the
  loss acts on (earl: the gated tokens), divided by the gradient accumulation like the
  loss (online_losses.entropy_bonus); `entropy_bonus/entropy` (Ĥ) and `entropy_bonus`
  (C·Ĥ) go to metrics.jsonl. TRL's own `entropy_coef` stays 0 (it exists for GRPO
  only); the trainers whose loss is TRL's take the entropies of TRL's loss pass.
- `AlignkitGRPOTrainer`: TRL's GRPO loss unchanged (grpo), or with `credit="chunk"`
  IPA's chunk-level ratios and clip (ALGORITHMS.md Part D §4, `_GRPOCredit`; earl too).
- `_GRPOBase` with `OnlineContext.off_policy` (grpo, earl `--off-policy`; Part D §11, SOPHIA):
  off-policy completions replace the last k members of a group after sampling
  (`_ak_mix_off_policy`), carry `ak_off` / `ak_off_mu` (behaviour logp, NaN: absent) in the
  rollout, and get the term −w·A·log πθ in `_compute_loss` (TRL's loss with their
  advantages zeroed, plus that term under the same --loss normaliser).
- `GTPOTrainer`: GTPO (TRL has no GTPO): conflict-token weights and the entropy filter
  of ALGORITHMS.md Part B §2 (online_losses.py); no reference model in the loss.
- `EARLTrainer`: EARL (TRL has only the batch-scope gate `top_entropy_quantile`): the
  policy-gradient term gated to high-entropy tokens, per batch (TRL's gate) or per
  response; the KL term is kept.
- `AlignkitRLOOTrainer`: TRL's RLOO loss unchanged (rloo).
- `PairTrainer`: two samples per prompt, scorer labels, and the pair losses TRL lacks:
  P3O (Part A §4) and online IPO / IPO-MD (Part A §1; samples from the policy, or from
  the geometric mixture with the reference for ipo-md).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer, RLOOTrainer
from trl.models import prepare_deepspeed, prepare_fsdp, unwrap_model_for_generation
from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model, split_tensor_dict, use_adapter

from .. import console
from ..errors import UsageError
from ..generation import SampleParams, encode_prompt, sample, token_logps
from ..io import dumps
from ..records import Text
from . import online_losses as L
from .chunk_credit import ChunkCreditMixin
from .off_policy import OffPolicyMixin
from .online_head import OnlineHeadMixin

STATE_FILE = "alignkit_online_state.json"


@dataclass
class OnlineContext:
    """What the trainers need from the command: the prompt records, the tokenizer, the
    sampling settings and where samples go."""
    records: list[dict]
    tokenizer: Any
    work: Path
    seed: int
    sample_every: int = 0
    alpha: float = 0.0                 # ipo-md mixture weight of the reference
    gen: dict = field(default_factory=dict)
    resumed: bool = False
    engine: Any = None                 # a VllmEngine (--engine vllm), else None: the HF sampler
    sync_every: int = 1                # push the weights to `engine` at steps % sync_every == 0
    # --off-policy (grpo): record index -> [{"text", "logp" (None: absent), "finished"}]
    off_policy: dict | None = None
    off_share: float = 0.25            # the share of each group replaced (online_losses.off_policy_count)
    off_is: str = "token-mean"         # "sequence" | "token-mean" (online_losses.off_policy_weights)
    off_clip: float = 1.0              # κ (0: no clip)
    step_stops: dict = field(default_factory=dict)  # step prompts: rendered -> separator (steps.py)
    _ids: dict = field(default_factory=dict)

    def encode(self, rendered: str) -> list[int]:
        if rendered not in self._ids:
            self._ids[rendered] = encode_prompt(self.tokenizer, rendered)
        return self._ids[rendered]


def as_completion(text: str, prompt: Text):
    """A completion in its prompt's format (TRL: a conversational prompt gets one
    assistant message)."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


class OnlineMixin(OnlineHeadMixin):
    """Sampling, the reference, `kl_ref` and samples.jsonl for TRL's online trainers.

    The config's beta is 0 while TRL builds the trainer, so TRL loads no reference of
    its own (it would reload the policy's folder); `ref_model` (or, with LoRA and no
    `ref_model`, the adapter-disabled policy) is the reference."""

    ak_entropy_coef = 0.0   # class defaults: a trainer built without __init__ (tests) has them
    _ak_last_entropies = None
    _ak_last_logps = None   # the last per-token log-probs of TRL's pass (--off-policy)

    def __init__(self, *args, ctx: OnlineContext, ref_model=None, entropy_coef: float = 0.0,
                 **kwargs):
        self.ak_entropy_coef = float(entropy_coef)  # --entropy-coef C: loss - C * H
        self._ak_last_entropies = None
        cfg = kwargs["args"]
        beta, cfg.beta = cfg.beta, 0.0
        try:
            super().__init__(*args, **kwargs)
        finally:
            cfg.beta = beta
        self._ak_init(ctx, ref_model, beta)

    def _ak_init(self, ctx: OnlineContext, ref_model, beta: float) -> None:
        self.beta = beta
        self.args.beta = beta
        self._ak = ctx
        self._ak_rows: list[dict] = []
        self._ak_rewards = None
        self._ak_synced_step: int | None = None  # the step whose weights the engine holds
        if ctx.engine is not None and self.accelerator.num_processes > 1:
            raise UsageError("--engine vllm runs one engine in one process; this run has "
                             f"{self.accelerator.num_processes} processes: launch one process "
                             "or use --engine hf")
        if ref_model is not None:
            add_fused_lm_head(ref_model, temperature=self.temperature)
            if self.args.disable_dropout:
                disable_dropout_in_model(ref_model)
            if self.is_deepspeed_enabled:
                ref_model = prepare_deepspeed(ref_model, self.accelerator)
            elif self.is_fsdp_enabled:
                ref_model = prepare_fsdp(ref_model, self.accelerator)
            else:
                ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model = ref_model

    # --- the reference ---------------------------------------------------------------------
    def _ak_ref_context(self):
        """Where no separate reference is loaded (LoRA), the base: the adapter disabled."""
        if self.ref_model is not None:
            return nullcontext()
        model = self.accelerator.unwrap_model(self.model)
        return use_adapter(model, adapter_name="ref" if "ref" in model.peft_config else None)

    def _ak_ref_token_logps(self, out: dict) -> torch.Tensor:
        """Per-token reference log-probs [B, T] of a rollout's completions (TRL's fused
        head at the sampling temperature, as TRL's own reference pass)."""
        input_ids = torch.cat([out["prompt_ids"], out["completion_ids"]], dim=1)
        mask = torch.cat([out["prompt_mask"], out["completion_mask"]], dim=1)
        with torch.no_grad(), self._ak_ref_context():
            logps, _, _ = self._get_per_token_logps_and_entropies(
                self.ref_model if self.ref_model is not None else self.model, input_ids, mask,
                out["completion_ids"].size(1), batch_size=self.args.per_device_train_batch_size)
        return logps

    # --- the entropy bonus (--entropy-coef) -------------------------------------------------
    def _get_per_token_logps_and_entropies(self, *args, **kwargs):
        """TRL's (on CPU, alignkit's head: OnlineHeadMixin), keeping the last entropies
        (with gradient in the loss pass) for the bonus of the trainers whose loss is
        TRL's own (grpo, earl, rloo)."""
        out = super()._get_per_token_logps_and_entropies(*args, **kwargs)
        self._ak_last_entropies = out[1]
        self._ak_last_logps = out[0]
        return out

    def _ak_entropy_term(self, loss: torch.Tensor, entropies, mask: torch.Tensor,
                         scale: float = 1.0) -> torch.Tensor:
        """loss − C·Ĥ/scale (online_losses.entropy_bonus: the token mean over `mask`, the
        tokens the loss acts on; `scale` the loss's own gradient-accumulation divisor).
        Logs `entropy_bonus/entropy` (Ĥ) and `entropy_bonus` (C·Ĥ) when C > 0."""
        if not self.ak_entropy_coef or entropies is None:
            return loss
        h = L.entropy_bonus(entropies, mask)
        metrics = self._metrics["train" if self.model.training else "eval"]
        world = global_mean(self, entropies.detach(), mask.to(entropies.dtype))
        metrics["entropy_bonus/entropy"].append(world)
        metrics["entropy_bonus"].append(self.ak_entropy_coef * world)
        return loss - self.ak_entropy_coef * h / scale

    # --- sampling --------------------------------------------------------------------------
    def _tokenize_prompts(self, prompts: list):
        """The dataset's `prompt` is the chat-templated text; encode it as the sampler does."""
        self._ak_texts = list(prompts)
        return [self._ak.encode(p) for p in prompts], None, {}

    def _ak_step_seed(self) -> int:
        key = f"{self._ak.seed}\x00{self.state.global_step}\x00{self.accelerator.process_index}"
        return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & ((1 << 63) - 1)

    def _ak_generate(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        texts = self._ak_texts
        G = self.num_generations
        grouped = len(texts) % G == 0 and all(
            len(set(texts[k:k + G])) == 1 for k in range(0, len(texts), G))
        n = G if grouped else 1
        unique = texts[::n]
        params = SampleParams(n=n, temperature=self.temperature, top_p=self.top_p,
                              top_k=int(self.top_k or 0), max_new_tokens=self.max_completion_length,
                              seed=self._ak_step_seed(), batch_size=max(1, len(unique)))
        keys = [str(i) for i in range(len(unique))]
        engine = self._ak.engine
        ref = self.accelerator.unwrap_model(self.ref_model) if self.ref_model is not None else None
        with unwrap_model_for_generation(
                self.model_wrapped, self.accelerator,
                gather_deepspeed3_params=self.args.ds3_gather_for_generation) as model:
            if engine is not None:
                self._ak_sync(model)
                groups = engine.sample(unique, params, raw=True, keys=keys)
            else:
                groups = sample(model, self._ak.tokenizer, unique, params, raw=True, ref_model=ref,
                                alpha=self._ak.alpha, keys=keys, return_ids=True,
                                progress=console.NullTask())
            rows = [row for group in groups for row in group]
            if self._ak.step_stops:  # step prompts: one step per completion (policy/steps.py)
                from .steps import cut_rows
                cut_rows(rows, texts, self._ak.step_stops, self._ak.tokenizer, prompt_ids,
                         model, ref)
            if ref is None or engine is not None:
                # teacher-forced reference log-probs: the HF sampler gives them with a
                # separate reference; LoRA's reference is the model, adapter disabled
                with self._ak_ref_context():
                    per = token_logps(ref if ref is not None else model,
                                      [(prompt_ids[i], r["token_ids"]) for i, r in enumerate(rows)],
                                      batch_size=max(1, len(rows)),
                                      pad_id=self._ak.tokenizer.pad_token_id or 0)
                for r, lp in zip(rows, per):
                    r["logp_ref"] = float(sum(lp))
        if self._ak.off_policy is not None and self.model.training:
            rows = self._ak_mix_off_policy(rows, G if grouped else 0)
        self._ak_rows = rows
        return [r["token_ids"] for r in rows]

    def _ak_sync(self, model) -> None:
        """--engine vllm: push the policy's weights into the engine at the first sampling
        and at every later step that is a multiple of sync_every (once per step)."""
        from .weight_sync import sync_to_engine
        step, last = self.state.global_step, self._ak_synced_step
        if last is None or (step != last and step % self._ak.sync_every == 0):
            sync_to_engine(model, self._ak.engine)
            self._ak_synced_step = last = step
        if self.model.training:
            self._metrics["train"]["engine/weights_age"].append(float(step - last))

    # --- rewards, kl_ref, samples.jsonl ----------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        out = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._ak_rewards = out  # gathered over processes, [N_global, 1]
        return out

    def _ak_local_rewards(self, n: int) -> torch.Tensor:
        i = self.accelerator.process_index
        return self._ak_rewards[i * n:(i + 1) * n, 0]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.model.training:
            self._ak_after_rollout(inputs, out)
        return out

    def _ak_after_rollout(self, inputs: list[dict], out: dict) -> None:
        rows = self._ak_rows
        device = self.accelerator.device
        own = [not r.get("off_policy") for r in rows]  # the policy's own samples (--off-policy)
        ratio = torch.tensor([r["logp"] - r["logp_ref"] if o else 0.0 for r, o in zip(rows, own)],
                             device=device, dtype=torch.float64)
        n = torch.tensor(own, device=device, dtype=torch.float64)
        totals = self.accelerator.reduce(torch.stack([(ratio * n).sum(), n.sum()]), reduction="sum")
        if totals[1] > 0:  # none when --off-policy-share 1 replaced every sample
            self._metrics["train"]["kl_ref"].append((totals[0] / totals[1]).item())
        step = self.state.global_step
        if self._ak.resumed:  # drop what the interrupted run sampled after its checkpoint
            self._ak.resumed = False
            path = self._ak.work / "samples.jsonl"
            if self.accelerator.is_main_process and path.exists():
                keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and json.loads(line).get("step", 0) < step]
                path.write_text("".join(x + "\n" for x in keep), encoding="utf-8")
        every = self._ak.sample_every
        if every and step % every == 0:
            self._ak_write_samples(step, inputs, rows, self._ak_local_rewards(len(rows)))

    def _ak_write_samples(self, step: int, inputs: list[dict], rows: list[dict],
                          rewards: torch.Tensor) -> None:
        records: list[dict] = []
        rewards = rewards.tolist()
        G = self.num_generations
        for k, (inp, row, r) in enumerate(zip(inputs, rows, rewards)):
            if k % G == 0 or inp["row"] != inputs[k - 1]["row"]:
                rec = self._ak.records[inp["row"]]
                head = {"id": f"{rec['id']}@{step}", "prompt_id": rec["id"], "step": step,
                        "prompt": rec["prompt"]}
                if "meta" in rec:
                    head["meta"] = rec["meta"]
                head.update(completions=[], gen={**self._ak.gen, "step": step})
                records.append(head)
            prompt = records[-1]["prompt"]
            comp = {"text": as_completion(row["text"], prompt), "logp": row["logp"],
                    "n_tokens": row["n_tokens"], "finished": row["finished"]}
            if "logp_ref" in row:
                comp["logp_ref"] = row["logp_ref"]
            if row.get("off_policy"):  # --off-policy: logp is the behaviour model's (or absent)
                comp["source"] = "off-policy"
                if comp["logp"] is None:
                    del comp["logp"]
            if not math.isnan(r):
                comp["score"] = r
            records[-1]["completions"].append(comp)
        gathered = gather_object(records)
        if not self.accelerator.is_main_process:
            return
        merged: list[dict] = []
        for rec in gathered:  # a group split over processes becomes one record again
            if merged and merged[-1]["id"] == rec["id"]:
                merged[-1]["completions"] += rec["completions"]
            else:
                merged.append(rec)
        seen: dict[str, int] = {}
        with open(self._ak.work / "samples.jsonl", "a", encoding="utf-8") as f:
            for rec in merged:  # the same prompt twice in one rollout: PROMPT_ID@STEP#1
                n = seen.get(rec["id"], 0)
                seen[rec["id"]] = n + 1
                f.write(dumps({**rec, "id": f"{rec['id']}#{n}"} if n else rec) + "\n")


def global_mean(trainer, x: torch.Tensor, mask: torch.Tensor) -> float:
    totals = trainer.accelerator.reduce(torch.stack([(x * mask).sum(), mask.sum().float()]),
                                        reduction="sum")
    return (totals[0] / totals[1].clamp(min=1.0)).item()


class _GRPOBase(OffPolicyMixin, OnlineMixin, GRPOTrainer):
    """GRPOTrainer with alignkit's sampler and reference (see OnlineMixin) and the
    --off-policy group members (off_policy.OffPolicyMixin)."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations=None,
                              has_tool_images=False):
        return self._ak_generate(prompt_ids), None

    def _forward(self, model, inputs, entropy: bool = True):
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
        mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
        logps, ent, _ = self._get_per_token_logps_and_entropies(
            model, ids, mask, inputs["completion_ids"].size(1), compute_entropy=entropy)
        return logps, ent

    def _ga_scale(self) -> float:
        return self.current_gradient_accumulation_steps if self.model.training else 1.0

    @staticmethod
    def _ak_old_logps(logps: torch.Tensor, inputs: dict) -> torch.Tensor:
        """The rollout policy's per-token log-probs: TRL's `old_per_token_logps` when it
        kept them (several iterations per rollout), else the current ones detached."""
        old = inputs.get("old_per_token_logps")
        return logps.detach() if old is None else old

    def _ak_aggregate(self, per: torch.Tensor, mask: torch.Tensor, inputs: dict) -> torch.Tensor:
        """Per-token terms aggregated as TRL aggregates its loss for --loss (dapo and cispo:
        over the active tokens of the accumulation window; the others: per completion,
        divided by the gradient-accumulation steps)."""
        kind = "dapo" if self.loss_type in ("dapo", "cispo") else self.loss_type
        if kind == "dapo":
            n = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if self.model.training:
                n = n * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            return L.aggregate_loss(per, mask, "dapo", n_tokens=float(n))
        return L.aggregate_loss(per, mask, kind, self.max_completion_length) / self._ga_scale()


class _GRPOCredit(ChunkCreditMixin, _GRPOBase):    """TRL's GRPO loss (grpo, earl), with the entropy bonus (--entropy-coef, over the tokens
    the PG term acts on) and, with `credit="chunk"`, IPA's chunk-level credit: the
    completion split into chunks (`chunk_by`, online_losses.chunk_ids on the decoded
    token texts, once per rollout), the ratio per chunk (geometric mean of the token
    ratios), GRPO's clip on it (`chunk_clip="ppo"`) or IPA's TOPR split ("ipa": A > 0
    plain SL, else ρ_c truncated to [0, 1]), the sequence advantage, EARL's gate where the method
    has one, the k3 KL per token and TRL's aggregation for --loss
    (online_losses.chunk_clipped_loss / aggregate_loss)."""


class AlignkitGRPOTrainer(_GRPOCredit):
    """grpo: TRL's GRPO loss (every `loss_type`, `scale_rewards`, GSPO's sequence-level
    importance sampling, k3 KL with `beta`), or the chunk credit (see _GRPOCredit)."""


class EARLTrainer(_GRPOCredit):
    """earl: TRL has no EARL. GRPO with the policy-gradient term gated to high-entropy
    tokens (ALGORITHMS.md Part B §3): TRL's `top_entropy_quantile` gate over the batch,
    or, with scope "response", the same quantile taken within each response. The KL
    term is kept (TRL adds it after the gate). With credit="chunk" the gate multiplies
    the chunk terms per token."""

    def __init__(self, *args, entropy_scope: str = "batch", **kwargs):
        self.entropy_scope = entropy_scope
        super().__init__(*args, **kwargs)

    def get_high_entropy_mask(self, entropies, mask, threshold):
        if self.entropy_scope == "response":
            gate = L.earl_gate(entropies, mask, 1.0 - threshold, "response")
        else:
            gate = super().get_high_entropy_mask(entropies, mask, threshold)
        self._metrics["train" if self.model.training else "eval"]["earl/gate_frac"].append(
            global_mean(self, gate.float(), mask.float()))
        self._ak_gate = gate
        return gate


class GTPOTrainer(_GRPOBase):
    """gtpo: TRL has no GTPO. Advantages r − mean_group(r) (`scale_rewards="none"`),
    conflict-token weights computed on the whole group after each rollout, the entropy
    filter and the loss of online_losses.gtpo_loss (no clipping, no KL, no reference)."""

    def __init__(self, *args, entropy_threshold: float, **kwargs):
        self.entropy_threshold = entropy_threshold
        super().__init__(*args, **kwargs)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        acc = self.accelerator
        ids, mask = out["completion_ids"], out["completion_mask"]
        T = ids.size(1)
        pad = self._ak.tokenizer.pad_token_id or 0
        all_ids = acc.gather(acc.pad_across_processes(ids, dim=1, pad_index=pad))
        all_mask = acc.gather(acc.pad_across_processes(mask, dim=1, pad_index=0))
        all_adv = acc.gather(out["advantages"])
        delta, n_conflict = L.gtpo_token_weights(all_ids, all_mask, all_adv, self.num_generations)
        n = ids.size(0)
        part = slice(acc.process_index * n, (acc.process_index + 1) * n)
        out["gtpo_delta"] = delta[part, :T].to(ids.device)
        out["gtpo_conflicts"] = n_conflict[part].to(ids.device)
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["gtpo/conflict_tokens"].append(
            (n_conflict.sum() / all_mask.sum().clamp(min=1)).item())
        return out

    def _compute_loss(self, model, inputs):
        logps, entropies = self._forward(model, inputs)
        mask = inputs["completion_mask"].float()
        h = L.masked_row_mean(entropies.detach().float(), mask)
        adv = L.gtpo_advantages(inputs["advantages"], h, self.entropy_threshold)
        loss = L.gtpo_loss(logps, adv, inputs["gtpo_delta"], mask, inputs["gtpo_conflicts"])
        mode = "train" if self.model.training else "eval"
        self._metrics[mode]["entropy"].append(global_mean(self, entropies.detach(), mask))
        filtered = (h > self.entropy_threshold).float()
        self._metrics[mode]["gtpo/filtered"].append(self.accelerator.gather(filtered).mean().item())
        return self._ak_entropy_term(loss, entropies, mask) / self._ga_scale()


class PairTrainer(_GRPOBase):
    """p3o, online-ipo, ipo-md (TRL has none of these losses): `num_generations=2`, the
    two samples of a prompt stay together (no shuffle of the rollout), rewards from the
    scorer, reference log-probs from the reference (`kind`, `coef` = κ or τ).

    - p3o: q = sg[(r̃1 − r̃2) − κ(L1 − L2)], r̃ the rewards over a running std clipped
      to ±10, L = Σ_t(log πθ − log πref) of the current policy (the authors' code);
      ρ = sg[exp(ΔL1 + ΔL2)] in [1/c, c], ΔL = L − L_old; joint clip on d = L1 − L2
      (`clip="pair"`) or token-wise clip (`clip="token"`); the sum over pairs divided
      by the completion tokens. With `num_iterations` > 1 a rollout is reused, and the
      rollout-time values are the "old" ones.
    - online-ipo / ipo-md: (h − (P(y1 ≻ y2) − ½)/τ)², P from the rewards (½ on a tie,
      the pair skipped when either is unscored), mean over pairs.

    A pair is the two completions of one prompt (`pair_group`, the prompt's dataset row;
    online_losses.pair_order), y1 the one sampled first.
    """

    def __init__(self, *args, kind: str, coef: float, clip: str = "pair", eps: float = 0.2,
                 ratio_clip: float = 10.0, **kwargs):
        self.pair_kind, self.coef, self.clip, self.eps, self.ratio_clip = kind, coef, clip, eps, ratio_clip
        self.reward_std = L.RunningStd()
        super().__init__(*args, **kwargs)

    def _prepare_inputs(self, generation_batch):
        """GRPO's buffering of a rollout over `steps_per_generation` x `num_iterations`
        steps, without the shuffle that would split pairs."""
        if not self.model.training:
            return self._generate_and_score_completions(generation_batch)
        every = self.args.steps_per_generation * self.num_iterations
        if self._step % every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            self._buffered_inputs = split_tensor_dict(batch, self.args.steps_per_generation)
        return self._buffered_inputs[self._step % self.args.steps_per_generation]

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        n = out["completion_ids"].size(0)
        rewards = self._ak_local_rewards(n).to(out["completion_ids"].device).float()
        if self.pair_kind == "p3o":
            self.reward_std.update(self._ak_rewards[:, 0].float().cpu())
            rewards = self.reward_std.scale(rewards)
        out["pair_rewards"] = rewards
        out["pair_group"] = torch.tensor([int(x["row"]) for x in inputs], dtype=torch.long,
                                         device=out["completion_ids"].device)
        out["ref_token_logps"] = self._ak_ref_token_logps(out)
        return out

    def _compute_loss(self, model, inputs):
        logps, entropies = self._forward(model, inputs)
        mask = inputs["completion_mask"].float()
        old = self._ak_old_logps(logps, inputs)
        ref = inputs["ref_token_logps"]
        r = inputs["pair_rewards"]
        # the two samples of each prompt side by side: pairs (0, 1), (2, 3), ...
        order = L.pair_order(inputs["pair_group"])
        logps, entropies, mask, old, ref, r = (
            x[order] for x in (logps, entropies, mask, old, ref, r))
        seq = ((logps - ref) * mask).sum(-1)
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode]
        if self.pair_kind == "p3o":
            per, q, rho = L.p3o_pair_loss(logps, old, ref, mask, r, self.coef, self.ratio_clip,
                                          self.eps, self.clip)
            loss = per.sum() / mask.sum().clamp(min=1.0)
            metrics["p3o/rho"].append(self.accelerator.gather(rho).mean().item())
            metrics["p3o/q_abs"].append(self.accelerator.gather(q.abs()).mean().item())
        else:
            h = seq[0::2] - seq[1::2]
            p = L.pair_preference(r[0::2], r[1::2])
            keep = ~torch.isnan(p)
            per = L.ipo_online_loss(h, torch.nan_to_num(p, nan=0.5), self.coef)
            loss = (per * keep).sum() / keep.sum().clamp(min=1)
            metrics["ipo/h"].append(self.accelerator.gather(h.detach()).mean().item())
        metrics["entropy"].append(global_mean(self, entropies.detach(), mask))
        return self._ak_entropy_term(loss, entropies, mask) / self._ga_scale()

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"checkpoint-{self.state.global_step}")
            with open(os.path.join(folder, STATE_FILE), "w") as f:
                json.dump({"reward_std": self.reward_std.state()}, f)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        path = os.path.join(checkpoint, STATE_FILE) if checkpoint else None
        if path and os.path.exists(path):
            with open(path) as f:
                self.reward_std.load(json.load(f)["reward_std"])


class AlignkitRLOOTrainer(OnlineMixin, RLOOTrainer):
    """rloo: TRL's RLOO (leave-one-out baseline, sequence-level KL penalty in the
    reward), sampling with alignkit's sampler."""

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        return self._ak_generate(prompt_ids)

    def _compute_loss(self, model, inputs):
        """TRL's RLOO loss (unscaled: the HF Trainer divides it by the accumulation) − C·Ĥ."""
        self._ak_last_entropies = None
        loss = super()._compute_loss(model, inputs)
        return self._ak_entropy_term(loss, self._ak_last_entropies,
                                     inputs["completion_mask"].float())
