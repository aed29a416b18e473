"""Online policy training: sample from the policy, score with the scorers of `alignkit
score`, update. Every method is a Trainer (online_trainers.py), run by
`alignkit.training.run_trainer` (metrics.jsonl, progress, SIGINT/SIGTERM checkpoint,
`--resume`, `accelerate launch`), and writes the folder like the offline methods.

| method     | trainer                                   | TRL has it?                        |
|------------|-------------------------------------------|------------------------------------|
| grpo       | GRPOTrainer (+ alignkit sampler)          | yes                                |
| rloo       | RLOOTrainer (+ alignkit sampler)          | yes                                |
| earl       | GRPOTrainer subclass, entropy gate        | batch-scope gate only              |
| gtpo       | GRPOTrainer subclass, own loss            | no                                 |
| p3o        | GRPOTrainer subclass, pair loss           | no                                 |
| online-ipo | GRPOTrainer subclass, pair loss           | OnlineDPO's IPO (hard labels) only |
| ipo-md     | GRPOTrainer subclass, mixture sampling    | no                                 |

Rewards: `--reward` takes the scorer specs of `alignkit score` (repeatable or a comma
list; `--reward-weights`, `--hybrid`, `--calibrate`, `--transform`), combined by
`build_scorer(...).reward_fn()`: one reward implementation for scoring and training.
The prompt records' `meta` (checks, rubric, user, ...) and `id` reach the scorers.

`--batch-size` counts completions per device step (TRL's convention): with G
generations per prompt a step holds batch_size / G prompts. The output folder also
holds `samples.jsonl` (every `--sample-every` steps, the sampled completions with
their `score`, as samples records with ids `PROMPT_ID@STEP`, readable by `alignkit
eval`); metrics.jsonl has `reward`, `reward_std`, `kl_ref` (sequence-level),
`entropy` and `completions/mean_length` on every logging step. samples.jsonl is
written at the rollouts whose step is a multiple of N (p3o rolls out every
`num_iterations` steps); `--resume` drops the samples the interrupted run took after
its checkpoint.

Defaults and readings (ALGORITHMS.md marks these UNVERIFIED where noted):
- grpo: TRL's (loss dapo, scale_rewards group, beta 0, epsilon 0.2); G = 4.
- gtpo: the authors' code: entropy threshold 0.7 (`--entropy-threshold`; a tiny or
  high-entropy model needs more, else every completion is filtered), entropy scale
  0.1, conflict weight 2.0; the loss is the mean over completions (the code sums).
- earl: beta 0.04 (DeepSeekMath's; EARL's is UNVERIFIED), keep the top 20% of tokens
  by entropy (the 80/20 paper), scope batch.
- p3o: kappa (--beta) 0.01, epsilon 0.2, ratio clamp c = 10, rewards over a running
  std clipped to ±10, num_iterations 2 (`--opt num_iterations=N`), all from the
  authors' trlx example; q uses the rollout-time log-ratios (UNVERIFIED).
- online-ipo / ipo-md: tau (--beta) 0.1, summed log-probs (TRL's OnlineDPO), P = 1,
  0 or ½ on a tie (an unscored pair is skipped); ipo-md alpha 0.5 (TRL Nash-MD's
  mixture_coef; the paper's is UNVERIFIED). For ipo-md, `kl_ref` is measured on the
  mixture samples.
- Log-probabilities in the losses are TRL's, at the sampling temperature (default 1).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import console
from ..errors import DataError, UsageError
from ..training import TrainOptions, lora_config, prepare_run
from . import Method
from .data import Data

GRPO_LOSSES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")

DEFAULTS = dict(num_generations=4, max_new_tokens=128, temperature=1.0, sample_every=10,
                epsilon=0.2, entropy_quantile=0.2, entropy_scope="batch", clip="pair",
                alpha=0.5, p3o_iterations=2,
                entropy_threshold=0.7)  # GTPO's ENT_THRESHOLD (online_losses)


def reward_specs(values: list[str] | None) -> list[str]:
    """`--reward a --reward b,c` -> ["a", "b", "c"]."""
    specs = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    if not specs:
        raise UsageError("online methods need --reward SCORER (the specs of `alignkit score`: "
                         "rules, rm:DIR, judge:MODEL, python:MOD:FN, length, ...)")
    return specs


def _choice(o: dict, key: str, allowed: tuple, default):
    value = o.get(key)
    value = default if value is None else value
    if value not in allowed:
        raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _number(o: dict, key: str, default, lo: float, hi: float = float("inf"),
            lo_open: bool = False):
    value = o.get(key)
    value = default if value is None else value
    if value is None:
        return None
    bad = value <= lo if lo_open else value < lo
    if bad or value > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]" if hi != float("inf") else \
            f"{'>' if lo_open else '>='} {lo}"
        raise UsageError(f"--{key.replace('_', '-')} must be {rng}, got {value}")
    return value


@dataclass
class Plan:
    """What one online method needs: its trainer, TRL config fields, trainer kwargs."""
    trainer: str
    config: str = "GRPOConfig"
    fields: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    hparams: dict = field(default_factory=dict)


def plan(method: Method, o: dict, opts: TrainOptions) -> Plan:
    """Check the method's options (UsageError) and map them to TRL settings."""
    name = method.name
    beta = o.get("beta")
    beta = method.default_beta if beta is None else beta
    if name == "gtpo":
        if o.get("beta") is not None:
            raise UsageError("gtpo has no KL term (no --beta)")
        beta = 0.0
    elif name in ("online-ipo", "ipo-md"):
        _number({"beta": beta}, "beta", None, 0.0, lo_open=True)
    else:
        _number({"beta": beta}, "beta", None, 0.0)
    o["beta"] = beta
    pair = name in ("p3o", "online-ipo", "ipo-md")
    G = 2 if pair else int(_number(o, "num_generations", DEFAULTS["num_generations"], 2))
    per_step = opts.batch_size * opts.grad_accum * int(os.environ.get("WORLD_SIZE", "1") or 1)
    if per_step % G:
        what = "2 (two samples per prompt)" if pair else f"--num-generations ({G})"
        raise UsageError(f"--batch-size x --grad-accum x processes ({per_step}) counts completions "
                         f"and must be a multiple of {what}")
    if pair and opts.batch_size % 2:
        raise UsageError(f"--batch-size must be even for {name} (the two samples of a prompt "
                         "stay in one step)")
    fields = dict(num_generations=G,
                  max_completion_length=int(_number(o, "max_new_tokens", DEFAULTS["max_new_tokens"], 1)),
                  temperature=float(_number(o, "temperature", DEFAULTS["temperature"], 0.0, lo_open=True)),
                  beta=float(beta), log_completions=False)
    eps = _number(o, "epsilon", DEFAULTS["epsilon"], 0.0, lo_open=True)
    if "epsilon" in method.options:
        fields["epsilon"] = eps
    if o.get("epsilon_high") is not None:
        fields["epsilon_high"] = _number(o, "epsilon_high", None, 0.0, lo_open=True)
    if o.get("mask_truncated"):
        fields["mask_truncated_completions"] = True
    p = Plan(trainer={"grpo": "AlignkitGRPOTrainer", "earl": "EARLTrainer", "gtpo": "GTPOTrainer",
                      "rloo": "AlignkitRLOOTrainer"}.get(name, "PairTrainer"),
             config="RLOOConfig" if name == "rloo" else "GRPOConfig", fields=fields)
    if name in ("grpo", "earl"):
        fields["loss_type"] = _choice(o, "loss", GRPO_LOSSES, "dapo")
        fields["scale_rewards"] = _choice(o, "scale_rewards", ("group", "batch", "none"), "group")
        fields["importance_sampling_level"] = _choice(o, "importance_sampling",
                                                      ("token", "sequence"), "token")
    if name == "earl":
        fields["top_entropy_quantile"] = float(_number(o, "entropy_quantile", DEFAULTS["entropy_quantile"],
                                                       0.0, 1.0, lo_open=True))
        p.kwargs["entropy_scope"] = _choice(o, "entropy_scope", ("batch", "response"), "batch")
    if name == "gtpo":
        fields["scale_rewards"] = "none"
        p.kwargs["entropy_threshold"] = float(_number(o, "entropy_threshold",
                                                      DEFAULTS["entropy_threshold"], 0.0))
    if pair:
        fields["beta"] = 0.0  # the pair losses hold their own coefficient
        p.kwargs.update(kind="p3o" if name == "p3o" else "ipo", coef=float(beta))
        if name == "p3o":
            p.kwargs.update(clip=_choice(o, "clip", ("pair", "token"), DEFAULTS["clip"]), eps=eps)
            fields["num_iterations"] = DEFAULTS["p3o_iterations"]
    alpha = 0.0
    if name == "ipo-md":
        alpha = float(_number(o, "alpha", DEFAULTS["alpha"], 0.0, 1.0))
    p.kwargs["alpha"] = alpha
    p.hparams = {k: v for k, v in fields.items() if k not in ("log_completions", "beta")}
    p.hparams.update({k: v for k, v in p.kwargs.items() if k != "alpha" or name == "ipo-md"})
    return p


