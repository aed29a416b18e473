"""The trainer of the DPO family and the listwise methods: `AlignkitDPOTrainer`, a
DPOTrainer whose rows are tokenized by `alignkit.policy.data` and whose reference
log-probs come from the records, the reference cache or one reference pass before
training (TRL's `precompute_ref_log_probs` path, so no reference model stays in memory),
its collators, and the length-chunked forward it runs the model through. TRL's own DPO
losses run unchanged through `DPOTrainer._compute_loss`; alignkit's losses (losses.py)
plug in through `loss_hook` (pairs.py, groups.py), in the same training loop.

The reference pass walks the first epoch's batches in training order (the same
sampler, seed and padding as the training loop) and calls TRL's `compute_ref_log_probs`,
so a cold run computes exactly what TRL's in-loop reference would, and a rerun with the
same seed and batch size reads back bit-identical values from the cache. (In bfloat16 a
sequence's log-prob changes with the batch it is padded in, by up to ~1 nat per 100
tokens on SmolLM2; reused reference values computed under another batch layout, e.g.
gen-pairs' `logp`, carry that noise.)
"""
from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .. import console
from . import cpu_head
from .data import seq_key
from .refcache import STATS, RefCache

MODEL_KEYS = ("input_ids", "attention_mask", "completion_mask")
GROUP_KEYS = ("group", "slot", "scores", "valid", "ref_score")


# --- collators ------------------------------------------------------------------------------

@dataclass
class PairCollator(DataCollatorForPreference):
    """TRL's preference collator plus the row index and the float columns a custom loss
    reads (p_w, p_l, p_wl, score_chosen, score_rejected)."""
    extra_keys: tuple = ()

    def torch_call(self, examples):
        out = super().torch_call(examples)
        out["index"] = torch.tensor([e["index"] for e in examples], dtype=torch.long)
        for k in self.extra_keys:
            out[k] = torch.tensor([float(e[k]) for e in examples], dtype=torch.float32)
        return out


@dataclass
class GroupCollator(DataCollatorMixin):
    """Listwise rows -> one padded batch of every (prompt + completion) sequence, with
    `group` (the row of each sequence), `slot` (its rank, -1 for a GRAO reference
    answer), `scores`/`valid` [B, K] and `ref_score` [B]."""
    pad_token_id: int
    return_tensors: str = "pt"

    def torch_call(self, examples):
        B = len(examples)
        K = max(len(e["completions"]) for e in examples)
        scores = torch.zeros(B, K)
        valid = torch.zeros(B, K, dtype=torch.bool)
        ids, cmask, group, slot = [], [], [], []

        def add(b, k, prompt, comp):
            ids.append(torch.tensor(prompt + comp))
            cmask.append(torch.tensor([0] * len(prompt) + [1] * len(comp)))
            group.append(b)
            slot.append(k)

        for b, e in enumerate(examples):
            for k, (comp, s) in enumerate(zip(e["completions"], e["scores"])):
                add(b, k, e["prompt_ids"], comp)
                scores[b, k] = s
                valid[b, k] = True
        out = {}
        if "ref_ids" in examples[0]:
            for b, e in enumerate(examples):
                add(b, -1, e["prompt_ids"], e["ref_ids"])
            out["ref_score"] = torch.tensor([float(e["ref_score"]) for e in examples])
        out["input_ids"] = pad(ids, padding_value=self.pad_token_id, padding_side="right")
        out["attention_mask"] = pad([torch.ones_like(t) for t in ids], padding_value=0,
                                    padding_side="right")
        out["completion_mask"] = pad(cmask, padding_value=0, padding_side="right")
        out.update(group=torch.tensor(group), slot=torch.tensor(slot), scores=scores, valid=valid)
        return out


# --- length-chunked forward -----------------------------------------------------------------

_PER_TOKEN = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1", "label_mask")


