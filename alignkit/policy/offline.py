"""Offline policy training: TRL's trainers, plus one DPOTrainer subclass for our losses.

- sft, kto, simpo, orpo: TRL's SFTTrainer, KTOTrainer and the experimental CPO (SimPO =
  `loss_type="simpo"`, `cpo_alpha=0`) and ORPO trainers, fed TRL's conversational rows.
- dpo, sppo, copg, pro, grao: `AlignkitDPOTrainer`, a DPOTrainer whose rows are
  tokenized by `alignkit.policy.data` and whose reference log-probs come from the records,
  the reference cache or one reference pass before training (TRL's
  `precompute_ref_log_probs` path, so no reference model stays in memory). TRL's own DPO
  losses run unchanged through `DPOTrainer._compute_loss`; alignkit's losses (losses.py)
  plug in through `loss_hook`, in the same training loop.

The reference pass walks the first epoch's batches in training order (the same
sampler, seed and padding as the training loop) and calls TRL's `compute_ref_log_probs`,
so a cold run computes exactly what TRL's in-loop reference would, and a rerun with the
same seed and batch size reads back bit-identical values from the cache. (In bfloat16 a
sequence's log-prob changes with the batch it is padded in, by up to ~1 nat per 100
tokens on SmolLM2; reused reference values computed under another batch layout, e.g.
gen-pairs' `logp`, carry that noise.)
"""
from __future__ import annotations

import dataclasses
import os
import gc
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl import DPOConfig, DPOTrainer
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import pad

from .. import console
from ..errors import UsageError
from ..training import (TrainOptions, final_metrics, lora_config, prepare_run, run_trainer,
                        save_output, trainer_kwargs)
from . import DPO_LOSSES, Method, cpu_head, losses
from .data import Data, Tokenization, group_rows, pair_rows, seq_key, trl_rows
from .refcache import STATS, RefCache, model_identity

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
        self.cpu = os.environ.get("ALIGNKIT_CPU_HEAD", "1") != "0" and cpu_head.supported(model)

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


# --- loss hooks -----------------------------------------------------------------------------

def pair_hook(specs: list[tuple[str, float]], beta: float, label_smoothing: float):
    """A loss hook for the pair losses of losses.py (and TRL's `sft` term beside them)."""
    def hook(tr: AlignkitDPOTrainer, model, inputs, extras):
        per_token, mask = tr.policy_logps(model, inputs)
        pc, pr = per_token.sum(dim=1).chunk(2)
        rc, rr = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        total = 0.0
        for name, weight in specs:
            if name == "cdpo":
                part = losses.cdpo(pc, pr, rc, rr, beta, label_smoothing).mean()
            elif name == "sppo":
                part = losses.sppo(pc, pr, rc, rr, extras["p_w"], extras["p_l"], beta).mean()
            elif name == "sppo_single":
                part = losses.sppo_single(pc, pr, rc, rr, extras["p_wl"], beta).mean()
            elif name == "copg":
                part = losses.copg(pc, pr, rc, rr, extras["score_chosen"],
                                   extras["score_rejected"], beta).mean()
            elif name == "sft":
                part = losses.sft_nll(per_token.chunk(2)[0], mask.chunk(2)[0])
            else:
                raise AssertionError(name)
            total = total + weight * part
        reward_c, reward_r = beta * (pc - rc).detach(), beta * (pr - rr).detach()
        tr.log_metric("rewards/chosen", reward_c)
        tr.log_metric("rewards/rejected", reward_r)
        tr.log_metric("rewards/accuracies", (reward_c > reward_r).float())
        tr.log_metric("rewards/margins", reward_c - reward_r)
        tr.log_metric("logps/chosen", pc)
        tr.log_metric("logps/rejected", pr)
        tr.count_tokens(inputs)
        return total
    return hook


def _grid(values, group, slot, B: int, K: int):
    """Scatter per-sequence values into [B, K] by (group, slot); slot -1 rows into [B]."""
    sel = slot >= 0
    grid = values.new_zeros(B, K).index_put((group[sel], slot[sel]), values[sel])
    ref = values.new_zeros(B).index_put((group[~sel],), values[~sel]) if (~sel).any() else None
    return grid, ref


