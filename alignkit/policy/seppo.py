"""SePPO for language models: `train-policy --method seppo` (ALGORITHMS.md Part A §8).

SePPO (Zhang et al. 2024, "SePPO: Semi-Policy Preference Optimization for Diffusion
Alignment") trains from winning answers only: there are no losers in the data. TRL has
no SePPO (no trainer, no loss); this module is alignkit's own, a transformers `Trainer`
subclass with a custom `compute_loss`, run through `training.prepare_run` /
`run_trainer` / `save_output` like every other method.

Data: the "sft" data kind. The anchor y_w of a record is its given answer: the
`completion` of a {prompt, completion} record, the `chosen` side of a pair (its
`rejected` is never read), the best-scored completion of a samples record, the
completion of an unpaired record with `label` true (label false: skipped). A prompt
record without an answer is an input error (exit 3, path:line).

Each optimizer update u (u updates done so far):
1. Reference: one snapshot drawn uniformly at random from the kept earlier snapshots
   of the trainable weights (the LoRA adapter with --lora-r, else every weight), with a
   random stream keyed by (--seed, u), so every process and a resumed run draw the same.
   θ_0 (the initial model) is taken at u = 0; afterwards one snapshot every
   `--seppo-snapshot-every` updates (paper: 30), at most `--seppo-max-snapshots` kept
   (paper: K = 7; the oldest is dropped; which ones the paper keeps is UNVERIFIED). The
   pool of update u holds the snapshots taken at updates < u, so the reference is never
   the current weights, except at u = 0 where θ_0 is all there is (Δ ≡ 0, I = 0, and the
   step only raises log π(y_w)). One reference serves every micro-batch of an update.
2. y_ref ~ π_ref(·|x): one sample per prompt from that reference with the shared sampler
   (`alignkit.generation.sample`, temperature 1, no top-k/top-p, `--max-new-tokens`),
   seeded by (--seed, u, micro-batch, process) and the row.
3. Anchor-based adaptive flipper, LLM reading (ALGORITHMS.md's "suggested LLM
   adaptation"): Δ(y) = log πθ(y|x) − log π_ref(y|x) (summed completion log-probs),
   I = sign(Δ(y_w)) on the anchor, held constant (no gradient):
   - I = +1 (θ already fits the anchor better than the reference): y_ref is the loser;
   - I = −1 (θ fits it worse): y_ref is treated as a second winner;
   - I = 0 (a tie; in practice only while θ equals the reference): no y_ref term.
   loss = −log σ(β · [Δ(y_w) − I · Δ(y_ref)]), mean over the batch; β = --beta, default
   0.1 (the DPO family's; ALGORITHMS.md gives none for SePPO).
   The sign placement is UNVERIFIED in the paper (Eq. 7 is reconstructed from reviews
   of the diffusion loss −log σ(−βTω(λ_t)[(e_θ^w − e_ref^w) − I(e_θ^r − e_ref^r)]) with
   I = sign(e_ref^w − e_θ^w)); with e ↔ −log π the reading above is the one chosen.

Reference log-probs are computed by the same forward as the policy's (same batch,
padding and autocast, weights swapped in place under no_grad), so Δ is exactly 0 when θ
equals the reference. Dropout is disabled (as TRL's DPOTrainer does by default), so
--lora-dropout has no effect. metrics.jsonl logs `loss`, `seppo/flip_share` (the share
of I = +1), `seppo/tie_share`, `seppo/delta_anchor` and `seppo/delta_ref` (mean Δ(y_w),
Δ(y_ref)), `seppo/ref_update` and `seppo/ref_age` (which snapshot was drawn, u minus
it), `seppo/snapshots` and `seppo/ref_length` (tokens of y_ref).

Snapshots live in memory (state dicts on the weights' device: small for LoRA, K copies
of the model for full fine-tuning) and in every checkpoint (`seppo_snapshots.safetensors`),
so `--resume` restores the pool exactly; with the keyed draws and samples a resumed run
continues as the uninterrupted one would. A checkpoint without that file (none is
written by alignkit) restarts the pool from the resumed weights, with a warning.

Nothing heavy is imported at module level (the registry imports this module).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

from .. import console
from ..errors import DataError, UsageError
from ..records import detect_kind
from ..registry import Param
from ..text import completion_text
from . import add
from .common import (PolicyRun, check_offline, config, config_overrides, finish, hparams,
                     load_policy, method_beta, quiet, tokenized)
from .data import Built
from .online import MAX_NEW_TOKENS

SNAPSHOT_FILE = "seppo_snapshots.safetensors"
SAMPLE_TEMPERATURE = 1.0  # step 2 samples from the reference itself

SNAPSHOT_EVERY = Param("seppo_snapshot_every", int, 30, "SePPO (loss -log sigmoid(beta "
                       "[Delta(y_w) - I Delta(y_ref)]), I = sign(Delta(y_w)): +1 y_ref loses, "
                       "-1 y_ref wins; sign placement UNVERIFIED): keep a snapshot of the "
                       "trainable weights every N updates (the reference pool; theta_0 is "
                       "the initial model).", low=1)
MAX_SNAPSHOTS = Param("seppo_max_snapshots", int, 7, "SePPO: at most K snapshots kept in "
                      "the reference pool (the oldest is dropped).", low=1)

add("seppo", "SePPO: winners only; reference drawn from earlier checkpoints, y_ref sampled "
    "from it, flipped by I = sign(Delta(y_w)) (+1: y_ref loses, -1: y_ref wins; sign "
    "placement UNVERIFIED)", f"{__name__}:train_seppo", reads="sft",
    params=(MAX_NEW_TOKENS, SNAPSHOT_EVERY, MAX_SNAPSHOTS), default_lr=1e-6,
    default_beta=0.1, trainer="alignkit SePPO trainer")


# --- the loss (pure functions of sequence log-probs) --------------------------------------

def aaf_flip(delta_anchor):
    """The anchor-based adaptive flipper: I = sign(Δ(y_w)), without gradient. +1: θ fits
    the anchor better than the reference (y_ref is the loser); −1: worse (y_ref is a
    winner); 0 on a tie."""
    import torch
    return torch.sign(delta_anchor.detach())


def seppo_loss(delta_anchor, delta_ref, flip, beta: float):
    """Per-example SePPO loss −log σ(β·[Δ(y_w) − I·Δ(y_ref)]) (LLM reading of the
    paper's Eq. 7, sign placement UNVERIFIED; see the module docstring). TRL has no
    such loss."""
    import torch.nn.functional as F
    return -F.logsigmoid(beta * (delta_anchor - flip * delta_ref))


def seppo_from_logps(pol_anchor, pol_ref, ref_anchor, ref_ref, beta: float):
    """(per-example loss, I) from the summed log-probs of y_w and y_ref under the policy
    (`pol_*`) and under the drawn reference (`ref_*`)."""
    delta_anchor, delta_ref = pol_anchor - ref_anchor, pol_ref - ref_ref
    flip = aaf_flip(delta_anchor)
    return seppo_loss(delta_anchor, delta_ref, flip, beta), flip


# --- the reference pool -------------------------------------------------------------------

def draw_seed(*parts: Any) -> int:
    """A 63-bit seed from the parts (seed, update, ...): the same on every process."""
    key = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") & ((1 << 63) - 1)


def draw_reference(pool: list[int], seed: int, update: int) -> int:
    """The snapshot (its update) drawn uniformly from `pool` for update `update`."""
    if not pool:
        raise ValueError("empty reference pool")
    return random.Random(draw_seed("seppo-ref", seed, update)).choice(sorted(pool))


class Snapshots:
    """The kept snapshots {update: {name: tensor}} of the trainable weights (see the
    module docstring for the cadence and the pool)."""

    def __init__(self, every: int, keep: int):
        if every < 1 or keep < 1:
            raise UsageError("--seppo-snapshot-every and --seppo-max-snapshots must be >= 1")
        self.every, self.keep = every, keep
        self.states: OrderedDict[int, dict] = OrderedDict()

    def updates(self) -> list[int]:
        return list(self.states)

    def take(self, update: int, weights: Callable[[], dict]) -> None:
        """Keep a copy of the weights as the snapshot of `update` (dropping the oldest
        beyond `keep`)."""
        self.states[update] = {n: t.detach().clone() for n, t in weights().items()}
        while len(self.states) > self.keep:
            self.states.popitem(last=False)

    def pool(self, update: int) -> list[int]:
        """The snapshots a reference for update `update` is drawn from: those taken
        before it (θ_0 alone at update 0)."""
        older = [u for u in self.states if u < update]
        return older or [u for u in self.states if u == update == 0]

    def reference(self, update: int, weights: Callable[[], dict], seed: int) -> tuple[int, dict]:
        """(drawn update, its state) for update `update`; takes θ_0 at 0 and the snapshot
        of `update` when due (after the draw, so it joins the pool from update+1)."""
        if update == 0 and 0 not in self.states:
            self.take(0, weights)
        pool = self.pool(update)
        if not pool:  # a resumed checkpoint without snapshots
            console.warn(f"seppo: no snapshot before update {update}; the pool restarts from "
                         "the current weights")
            self.take(update, weights)
            pool = [update]
        drawn = draw_reference(pool, seed, update)
        state = self.states[drawn]
        if update % self.every == 0 and update not in self.states:
            self.take(update, weights)
        return drawn, state

    # checkpoints -----------------------------------------------------------------------
    def save(self, path: str) -> None:
        from safetensors.torch import save_file
        tensors = {f"{u}/{n}": t.contiguous() for u, s in self.states.items() for n, t in s.items()}
        save_file(tensors, path, metadata={"updates": json.dumps(self.updates()),
                                           "every": str(self.every), "keep": str(self.keep)})

    def load(self, path: str, device=None) -> None:
        from safetensors import safe_open
        with safe_open(path, framework="pt", device=str(device or "cpu")) as f:
            updates = json.loads(f.metadata()["updates"])
            states: OrderedDict[int, dict] = OrderedDict((u, {}) for u in updates)
            for key in f.keys():
                u, _, name = key.partition("/")
                states[int(u)][name] = f.get_tensor(key)
        self.states = states
        while len(self.states) > self.keep:
            self.states.popitem(last=False)


@contextmanager
def swapped(params: dict, state: dict):
    """The parameters pointed at a snapshot's tensors (no copy) inside the block."""
    saved = {}
    try:
        for name, p in params.items():
            saved[name] = p.data
            p.data = state[name]
        yield
    finally:
        for name, data in saved.items():
            params[name].data = data


# --- rows -----------------------------------------------------------------------------------

def anchor_of(data, i: int, rec: dict) -> tuple[str, bool] | None:
    """(anchor text, finished) of record i, or None for an unpaired record with label
    false (see the module docstring)."""
    kind = detect_kind(rec)
    if kind == "pair":
        value, fld, finished = rec["chosen"], "chosen", rec.get("finished_chosen", True)
    elif kind == "samples":
        scored = [c for c in rec["completions"] if "score" in c]
        best = max(scored, key=lambda c: c["score"]) if scored else rec["completions"][0]
        value, fld, finished = best["text"], "completions.text", best.get("finished", True)
    elif kind in ("unpaired", "completion"):
        if kind == "unpaired" and not rec["label"]:
            return None
        value, fld, finished = rec["completion"], "completion", rec.get("finished", True)
    else:
        raise data.error(i, "completion", "missing (seppo needs a given answer per prompt)")
    try:
        text = completion_text(value)
    except DataError as e:
        raise data.error(i, fld, e.problem) from None
    return text, bool(finished)


def anchor_rows(data, tk) -> Built:
    """Records -> rows {index, record, prompt_ids, anchor_ids} (`data.Tokenization`)."""
    rows, dropped, cut, skipped = [], 0, 0, 0
    for i, rec in enumerate(data.records):
        found = anchor_of(data, i, rec)
        if found is None:
            skipped += 1
            continue
        p_ids = tk.prompt(rec["prompt"])
        fit = tk.fit(p_ids, tk.completion(*found))
        if fit is None:
            dropped += 1
            continue
        cut += int(fit[1])
        rows.append({"index": len(rows), "record": i, "prompt_ids": p_ids, "anchor_ids": fit[0]})
    if dropped:
        console.warn(f"{dropped} of {len(data.records)} records dropped: the prompt alone fills "
                     f"--max-length {tk.max_length}")
    if cut:
        console.info(f"{cut} answers cut to --max-length {tk.max_length}")
    if not rows:
        raise UsageError("no usable record (seppo needs a given answer that fits --max-length; "
                         "unpaired records with label false are skipped)")
    return Built(rows, dropped, cut, info={"skipped": skipped})


class AnchorCollator:
    """Rows -> {index (tensor), record, prompt_ids, anchor_ids (lists)}."""

    def __call__(self, examples: list[dict]) -> dict:
        import torch
        return {"index": torch.tensor([e["index"] for e in examples], dtype=torch.long),
                "record": [int(e["record"]) for e in examples],
                "prompt_ids": [list(e["prompt_ids"]) for e in examples],
                "anchor_ids": [list(e["anchor_ids"]) for e in examples]}


def sequence_logps(model, prompts: list[list[int]], completions: list[list[int]], pad_id: int):
    """Summed completion log-probs [N] of right-padded (prompt + completion) rows."""
    import torch
    device = next(model.parameters()).device
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long, device=device)
    attn = torch.zeros_like(ids)
    cmask = torch.zeros_like(ids)
    for r, (p, c) in enumerate(zip(prompts, completions)):
        ids[r, :len(p) + len(c)] = torch.tensor(p + c, device=device)
        attn[r, :len(p) + len(c)] = 1
        cmask[r, len(p):len(p) + len(c)] = 1
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits[:, :-1].float()
    labels = ids[:, 1:]
    lp = logits.gather(-1, labels[..., None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return (lp * cmask[:, 1:]).sum(-1)


# --- the trainer ----------------------------------------------------------------------------

class _Quiet:
    def advance(self, n: int = 1, **_):
        pass


_TRAINER: list = []


def trainer_class():
    """`SePPOTrainer` (built on first use: transformers is imported here, not at module
    level)."""
    if _TRAINER:
        return _TRAINER[0]
    import torch
    from transformers import Trainer

    from ..generation import SampleParams, pad_id, sample

    class SePPOTrainer(Trainer):
        """transformers Trainer with the SePPO step of the module docstring as its
        `compute_loss` (TRL has no SePPO)."""

        loss_is_scaled_for_ga = False  # a per-batch mean: the Trainer divides by grad-accum

        def __init__(self, *args, prompts: list, beta: float, snapshots: Snapshots,
                     max_new_tokens: int, max_length: int, seed: int, report: dict | None = None,
                     **kwargs):
            super().__init__(*args, **kwargs)
            self.report = report if report is not None else {}
            self.prompts, self.beta, self.snapshots = prompts, beta, snapshots
            self.max_new_tokens, self.max_length, self.seed = max_new_tokens, max_length, seed
            self._metrics: dict[str, list[float]] = {}
            self._drawn: tuple[int, int, dict] | None = None   # (update, drawn, state)
            self._micro = (-1, 0)                                # (update, micro-batch)
            for m in self.model.modules():  # Δ ≡ 0 when θ equals the reference
                if isinstance(m, torch.nn.Dropout):
                    m.p = 0.0

        def trainable(self) -> dict:
            model = self.accelerator.unwrap_model(self.model)
            return {n: p for n, p in model.named_parameters() if p.requires_grad}

        def _weights(self) -> dict:
            return {n: p.data for n, p in self.trainable().items()}

        def reference_for(self, update: int) -> tuple[int, dict]:
            if self._drawn is None or self._drawn[0] != update:
                drawn, state = self.snapshots.reference(update, self._weights, self.seed)
                self._drawn = (update, drawn, state)
            return self._drawn[1], self._drawn[2]

        def _sample_seed(self, update: int) -> int:
            micro = self._micro[1] + 1 if self._micro[0] == update else 0
            self._micro = (update, micro)
            return draw_seed("seppo-sample", self.seed, update, micro,
                             self.accelerator.process_index)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            update = self.state.global_step
            drawn, state = self.reference_for(update)
            tok = self.processing_class
            prompts, anchors = inputs["prompt_ids"], inputs["anchor_ids"]
            params = SampleParams(n=1, temperature=SAMPLE_TEMPERATURE, top_p=1.0, top_k=0,
                                  max_new_tokens=self.max_new_tokens,
                                  seed=self._sample_seed(update), batch_size=max(1, len(prompts)))
            inner = self.accelerator.unwrap_model(model)
            pad = pad_id(tok)
            with swapped(self.trainable(), state):
                groups = sample(inner, tok, [self.prompts[r] for r in inputs["record"]], params,
                                keys=[str(int(i)) for i in inputs["index"]], return_ids=True,
                                progress=_Quiet())
                y_ref = []
                for p, g in zip(prompts, groups):
                    ids = list(g[0]["token_ids"])[:max(1, self.max_length - len(p))]
                    y_ref.append(ids or [tok.eos_token_id])
                with torch.no_grad():
                    ref = sequence_logps(model, prompts + prompts, anchors + y_ref, pad)
            pol = sequence_logps(model, prompts + prompts, anchors + y_ref, pad)
            B = len(prompts)
            per, flip = seppo_from_logps(pol[:B], pol[B:], ref[:B].detach(), ref[B:].detach(),
                                         self.beta)
            loss = per.mean()
            d_anchor, d_ref = (pol[:B] - ref[:B]).detach(), (pol[B:] - ref[B:]).detach()
            self.report["pool"] = self.snapshots.updates()  # alignkit.json: the final pool
            self.log_metric("seppo/flip_share", (flip > 0).float())
            self.log_metric("seppo/tie_share", (flip == 0).float())
            self.log_metric("seppo/delta_anchor", d_anchor)
            self.log_metric("seppo/delta_ref", d_ref)
            self.log_metric("seppo/ref_update", float(drawn))
            self.log_metric("seppo/ref_age", float(update - drawn))
            self.log_metric("seppo/snapshots", float(len(self.snapshots.states)))
            self.log_metric("seppo/ref_length", torch.tensor([float(len(y)) for y in y_ref]))
            return (loss, None) if return_outputs else loss

        def log_metric(self, name: str, value) -> None:
            if torch.is_tensor(value):
                value = self.accelerator.gather_for_metrics(
                    value.detach().reshape(-1).float().to(self.accelerator.device)).mean().item()
            self._metrics.setdefault(name, []).append(float(value))

        def log(self, logs: dict, start_time: float | None = None) -> None:
            means = {k: sum(v) / len(v) for k, v in self._metrics.items() if v}
            self._metrics = {}
            super().log({**logs, **means}, start_time)

        def _save_checkpoint(self, model, trial):
            super()._save_checkpoint(model, trial)
            if self.args.should_save:
                folder = os.path.join(self._get_output_dir(trial=trial),
                                      f"checkpoint-{self.state.global_step}")
                self.snapshots.save(os.path.join(folder, SNAPSHOT_FILE))

        def _load_optimizer_and_scheduler(self, checkpoint):
            super()._load_optimizer_and_scheduler(checkpoint)
            path = os.path.join(checkpoint, SNAPSHOT_FILE) if checkpoint else None
            if path and os.path.exists(path):
                self.snapshots.load(path, self.accelerator.device)
            elif checkpoint:
                console.warn(f"{checkpoint} holds no {SNAPSHOT_FILE}: the SePPO reference "
                             "pool restarts from the resumed weights")

    _TRAINER.append(SePPOTrainer)
    return SePPOTrainer


# --- the command's entry point -----------------------------------------------------------------

@quiet
def train_seppo(run: PolicyRun) -> Path:
    """seppo: see the module docstring."""
    from transformers import TrainingArguments

    from ..training import prepare_run, with_lora
    if run.ref_model:
        raise UsageError("seppo draws its reference from its own earlier checkpoints "
                         "(drop --ref-model)")
    check_offline(run)
    opts, o = run.opts, run.options
    beta = method_beta(run)
    config_overrides(TrainingArguments, run)
    snapshots = Snapshots(o[SNAPSHOT_EVERY.name], o[MAX_SNAPSHOTS.name])
    if opts.lora_dropout > 0:
        console.warn("seppo disables dropout (the reference pass must match the policy's): "
                     "--lora-dropout has no effect")
    started = time.time()
    dataset, built, fingerprint, counts = tokenized(run, lambda tk: anchor_rows(run.data, tk))
    counts["skipped"] = built.info.get("skipped", 0)
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    model, lora = with_lora(model, opts)
    cfg = config(TrainingArguments, run, work)
    reference = {"kind": "own earlier checkpoints (SePPO)",
                 "snapshot_every": snapshots.every, "max_snapshots": snapshots.keep,
                 "weights": "LoRA adapter" if lora is not None else "full"}
    trainer = trainer_class()(
        model=model, args=cfg, train_dataset=dataset, report=reference,
        data_collator=AnchorCollator(), processing_class=tok,
        prompts=[r["prompt"] for r in run.data.records], beta=beta, snapshots=snapshots,
        max_new_tokens=o[MAX_NEW_TOKENS.name], max_length=opts.max_length, seed=opts.seed)
    hp = hparams(run, beta, max_new_tokens=o[MAX_NEW_TOKENS.name],
                 seppo_snapshot_every=snapshots.every, seppo_max_snapshots=snapshots.keep,
                 sample_temperature=SAMPLE_TEMPERATURE, tokenization=fingerprint,
                 flip="I = sign(Delta(y_w)); loss = -log sigmoid(beta (Delta(y_w) - I Delta(y_ref)))")
    return finish(trainer, run, work, tok, started, hp, reference, counts)