def chunk_plan(lengths: list[int], call_cost: int = 16) -> list[list[int]]:
    """Rows of a right-padded batch in one or two groups by length, whichever pads fewer
    tokens (counting `call_cost` tokens per extra forward): sorted by length, the short
    rows are run apart from the long ones when that saves work."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    ls = [lengths[i] for i in order]
    n, longest = len(ls), ls[-1]
    best_cost, best = n * longest, n
    for cut in range(1, n):
        cost = cut * ls[cut - 1] + (n - cut) * longest + call_cost
        if cost < best_cost:
            best_cost, best = cost, cut
    return [order] if best == n else [order[:best], order[best:]]


class LengthChunked:
    """A fused-LM-head model called on a right-padded batch in length groups, each cut
    to its own longest row (`chunk_plan`); the per-token outputs are put back in row
    order and padded with zeros, as the fused head leaves unlabelled positions. On a CPU
    the cost follows the tokens, and DPO batches pad the short side of every pair to the
    longest completion of the batch. Used for the training forward and the reference
    pass alike, so both see the same shapes (bfloat16 results depend on them). Anything
    unusual (no fused head, extra tensor inputs, virtual tokens) takes one plain call."""

    def __init__(self, model, outputs: tuple[str, ...] = ("log_probs",) + cpu_head.STATS):
        self.model = model
        self.outputs = outputs
        # on CPU, our head (cpu_head) instead of TRL's fused head: same values, a fraction
        # of the time; ALIGNKIT_CPU_HEAD=0 keeps TRL's
        self.cpu = cpu_head.enabled(model)

    def _model(self, **kw):
        if self.cpu and set(kw) <= {"input_ids", "attention_mask", "labels", "fused_lm_head", "use_cache"}:
            return cpu_head.fused_forward(self.model, kw["input_ids"], kw["attention_mask"],
                                          kw["labels"], self.outputs)
        return self.model(**kw)

    def __call__(self, input_ids=None, attention_mask=None, labels=None, **kw):
        plain = dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        if (not kw.get("fused_lm_head") or input_ids is None or attention_mask is None
                or labels is None or kw.get("output_router_logits")
                or any(torch.is_tensor(v) for v in kw.values())):
            return self.model(**plain)
        lengths = attention_mask.sum(dim=1).tolist()
        plan = chunk_plan(lengths)
        if len(plan) == 1:
            return self._model(**plain)
        n, t = input_ids.shape
        parts = []
        for rows in plan:
            # widths in steps of 32 tokens: fewer distinct shapes, fewer cached kernels
            width = min(t, -(-max(lengths[i] for i in rows) // 32) * 32)
            idx = torch.tensor(rows, device=input_ids.device)
            out = self._model(input_ids=input_ids[idx, :width], attention_mask=attention_mask[idx, :width],
                              labels=labels[idx, :width], **kw)
            if out.log_probs.size(1) != width - 1:  # e.g. prompt-learning virtual tokens
                return self._model(**plain)
            parts.append(out)
        inverse = torch.empty(n, dtype=torch.long, device=input_ids.device)
        inverse[torch.tensor([i for rows in plan for i in rows], device=input_ids.device)] = \
            torch.arange(n, device=input_ids.device)
        fields = {}
        for name in _PER_TOKEN:
            values = [getattr(o, name) for o in parts]
            if any(v is None for v in values):
                fields[name] = None
                continue
            padded = [torch.cat([v, v.new_zeros(v.size(0), t - 1 - v.size(1))], dim=1) for v in values]
            fields[name] = torch.cat(padded, dim=0)[inverse]
        mask = fields["label_mask"] if fields.get("label_mask") is not None else labels[:, 1:] != -100
        fields["loss"] = -fields["log_probs"].sum() / mask.sum().clamp(min=1)
        return type(parts[0])(**fields)


# --- the trainer ----------------------------------------------------------------------------

def _set_epoch(dataloader, epoch: int) -> None:
    """What `Trainer` does at the start of an epoch, so our pass sees the same order."""
    if hasattr(dataloader, "set_epoch"):
        dataloader.set_epoch(epoch)
    inner = getattr(getattr(dataloader, "batch_sampler", None), "batch_sampler", None)
    if hasattr(inner, "set_epoch"):
        inner.set_epoch(epoch)


class AlignkitDPOTrainer(DPOTrainer):
    """DPOTrainer on rows tokenized by alignkit, with the reference log-probs filled
    before training (records -> cache -> one reference pass) and an optional
    `loss_hook(trainer, model, inputs, extras) -> loss` for the losses of losses.py.

    `ref_cache=None` means the method needs no reference (pro, grao).
    """

    def __init__(self, *args, loss_hook=None, extra_keys=(), ref_cache: RefCache | None = None,
                 **kwargs):
        self.loss_hook = loss_hook
        self.extra_keys = tuple(extra_keys)
        self.ref_cache = ref_cache
        self.ref_report: dict = {}
        import trl.trainer.dpo_trainer as dpo_module
        # TRL hashes every weight to key its own datasets cache of precomputed reference
        # log-probs (a full copy of the weights in memory); `_precompute_ref_logps` is
        # replaced below, so the hash is never used.
        original = dpo_module.hash_module
        dpo_module.hash_module = lambda module: "alignkit"
        try:
            super().__init__(*args, **kwargs)
        finally:
            dpo_module.hash_module = original
        if self.ref_model is not None:  # only needed for the pass above: free it
            models = getattr(self.accelerator, "_models", None)
            if models is not None:
                self.accelerator._models = [m for m in models if m is not self.ref_model]
            self.ref_model = None
            gc.collect()

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # already tokenized by alignkit.policy.data

    def _forward(self, model, outputs: tuple[str, ...] | None = None):
        """The model as the loss and the reference pass call it: length-chunked in a
        single process (DDP allows one forward per backward). `outputs`: the per-token
        fields wanted (default: those TRL's loss and metrics read)."""
        if self.accelerator.num_processes != 1:
            return model
        if outputs is None:
            outputs = ("log_probs", "entropy", "mean_logits", "is_top1")
            if getattr(self, "use_weighting", False):
                outputs += ("log_sum_sq_probs",)
        return LengthChunked(model, outputs)

    # reference log-probs ------------------------------------------------------------------
    def _precompute_ref_logps(self, dataset, name, batch_size):
        if self.ref_cache is None:
            return dataset
        n = len(dataset)
        chosen = [float(x) for x in dataset["rec_ref_chosen"]]
        rejected = [float(x) for x in dataset["rec_ref_rejected"]]
        prompts = dataset["prompt_ids"]
        kc = [seq_key(p, c) for p, c in zip(prompts, dataset["chosen_ids"])]
        kr = [seq_key(p, r) for p, r in zip(prompts, dataset["rejected_ids"])]
        n_records = sum(1 for v in chosen if not math.isnan(v))
        check = self._check_record_refs(chosen, rejected) if n_records else None
        if check and not check["ok"]:
            chosen = [math.nan] * n
            rejected = [math.nan] * n
            n_records = 0
        todo = [i for i in range(n) if math.isnan(chosen[i])]
        cached = self.ref_cache.get({kc[i] for i in todo} | {kr[i] for i in todo})
        n_cache = 0
        for i in todo:
            if kc[i] in cached and kr[i] in cached:
                chosen[i], rejected[i] = cached[kc[i]], cached[kr[i]]
                n_cache += 1
        todo = {i for i in range(n) if math.isnan(chosen[i])}
        computed = 0
        if todo:
            t0 = time.time()
            # --max-steps shorter than an epoch: only the batches the run trains on
            limit = None
            if self.args.max_steps > 0:
                limit = self.args.max_steps * self.args.gradient_accumulation_steps
            values = self._reference_pass(todo, max_batches=limit)
            done = todo & values.keys()
            new = {}
            for i in done:
                chosen[i], rejected[i] = values[i]
                new[kc[i]], new[kr[i]] = values[i]
            computed = len(done)
            if self.accelerator.is_main_process:
                self.ref_cache.put(new)
                console.info(f"reference log-probs: {computed} pairs computed in "
                             f"{time.time() - t0:.1f}s"
                             + (" (cached)" if self.ref_cache.enabled else ""))
        if (n_records or n_cache) and self.accelerator.is_main_process:
            console.info(f"reference log-probs: {n_records} pairs from the records, "
                         f"{n_cache} from the cache")
        self.ref_report = {"from_records": n_records, "from_cache": n_cache,
                           "computed": computed, "cache": str(self.ref_cache.path)
                           if self.ref_cache.enabled else None}
        if computed < len(todo):  # rows after --max-steps: never trained on (NaN)
            self.ref_report["not_needed"] = len(todo) - computed
        if check:
            self.ref_report["record_check"] = check
        from datasets import Value
        for col, vals in (("ref_chosen_logps", chosen), ("ref_rejected_logps", rejected)):
            dataset = dataset.add_column(col, vals).cast_column(col, Value("float32"))
        return dataset

    def _check_record_refs(self, chosen: list[float], rejected: list[float]) -> dict:
        """Compare the records' ref_logp_* with the reference model on the first batch.
        A record whose log-probs were taken under another tokenization or model (or a
        cut sample that lost its `finished: false`, so that the trainer adds an eos its
        `logp` lacks) shows up as a gap of several nats; then every record value is
        ignored and computed instead."""
        got = self._reference_pass(None, max_batches=1)
        diffs = [abs(v - ref) / (0.5 + 0.01 * abs(ref))
                 for i, (c, r) in got.items() if not math.isnan(chosen[i])
                 for v, ref in ((c, chosen[i]), (r, rejected[i]))]
        worst = max(diffs, default=0.0)
        ok = worst <= 1.0
        if not ok and self.accelerator.is_main_process:
            console.warn("the records' ref_logp_chosen/ref_logp_rejected do not match the "
                         "reference model under this tokenization (see `alignkit.policy.data`); "
                         "computing the reference log-probs instead")
        return {"pairs_checked": len(diffs) // 2, "worst_gap_ratio": round(worst, 4), "ok": ok}

    def _reference_pass(self, wanted: set[int] | None,
                        max_batches: int | None = None) -> dict[int, tuple[float, float]]:
        """Reference log-probs of the rows in `wanted` (None: all), batch by batch in the
        order and padding of the first training epoch (see the module docstring)."""
        loader = self.get_train_dataloader()
        _set_epoch(loader, 0)
        model = self.ref_model or self.model
        single = self.accelerator.num_processes == 1 and wanted is not None
        out: dict[int, tuple[float, float]] = {}
        total = len(loader) if max_batches is None else min(max_batches, len(loader))
        with console.progress("reference log-probs", total=total) as bar:
            for step, batch in enumerate(loader):
                if max_batches is not None and step >= max_batches:
                    break
                index = batch["index"]
                if single and not any(int(i) in wanted for i in index):
                    bar.advance()
                    continue
                inputs = {k: batch[k] for k in MODEL_KEYS}
                c, r = self.compute_ref_log_probs(self._forward(model, ("log_probs",)), inputs)
                STATS["ref_batches"] += 1
                index, c, r = self.accelerator.gather_for_metrics((index, c, r))
                for i, cv, rv in zip(index.tolist(), c.float().tolist(), r.float().tolist()):
                    out[int(i)] = (cv, rv)
                bar.advance()
        return out

    # loss ------------------------------------------------------------------------------------
    def _compute_loss(self, model, inputs, return_outputs):
        extras = {k: inputs.pop(k) for k in ("index", *self.extra_keys, *GROUP_KEYS)
                  if k in inputs}
        if self.loss_hook is None:
            return super()._compute_loss(self._forward(model), inputs, return_outputs)
        loss = self.loss_hook(self, self._forward(model), inputs, extras)
        return (loss, None) if return_outputs else loss

    def policy_logps(self, model, inputs):
        """(per-token log-probs [N, T-1], completion mask [N, T-1]) of the policy."""
        mask = inputs["completion_mask"]
        labels = inputs["input_ids"].masked_fill(mask == 0, -100)
        out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    labels=labels, fused_lm_head=True, use_cache=False)
        shift = mask[:, 1:]
        return out.log_probs[:, -shift.size(1):], shift

    def log_metric(self, name: str, value) -> None:
        """Average a per-example tensor (or a scalar) across processes into the logs."""
        mode = "train" if self.model.training else "eval"
        if torch.is_tensor(value):
            value = self.accelerator.gather_for_metrics(value.detach().reshape(-1).float()).mean().item()
        self._metrics[mode][name].append(float(value))

    def count_tokens(self, inputs) -> None:
        mode = "train" if self.model.training else "eval"
        if mode == "train":
            n = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += n
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