def group_hook(method: str, beta: float, sft_weight: float, lam: float):
    """A loss hook for the listwise losses (pro, grao)."""
    def hook(tr: AlignkitDPOTrainer, model, inputs, extras):
        per_token, mask = tr.policy_logps(model, inputs)
        sums = per_token.sum(dim=1)
        avg = sums / mask.sum(dim=1).clamp(min=1)
        scores, valid = extras["scores"], extras["valid"]
        B, K = scores.shape
        avg_grid, ref_avg = _grid(avg, extras["group"], extras["slot"], B, K)
        if method == "pro":
            sum_grid, _ = _grid(sums, extras["group"], extras["slot"], B, K)
            loss, rank, sft = losses.pro(avg_grid, scores, valid, sum_grid[:, 0], sft_weight)
            tr.log_metric("loss/rank", rank)
            tr.log_metric("loss/sft", sft)
            tr.log_metric("logps/best", sum_grid[:, 0])
        else:
            loss = losses.grao(avg_grid, scores, valid, ref_avg, extras["ref_score"], beta, lam)
            tr.log_metric("avg_logps/reference", ref_avg)
        tr.log_metric("avg_logps/samples", avg_grid[valid])
        tr.count_tokens(inputs)
        return loss
    return hook


# --- shared plumbing ------------------------------------------------------------------------

def quiet(fn):
    """Run a train function without the libraries' deprecation notices and the datasets
    progress bars on stderr (`--verbose` keeps them)."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        import datasets
        if console.VERBOSITY >= 2:
            return fn(*args, **kwargs)
        datasets.disable_progress_bars()
        with warnings.catch_warnings():
            for cat in (FutureWarning, DeprecationWarning, UserWarning):
                warnings.filterwarnings("ignore", category=cat)
            return fn(*args, **kwargs)
    return wrapper


def _resolve_dtypes(opts: TrainOptions):
    """(weights dtype name, bf16 autocast?) LoRA keeps the frozen base in the compute
    dtype; full fine-tuning keeps fp32 master weights and autocasts."""
    from ..models import torch_dtype
    compute = torch_dtype(opts.dtype)
    if compute == torch.float16 and not torch.cuda.is_available():
        raise UsageError("--dtype float16 needs a GPU; use bfloat16 on CPU")
    if opts.lora_r > 0:
        weights = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(compute, "float32")
    else:
        weights = "float32"
    return weights, compute == torch.bfloat16


def _load_policy(model_spec: str, opts: TrainOptions, o: dict):
    from ..models import load_causal_lm
    weights, _ = _resolve_dtypes(opts)
    model, tok = load_causal_lm(model_spec, weights, allow_pickle=o.get("allow_pickle", False),
                                trust_remote_code=o.get("trust_remote_code", False),
                                trainable_adapter=opts.lora_r <= 0)
    if opts.lora_r > 0 and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # a new adapter on top of the merged one
    return model, tok


def _config(cls, opts: TrainOptions, work: Path, o: dict, **fields):
    """A TRL config from the shared flags, the method's fields and `--opt KEY=VALUE`."""
    kw = trainer_kwargs(opts, work)
    _, bf16 = _resolve_dtypes(opts)
    kw["bf16"] = bf16
    kw["fp16"] = False
    kw["ddp_find_unused_parameters"] = False
    kw.update(fields)
    kw.update(_config_overrides(cls, o))
    return cls(**kw)