def _reward_fn(scorer, records: list[dict]):
    """The combined scorer as a TRL reward function over the dataset's `row` column:
    each completion is scored against its prompt record (prompt, meta, id)."""
    from .online_trainers import as_completion
    fn = scorer.reward_fn()

    def reward(prompts, completions, row, **_):
        recs = [records[i] for i in row]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        return fn([r["prompt"] for r in recs],
                  [as_completion(t, r["prompt"]) for t, r in zip(texts, recs)],
                  meta=[r.get("meta") or {} for r in recs], id=[r["id"] for r in recs])

    reward.__name__ = fn.__name__
    return reward


def _check_rules(data: Data, scorer) -> None:
    """Malformed `meta.checks` fail before training, at their line (exit 3)."""
    from ..checks import run_checks
    from ..scorers.rules import RulesScorer, has_checks
    if not any(isinstance(s, RulesScorer) for s in scorer.scorers):
        return
    for i, rec in enumerate(data.records):
        meta = rec.get("meta") or {}
        if has_checks(meta):
            try:
                run_checks("", None, prompt_text=rec["prompt"], meta=meta)
            except DataError as e:
                raise e.at(data.path if data.path != "-" else "<stdin>", data.lines[i]) from None


def _prompt_rows(data: Data, tok, max_new_tokens: int, max_length: int) -> tuple[list[dict], int]:
    """Dataset rows {prompt: the chat-templated text, row: record index}; prompts with
    no room for max_new_tokens under --max-length are dropped (with a warning)."""
    from ..generation import encode_prompt, render_prompt
    rows, dropped = [], 0
    for i, rec in enumerate(data.records):
        text = render_prompt(tok, rec["prompt"])
        if len(encode_prompt(tok, text)) + max_new_tokens > max_length:
            dropped += 1
            continue
        rows.append({"prompt": text, "row": i})
    if dropped:
        console.warn(f"{dropped} of {len(data.records)} prompts dropped: prompt + --max-new-tokens "
                     f"{max_new_tokens} exceeds --max-length {max_length}")
    if not rows:
        raise UsageError(f"no prompt fits --max-length {max_length} with --max-new-tokens {max_new_tokens}")
    return rows, dropped