def _config_overrides(cls, o: dict) -> dict:
    """`--opt KEY=VALUE` settings, checked against the config class (before any work)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in o.get("config") or {}:
        if key not in names:
            raise UsageError(f"--opt {key}: {cls.__name__} has no such setting")
    return dict(o.get("config") or {})


def _check_offline(method: Method, o: dict) -> None:
    if o.get("rewards"):
        raise UsageError(f"--reward is for online methods; {method.name} trains offline from records")
    if not method.needs_ref and o.get("ref_model"):
        raise UsageError(f"{method.name} uses no reference model (drop --ref-model)")


def _hparams(method: Method, opts: TrainOptions, o: dict, **extra) -> dict:
    h = {k: v for k, v in opts.as_dict().items() if k not in ("resume", "force", "extra")}
    h.update(beta=o.get("beta"), **extra)
    if o.get("config"):
        h["trl_config"] = o["config"]
    return h


def _finish(trainer, method: Method, model_spec: str, data: Data, out, work: Path,
            opts: TrainOptions, tok, started: float, hparams: dict, reference: dict | None,
            counts: dict) -> Path:
    """Train, then write the folder (main process only) with alignkit.json."""
    run_trainer(trainer, work, opts.resume)
    metrics = final_metrics(trainer)
    acc = trainer.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        info = {"method": method.name, "trainer": type(trainer).__name__,
                "hyperparameters": hparams,
                "data": {"path": data.path, "sha256": data.sha256, "kind": data.kind, **counts},
                "base": {"spec": str(model_spec), "sha256": _sha_or_none(model_spec)},
                "reference": reference, "final_metrics": metrics,
                "processes": acc.num_processes}
        save_output(model, tok, out, work, force=opts.force, merge_lora=opts.merge_lora,
                    info=info, started=started, seed=opts.seed,
                    inputs={"data": data.sha256})
        console.info(f"wrote {out} ({method.name}, loss {metrics.get('loss', float('nan')):.4f})")
    acc.wait_for_everyone()
    return Path(out)


def _sha_or_none(spec) -> str | None:
    from ..models import model_sha256
    try:
        return model_sha256(spec)
    except Exception:  # an odd folder must not lose a finished run
        return None


def _beta(method: Method, o: dict) -> float:
    beta = o.get("beta")
    beta = method.default_beta if beta is None else beta
    if beta is None or beta <= 0:
        raise UsageError(f"--beta must be > 0 for {method.name}")
    o["beta"] = beta
    return beta


# --- the pair family: dpo, sppo, copg -------------------------------------------------------

_CUSTOM = {"dpo": ("cdpo",), "sppo": ("sppo", "sppo_single"), "copg": ("copg",)}
_DEFAULT_LOSS = {"dpo": "sigmoid", "sppo": "sppo", "copg": "copg"}
_EXTRAS = {"sppo": "p_win", "sppo_single": "p_pair", "copg": "scores"}


def parse_losses(method: str, loss: str | None, weights: str | None,
                 label_smoothing: float) -> tuple[list[tuple[str, float]], bool]:
    """`--loss a,b --loss-weights 1,0.1` -> ([(name, weight)], custom?). With
    `--label-smoothing` > 0, dpo's `sigmoid` becomes alignkit's cDPO."""
    names = [s.strip() for s in (loss or _DEFAULT_LOSS[method]).split(",") if s.strip()]
    if weights:
        try:
            ws = [float(w) for w in weights.split(",")]
        except ValueError:
            raise UsageError(f"--loss-weights must be numbers, got {weights!r}") from None
        if len(ws) != len(names):
            raise UsageError(f"--loss-weights has {len(ws)} values for {len(names)} losses")
    else:
        ws = [1.0] * len(names)
    allowed = set(_CUSTOM[method]) | {"sft"} | (set(DPO_LOSSES) if method == "dpo" else set())
    for n in names:
        if n not in allowed:
            raise UsageError(f"--loss {n!r} is not a {method} loss; choose from "
                             f"{', '.join(sorted(allowed))}")
    if not 0.0 <= label_smoothing < 0.5:
        raise UsageError("--label-smoothing must be in [0, 0.5)")
    if label_smoothing > 0 and method == "dpo":
        names = ["cdpo" if n == "sigmoid" else n for n in names]
    custom = any(n in losses.PAIR_LOSSES for n in names)
    if custom:
        other = [n for n in names if n not in losses.PAIR_LOSSES and n != "sft"]
        if other:
            raise UsageError(f"alignkit's losses ({', '.join(n for n in names if n in losses.PAIR_LOSSES)}) "
                             f"combine only with sft, not with TRL's {', '.join(other)}")
    return list(zip(names, ws)), custom


def _record_ref_rule(o: dict, ref_sha: str):
    """Whether a record's ref_logp_* may be used: never with --no-record-ref; when the
    record names its sampler (`gen.model_sha256`), only if that is the reference; else
    only when the reference is the base (no --ref-model)."""
    if not o.get("record_ref", True):
        return None

    def usable(rec: dict) -> bool:
        gen = rec.get("gen")
        if isinstance(gen, dict) and gen.get("model_sha256"):
            return gen["model_sha256"] == ref_sha
        return not o.get("ref_model")
    return usable


@quiet
def train_pairs(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    """dpo (TRL losses, or cDPO), sppo, copg: pairs through AlignkitDPOTrainer."""
    from ..models import model_sha256
    _check_offline(method, o)
    started = time.time()
    beta = _beta(method, o)
    ls = float(o.get("label_smoothing") or 0.0)
    specs, custom = parse_losses(method.name, o.get("loss"), o.get("loss_weights"), ls)
    _config_overrides(DPOConfig, o)
    extras = tuple(dict.fromkeys(_EXTRAS[n] for n, _ in specs if n in _EXTRAS))

    ref_spec = o.get("ref_model") or model_spec
    ref_sha = model_identity(ref_spec)
    rule = _record_ref_rule(o, model_sha256(ref_spec))
    dataset, built, fingerprint, counts = _tokenized(
        model_spec, data, opts, o,
        lambda tk: pair_rows(data, tk, extras=extras, method=method.name, record_ref=rule))
    work = prepare_run(out, opts)
    model, tok = _load_policy(model_spec, opts, o)
    ref_model = None
    if o.get("ref_model"):  # freed once the reference log-probs are filled
        ref_model, _ = _load_policy_ref(o["ref_model"], opts, o)
    _, bf16 = _resolve_dtypes(opts)
    cache = RefCache(ref_sha, data.sha256, fingerprint, "bf16" if bf16 else "fp32",
                     enabled=o.get("ref_cache", True))
    trl_names = [n for n, _ in specs] if not custom else ["sigmoid"]
    cfg = _config(DPOConfig, opts, work, o, beta=beta, loss_type=trl_names,
                  loss_weights=[w for _, w in specs] if not custom else None,
                  label_smoothing=ls, max_length=opts.max_length,
                  precompute_ref_log_probs=True)
    collator = PairCollator(pad_token_id=tok.pad_token_id, extra_keys=built.extras)
    trainer = AlignkitDPOTrainer(
        model=model, ref_model=ref_model, args=cfg, data_collator=collator,
        train_dataset=dataset, processing_class=tok, peft_config=lora_config(opts), ref_cache=cache,
        loss_hook=pair_hook(specs, beta, ls) if custom else None, extra_keys=built.extras)
    del ref_model
    reference = {"spec": str(ref_spec), "sha256": ref_sha,
                 "kind": "base (adapter disabled)" if opts.lora_r > 0 and not o.get("ref_model")
                 else ("base" if not o.get("ref_model") else "folder"),
                 **trainer.ref_report}
    hp = _hparams(method, opts, o, loss=[n for n, _ in specs], loss_weights=[w for _, w in specs],
                  label_smoothing=ls)
    return _finish(trainer, method, model_spec, data, out, work, opts, tok, started, hp,
                   reference, counts)


def _tokenized(model_spec: str, data: Data, opts: TrainOptions, o: dict, build):
    """Tokenize the records before any model is loaded: (datasets.Dataset, Built without
    its row list, tokenization fingerprint, counts for the manifest). The tokenizer and the
    row list are dropped here, so they do not add to the training's peak memory."""
    from datasets import Dataset

    from ..models import load_tokenizer
    tk = Tokenization(load_tokenizer(model_spec, o.get("trust_remote_code", False)), opts.max_length)
    built = build(tk)
    dataset = Dataset.from_list(built.rows)
    counts = {"records": len(data.records), "rows": len(built.rows), "dropped": built.dropped,
              "cut": built.cut}
    built.rows = []
    fingerprint = tk.fingerprint()
    del tk
    gc.collect()
    return dataset, built, fingerprint, counts


def _load_policy_ref(ref_spec: str, opts: TrainOptions, o: dict):
    from ..models import load_causal_lm
    weights, _ = _resolve_dtypes(opts)
    return load_causal_lm(ref_spec, weights, allow_pickle=o.get("allow_pickle", False),
                          trust_remote_code=o.get("trust_remote_code", False))


# --- the listwise family: pro, grao -----------------------------------------------------------

@quiet
def train_groups(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    """pro (ranking records) and grao (scored samples with a reference answer)."""
    _check_offline(method, o)
    started = time.time()
    if method.name == "pro":
        if o.get("beta") is not None:
            raise UsageError("pro has no beta (its temperatures are reward differences)")
        beta, lam = 0.0, 0.0
        sft_weight = 0.05 if o.get("sft_weight") is None else float(o["sft_weight"])
        extra = {"sft_weight": sft_weight}
    else:
        beta = _beta(method, o)
        lam = float(o["grao_lambda"]) if o.get("grao_lambda") is not None else 0.6
        sft_weight, extra = 0.0, {"grao_lambda": lam}
    _config_overrides(DPOConfig, o)
    dataset, _, _, counts = _tokenized(
        model_spec, data, opts, o,
        lambda tk: group_rows(data, tk, method=method.name, with_reference=method.name == "grao"))
    work = prepare_run(out, opts)
    model, tok = _load_policy(model_spec, opts, o)
    cfg = _config(DPOConfig, opts, work, o, beta=max(beta, 1e-9), max_length=opts.max_length,
                  precompute_ref_log_probs=True)
    trainer = AlignkitDPOTrainer(
        model=model, args=cfg, data_collator=GroupCollator(pad_token_id=tok.pad_token_id),
        train_dataset=dataset, processing_class=tok, peft_config=lora_config(opts),
        loss_hook=group_hook(method.name, beta, sft_weight, lam))
    return _finish(trainer, method, model_spec, data, out, work, opts, tok, started,
                   _hparams(method, opts, o, **extra), None, counts)


# --- TRL's own trainers: sft, kto, simpo, orpo -------------------------------------------------

def _train_trl(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, o: dict,
               config_cls, trainer_cls, fields: dict, ref_model_ok: bool = False) -> Path:
    from datasets import Dataset

    from ..models import load_tokenizer
    _check_offline(method, o)
    _config_overrides(config_cls, o)
    started = time.time()
    tok = load_tokenizer(model_spec, o.get("trust_remote_code", False))
    rows = trl_rows(data, method.data, bool(getattr(tok, "chat_template", None)))
    work = prepare_run(out, opts)
    model, tok = _load_policy(model_spec, opts, o)
    cfg = _config(config_cls, opts, work, o, max_length=opts.max_length, **fields)
    kw = {}
    reference = None
    if ref_model_ok:
        ref_spec = o.get("ref_model") or model_spec
        reference = {"spec": str(ref_spec), "computed": "in the training loop (TRL)"}
        if o.get("ref_model"):
            kw["ref_model"], _ = _load_policy_ref(o["ref_model"], opts, o)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" and deprecation notices
        trainer = trainer_cls(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=lora_config(opts), **kw)
    hp = _hparams(method, opts, o, **{k: v for k, v in fields.items() if k != "beta"})
    return _finish(trainer, method, model_spec, data, out, work, opts, tok, started, hp,
                   reference, {"records": len(data.records), "rows": len(rows)})


@quiet
def train_sft(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    from trl import SFTConfig, SFTTrainer
    if o.get("beta") is not None:
        raise UsageError("sft has no beta")
    return _train_trl(method, model_spec, data, out, opts, o, SFTConfig, SFTTrainer,
                      {"completion_only_loss": True})


@quiet
def train_kto(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    from trl import KTOConfig, KTOTrainer
    return _train_trl(method, model_spec, data, out, opts, o, KTOConfig, KTOTrainer,
                      {"beta": _beta(method, o)}, ref_model_ok=True)


@quiet
def train_simpo(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
    gamma = o.get("simpo_gamma")
    return _train_trl(method, model_spec, data, out, opts, o, CPOConfig, CPOTrainer,
                      {"beta": _beta(method, o), "loss_type": "simpo", "cpo_alpha": 0.0,
                       "simpo_gamma": 0.5 if gamma is None else float(gamma)})


@quiet
def train_orpo(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    return _train_trl(method, model_spec, data, out, opts, o, ORPOConfig, ORPOTrainer,
                      {"beta": _beta(method, o)})