def train_online(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    """grpo, gtpo, earl, rloo, p3o, online-ipo, ipo-md (see the module docstring)."""
    from .offline import quiet
    return quiet(_train_online)(method, model_spec, data, out, opts, **o)


def _train_online(method: Method, model_spec: str, data: Data, out, opts: TrainOptions, **o) -> Path:
    import trl
    from datasets import Dataset

    from ..models import load_tokenizer, model_sha256
    from ..scorers import build_scorer
    from . import online_trainers
    from .offline import _config, _config_overrides, _finish, _hparams, _load_policy, _load_policy_ref
    started = time.time()
    p = plan(method, o, opts)
    config_cls = getattr(trl, p.config)
    _config_overrides(config_cls, o)
    specs = reward_specs(o.get("rewards"))
    scorer = build_scorer(specs, o.get("reward_weights"), hybrid=bool(o.get("hybrid")),
                          calibrate=o.get("calibrate"), transform=o.get("transform"),
                          allow_pickle=o.get("allow_pickle", False),
                          trust_remote_code=o.get("trust_remote_code", False))
    _check_rules(data, scorer)
    tok = load_tokenizer(model_spec, o.get("trust_remote_code", False))
    rows, dropped = _prompt_rows(data, tok, p.fields["max_completion_length"], opts.max_length)
    sample_every = int(_number(o, "sample_every", DEFAULTS["sample_every"], 0))
    for key in ("min_p", "repetition_penalty", "use_vllm"):
        if key in (o.get("config") or {}):
            raise UsageError(f"--opt {key}: online methods sample with alignkit's sampler, "
                             "which has no such setting")

    work = prepare_run(out, opts)
    model, tok = _load_policy(model_spec, opts, o)
    ref_spec = o.get("ref_model") or model_spec
    ref = None
    if opts.lora_r <= 0 or o.get("ref_model") or method.name == "ipo-md":
        ref, _ = _load_policy_ref(ref_spec, opts, o)
        if hasattr(ref, "merge_and_unload"):
            ref = ref.merge_and_unload()
    try:
        cfg = _config(config_cls, opts, work, o, **p.fields)
    except ValueError as e:  # TRL's own checks of the batch geometry
        raise UsageError(str(e)) from None
    ctx = online_trainers.OnlineContext(
        records=data.records, tokenizer=tok, work=work, seed=opts.seed, sample_every=sample_every,
        alpha=p.kwargs.pop("alpha"), resumed=opts.resume,
        gen={"model": str(out), "base": str(model_spec), "method": method.name,
             "temperature": cfg.temperature, "top_p": cfg.top_p,
             "max_new_tokens": cfg.max_completion_length, "seed": opts.seed})
    trainer = getattr(online_trainers, p.trainer)(
        model=model, reward_funcs=[_reward_fn(scorer, data.records)], args=cfg,
        train_dataset=Dataset.from_list(rows), processing_class=tok,
        peft_config=lora_config(opts), ctx=ctx, ref_model=ref, **p.kwargs)
    del ref
    reference = {"spec": str(ref_spec), "sha256": model_sha256(ref_spec),
                 "kind": "folder" if o.get("ref_model") else
                 ("base (adapter disabled)" if trainer.ref_model is None else "base")}
    hp = _hparams(method, opts, o, rewards=specs, reward_weights=o.get("reward_weights"),
                  hybrid=bool(o.get("hybrid")), calibrate=o.get("calibrate"),
                  transform=o.get("transform"), sample_every=sample_every, **p.hparams)
    counts = {"records": len(data.records), "prompts": len(rows), "dropped": dropped}
    return _finish(trainer, method, model_spec, data, out, work, opts, tok, started, hp,
                   reference, counts)
