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
list; `--reward-weights`), built with the scorer options every scoring command shares
(`scorers.options.ScorerOptions`: `--hybrid`, `--calibrate`, `--transform`, `--rubric`,
`--aggregate`, `--user`, `--tokenizer`, `--scorer-batch-size`, ...) and combined by
`reward_fn()`: one reward implementation for scoring and training. The prompt records'
`meta` (checks, rubric, user, ...) and `id` reach the scorers. Two reward add-ons live in
their own modules: `--meta-judge MODEL` (mpo.py, MPO: a meta-judge rewrites the judge's
`--rubric` every `--meta-every` steps; OUT/rubrics.jsonl) and `--reward-weights
learn:PRIMARY` (reward_blend.py, BARFI: the auxiliary weights learned by the one-step
hypergradient cos(g_primary, g_k); `reward_weight/<spec>` in metrics.jsonl).
Step prompts (`meta.steps_prefix`, from `relabel --strategy step-prompts`): PROPA's
step-level GRPO, one sampled step per completion, rewarded on the text so far
(`--reward prm-step:DIR`); see policy/steps.py.

Each method is one entry below. Its info fields say what differs between methods:
`trainer_class` and `config_class` ("module:attribute"), `pair_loss` ("p3o" | "ipo"
for the two-samples-per-prompt PairTrainer, "" otherwise), `fixed` (TRL config fields
the method sets), `trainer_kwargs` (option -> trainer keyword), `mixture` (ipo-md:
samples from the geometric mixture with a separate reference) and `default_loss`.
How an option becomes a TRL config field is `CONFIG_FIELDS`, the same for every method
that takes the option.

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
  authors' trlx example; q uses the current policy's log-ratios (the authors'
  `modeling_p3o.py`), the rollout-time ones only the ratio and the clip.
- online-ipo / ipo-md: tau (--beta) 0.1, summed log-probs (TRL's OnlineDPO), P = 1,
  0 or ½ on a tie (an unscored pair is skipped); ipo-md alpha 0.5 (TRL Nash-MD's
  mixture_coef; the paper's is UNVERIFIED). For ipo-md, `kl_ref` is measured on the
  mixture samples.
- Log-probabilities in the losses are TRL's, at the sampling temperature (default 1).
- `--entropy-coef C` (every method; Part D §10, the Policy Cliff): loss − C·Ĥ, Ĥ the mean
  full-vocabulary token entropy, with gradient, over the completion tokens the loss acts
  on (earl: the gated tokens), a token mean not rescaled by --loss (TRL's `entropy_coef`
  reading, so C means the same everywhere); a fixed C (no adaptive target). metrics.jsonl
  gets `entropy_bonus/entropy` and `entropy_bonus` (C·Ĥ).
- `--credit chunk --chunk-by newline|sentence|regex:P` (grpo, earl; Part D §4, IPA): the
  completion split into chunks at the ends of the boundary regex (on the decoded text
  of each token), ρ_c = exp(mean token log-ratio over the chunk) (the report's geometric
  mean), GRPO's clip on ρ_c (`--chunk-clip ppo`, the default) or the report's TOPR split
  (`--chunk-clip ipa`: A > 0 plain A-weighted SL, else A·[ρ_c]_0^1), the sequence
  advantage, spread over the chunk's tokens and aggregated by --loss (not cispo) with
  the k3 KL per token. Simplified: the sequence advantage, not IPA's per-chunk
  discounted returns, and no train/inference mismatch mask. earl's gate then
  multiplies the chunk terms per token. gtpo has no ratio (ρ = 1, nothing to take per
  chunk) and rloo's is per sequence: neither takes --credit.
- `--off-policy FILE --off-policy-share S` (grpo, earl): semi-off-policy group members
  (SOPHIA's text-only core), in `off_policy.py`.


Sampling engine (`--engine`, every online method but ipo-md): `hf` (the default) samples
with `alignkit.generation.sample` on the policy itself. `vllm` builds one `VllmEngine`
(alignkit/vllm_engine.py, the engine of `gen-pairs --engine vllm`) over the policy's
initial full model folder (`--model`; with `--lora-r` the base the adapter is trained
on; an adapter folder is refused: merge it first) and samples there. The engine holds
its own copy of the weights: before sampling at every step that is a multiple of
`--sync-every` K (default 1; the first sampling always) the policy's current full
weights are pushed into it (`weight_sync.sync_to_engine`: a LoRA adapter folded into the
base weights beside the model, which is not touched). With K > 1 the samples come from
weights up to K-1 optimizer steps old, so training is slightly off-policy (the losses'
log-probabilities are still the policy's own, as with TRL's vLLM mode without its
importance-sampling correction). `logp` in samples.jsonl, and the policy side of `kl_ref`,
is the engine's (the weights that sampled); `logp_ref` is still teacher-forced by the
HF reference. Refused with exit 2: ipo-md (its sampler draws from the geometric
mixture with the reference, which vLLM cannot), more than one process (`accelerate
launch` with several processes: one engine per process is not supported), vLLM not
installed, `--sync-every` without `--engine vllm`. The engine is closed when training
ends, fails or is interrupted.
"""
from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import console
from ..errors import DataError, UsageError
from ..registry import Param
from . import add
from .common import (PolicyRun, config, config_overrides, finish, hparams, import_attr,
                     load_policy, load_reference, method_beta, quiet)
from .data import Data
from .pairs import GRPO_DEFAULT_LOSS, GRPO_LOSSES, LOSS
from .mpo import PARAMS as MPO_PARAMS  # --meta-judge (MPO, Part D §6; alignkit/policy/mpo.py)
from .off_policy import OFF_POLICY_PARAMS, check_off_policy, load_off_policy  # --off-policy (SOPHIA)
from .reward_blend import PARAMS as BLEND_PARAMS  # --reward-weights learn: (BARFI, Part D §9)

GRPO_LOSS = dataclasses.replace(LOSS, choices=GRPO_LOSSES)  # --loss as grpo and earl check it

# --- parameters -------------------------------------------------------------------------------

MAX_NEW_TOKENS = Param("max_new_tokens", int, 128, "Max sampled tokens per completion.", low=1)
TEMPERATURE = Param("temperature", float, 1.0, "Sampling temperature.", low=0.0, low_open=True)
SAMPLE_EVERY = Param("sample_every", int, 10, "Write the sampled completions to samples.jsonl "
                     "every N steps (0: never).", low=0)
NUM_GENERATIONS = Param("num_generations", int, 4, "Samples per prompt.", low=2)
SCALE_REWARDS = Param("scale_rewards", str, "group", "How the advantages are scaled.",
                      choices=("group", "batch", "none"))
EPSILON = Param("epsilon", float, 0.2, "Clip range.", low=0.0, low_open=True)
EPSILON_HIGH = Param("epsilon_high", float, None, "Upper clip range (DAPO: 0.28; default: "
                     "--epsilon).", low=0.0, low_open=True)
IMPORTANCE_SAMPLING = Param("importance_sampling", str, "token", "Importance-sampling level "
                            "(sequence = GSPO).", choices=("token", "sequence"))
MASK_TRUNCATED = Param("mask_truncated", bool, False, "No loss on completions cut by "
                       "--max-new-tokens.")
ENTROPY_QUANTILE = Param("entropy_quantile", float, 0.2, "Share of the highest-entropy tokens "
                         "kept.", low=0.0, low_open=True, high=1.0)
ENTROPY_SCOPE = Param("entropy_scope", str, "batch", "Where the entropy quantile is taken.",
                      choices=("batch", "response"))
# GTPO's ENT_THRESHOLD (the authors' code; also the default of the pure formula,
# online_losses.gtpo_advantages)
ENTROPY_THRESHOLD = Param("entropy_threshold", float, 0.7, "Completions with a higher mean "
                          "token entropy get no update.", low=0.0)
CLIP = Param("clip", str, "pair", "P3O's clip: pair (joint, on the log-ratio difference) | "
             "token.", choices=("pair", "token"))
ALPHA = Param("alpha", float, 0.5, "Reference weight of the sampling mixture.", low=0.0,
              high=1.0)
ENGINE = Param("engine", str, "hf", "Sampling engine: hf = alignkit's sampler on the policy; "
               "vllm = one vLLM engine in this process holding a copy of the policy's weights, "
               "refreshed every --sync-every steps (one process only; not ipo-md).",
               choices=("hf", "vllm"))
SYNC_EVERY = Param("sync_every", int, 1, "--engine vllm: push the policy's weights to the "
                   "engine before sampling at every step that is a multiple of N (the first "
                   "sampling always gets them); with N > 1 samples come from weights up to "
                   "N-1 steps old (slightly off-policy).", low=1)

# The Policy Cliff (ALGORITHMS.md Part D §10): entropy regularisation makes the
# reward -> policy map continuous. TRL's entropy_coef aggregation, on every method.
ENTROPY_COEF = Param("entropy_coef", float, 0.0, "Entropy bonus C: the loss becomes loss - "
                     "C*H, H the mean full-vocabulary token entropy (with gradient) over the "
                     "completion tokens the loss acts on (earl: the gated ones), a token mean "
                     "not rescaled by --loss (TRL's entropy_coef); 0 = off. Suggested 1e-3 "
                     "(UNVERIFIED). Fixed C only (no adaptive target).", low=0.0)
# IPA chunk-level credit (ALGORITHMS.md Part D §4), grpo and earl
CREDIT = Param("credit", str, "token", "Credit unit: token = GRPO's per-token ratio and clip; "
               "chunk = IPA's chunk ratio exp(mean token log-ratio over the chunk, the "
               "report's geometric mean), clipped (--chunk-clip) and weighted by the sequence "
               "advantage, spread over the chunk's tokens (a simplification of IPA: the "
               "sequence advantage, not the report's per-chunk discounted returns).",
               choices=("token", "chunk"))
CHUNK_BY = Param("chunk_by", str, None, "--credit chunk: where a chunk ends: newline (a run "
                 "of newlines), sentence (. ! ? before whitespace or the end) or regex:PATTERN "
                 "(the end of each match); default newline.", metavar="newline|sentence|regex:P")
CHUNK_CLIP = Param("chunk_clip", str, "ppo", "--credit chunk: ppo = GRPO's clip of the chunk "
                   "ratio to [1-eps, 1+eps-high]; ipa = the ROME report's TOPR split: completions "
                   "with A > 0 get the plain A-weighted log-likelihood gradient, the others A "
                   "times the chunk ratio truncated to [0, 1] (no PPO clip).", choices=("ppo", "ipa"))

ONLINE = (MAX_NEW_TOKENS, TEMPERATURE, SAMPLE_EVERY, ENGINE, SYNC_EVERY, ENTROPY_COEF) + MPO_PARAMS \
    + BLEND_PARAMS
GRPO = (LOSS, SCALE_REWARDS, NUM_GENERATIONS, EPSILON, EPSILON_HIGH, IMPORTANCE_SAMPLING,
        MASK_TRUNCATED)

# How a method option becomes a TRL config field (for every method that takes it). An
# option left unset (None) or off (False) leaves TRL's default.
CONFIG_FIELDS = {"max_new_tokens": "max_completion_length", "temperature": "temperature",
                 "epsilon": "epsilon", "epsilon_high": "epsilon_high",
                 "mask_truncated": "mask_truncated_completions", "loss": "loss_type",
                 "scale_rewards": "scale_rewards",
                 "importance_sampling": "importance_sampling_level",
                 "entropy_quantile": "top_entropy_quantile"}

# --- the methods ------------------------------------------------------------------------------

_TRAINERS = "alignkit.policy.online_trainers"


def _online(name: str, summary: str, *, params=(), trainer: str, config: str = "GRPOConfig",
            pair_loss: str = "", fixed: dict | None = None, trainer_kwargs: dict | None = None,
            mixture: bool = False, default_loss: str = "", **kw) -> None:
    add(name, summary, f"{__name__}:train_online", reads="prompts", params=ONLINE + params,
        online=True, trainer_class=f"{_TRAINERS}:{trainer}", config_class=f"trl:{config}",
        pair_loss=pair_loss, fixed=fixed or {}, trainer_kwargs=trainer_kwargs or {},
        mixture=mixture, default_loss=default_loss, **kw)


_online("grpo", "GRPO through TRL (--loss, --scale-rewards, --num-generations, --beta k3 KL, "
        "--epsilon[-high], --importance-sampling sequence = GSPO, --credit chunk = IPA "
        "chunk-level ratios, --off-policy = SOPHIA-style off-policy group members)",
        params=GRPO + (CREDIT, CHUNK_BY, CHUNK_CLIP) + OFF_POLICY_PARAMS,
        trl="GRPOTrainer", default_beta=0.0, zero_beta_ok=True, trainer="AlignkitGRPOTrainer",
        default_loss=GRPO_DEFAULT_LOSS,
        trainer_kwargs={"credit": "credit", "chunk_by": "chunk_by",
                        "chunk_clip": "chunk_clip"})
_online("gtpo", "GTPO: conflict-token protection + entropy filter, no reference in the loss",
        params=(NUM_GENERATIONS, MASK_TRUNCATED, ENTROPY_THRESHOLD), default_beta=0.0,
        no_beta="gtpo has no KL term (no --beta)", trainer="GTPOTrainer",
        fixed={"scale_rewards": "none"}, trainer_kwargs={"entropy_threshold": "entropy_threshold"})
_online("earl", "EARL: GRPO with the PG term gated to high-entropy tokens (--entropy-quantile, "
        "--entropy-scope; --off-policy as grpo)", params=GRPO + (ENTROPY_QUANTILE, ENTROPY_SCOPE,
                                                         CREDIT, CHUNK_BY, CHUNK_CLIP)
        + OFF_POLICY_PARAMS,
        default_beta=0.04, zero_beta_ok=True, trainer="EARLTrainer", default_loss=GRPO_DEFAULT_LOSS,
        trainer_kwargs={"entropy_scope": "entropy_scope", "credit": "credit", "chunk_by": "chunk_by",
                        "chunk_clip": "chunk_clip"})
_online("rloo", "RLOO through TRL (leave-one-out baseline, KL in the reward)",
        params=(NUM_GENERATIONS, EPSILON, EPSILON_HIGH, MASK_TRUNCATED), trl="RLOOTrainer",
        default_beta=0.05, zero_beta_ok=True, trainer="AlignkitRLOOTrainer", config="RLOOConfig")
_online("p3o", "P3O: pairwise PPO on two samples per prompt (--clip pair|token, --beta = kappa)",
        params=(CLIP, EPSILON), default_lr=5e-7, default_beta=0.01, needs_ref=True,
        zero_beta_ok=True, trainer="PairTrainer", pair_loss="p3o", fixed={"num_iterations": 2},
        trainer_kwargs={"clip": "clip", "epsilon": "eps"})
_online("online-ipo", "online IPO: two policy samples per prompt labelled by the scorer "
        "(--beta = tau)", default_beta=0.1, needs_ref=True, trainer="PairTrainer",
        pair_loss="ipo")
_online("ipo-md", "IPO-MD: online IPO on samples from the geometric mixture with the reference "
        "(--alpha)", params=(ALPHA,), default_beta=0.1, needs_ref=True, trainer="PairTrainer",
        pair_loss="ipo", mixture=True)


def check_engine(run: PolicyRun) -> None:
    """--engine / --sync-every: what the vLLM engine cannot do is a UsageError, before any
    model is loaded."""
    engine, every = run.options["engine"], run.options["sync_every"]
    if engine != "vllm":
        if every != SYNC_EVERY.default:
            raise UsageError("--sync-every needs --engine vllm (the hf engine samples from the "
                             "policy itself)")
        return
    m = run.method
    if m.mixture:
        raise UsageError(f"--engine vllm cannot sample for {m.name}: it draws from the geometric "
                         "mixture of the policy and the reference, which needs both models in "
                         "the sampler; use --engine hf")
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world > 1:
        raise UsageError(f"--engine vllm runs one engine in one process; this run has {world} "
                         "processes (accelerate launch): launch one process or use --engine hf")
    from ..vllm_engine import INSTALL_HINT, vllm_available
    if not vllm_available():
        raise UsageError(INSTALL_HINT)
    from ..vllm_engine import full_model_folder
    full_model_folder(run.model)


def _check_credit(o: dict) -> None:
    """--credit / --chunk-by: UsageError (exit 2) before any model loads."""
    from .online_losses import chunk_pattern
    if o["credit"] != "chunk":
        if o["chunk_by"] is not None:
            raise UsageError("--chunk-by needs --credit chunk")
        if o["chunk_clip"] != CHUNK_CLIP.default:
            raise UsageError("--chunk-clip needs --credit chunk")
        return
    o["chunk_by"] = o["chunk_by"] or "newline"
    try:
        chunk_pattern(o["chunk_by"])
    except ValueError as e:
        raise UsageError(f"--chunk-by {e}") from None
    if o["loss"] == "cispo":
        raise UsageError("--credit chunk works with --loss grpo | bnpo | dr_grpo | dapo, not cispo")
    if o["importance_sampling"] == "sequence":
        raise UsageError("--credit chunk takes the ratio per chunk; it cannot be combined with "
                         "--importance-sampling sequence")


def reward_specs(values: list[str] | None) -> list[str]:
    """`--reward a --reward b,c` -> ["a", "b", "c"]."""
    specs = [s.strip() for v in values or [] for s in v.split(",") if s.strip()]
    if not specs:
        raise UsageError("online methods need --reward SCORER (the specs of `alignkit score`: "
                         "rules, rm:DIR, judge:MODEL, python:MOD:FN, length, ...)")
    return specs


@dataclass
class Plan:
    """What one online method needs: its trainer and TRL config ("module:attribute"), the
    config fields, the trainer kwargs, the mixture weight and the hyperparameters."""
    trainer: str
    config: str
    beta: float | None = None          # the method's beta (for pair methods: the loss's)
    fields: dict = field(default_factory=dict)
    kwargs: dict = field(default_factory=dict)
    alpha: float = 0.0                 # the reference's weight in the sampler (ipo-md)
    hparams: dict = field(default_factory=dict)
    off_policy: dict = field(default_factory=dict)  # OnlineContext's off_* fields (--off-policy)


def plan(run: PolicyRun) -> Plan:
    """Check the method's options (UsageError) and map them to TRL settings."""
    m, opts = run.method, run.opts
    o = dict(run.options)
    beta = method_beta(run)
    G = 2 if m.pair_loss else o["num_generations"]
    per_step = opts.batch_size * opts.grad_accum * int(os.environ.get("WORLD_SIZE", "1") or 1)
    if per_step % G:
        what = "2 (two samples per prompt)" if m.pair_loss else f"--num-generations ({G})"
        raise UsageError(f"--batch-size x --grad-accum x processes ({per_step}) counts completions "
                         f"and must be a multiple of {what}")
    if m.pair_loss and opts.batch_size % 2:
        raise UsageError(f"--batch-size must be even for {m.name} (the two samples of a prompt "
                         "stay in one step)")
    if "loss" in o:
        o["loss"] = GRPO_LOSS.coerce(o["loss"] or m.default_loss)
    fields = dict(num_generations=G, beta=float(beta), log_completions=False)
    for name, key in CONFIG_FIELDS.items():
        if name in o and o[name] is not None and o[name] is not False:
            fields[key] = o[name]
    fields.update(m.fixed)
    if "credit" in o:
        _check_credit(o)
    off = check_off_policy(o) if "off_policy" in o else {}
    kwargs = {kw: o[name] for name, kw in m.trainer_kwargs.items()}
    kwargs["entropy_coef"] = o["entropy_coef"]
    if m.pair_loss:
        fields["beta"] = 0.0  # the pair losses hold their own coefficient
        kwargs.update(kind=m.pair_loss, coef=float(beta))
    p = Plan(trainer=m.trainer_class, config=m.config_class, beta=beta, fields=fields,
             kwargs=kwargs)
    p.hparams = {k: v for k, v in fields.items() if k not in ("log_completions", "beta")}
    p.hparams.update(kwargs)
    if m.mixture:
        p.alpha = p.hparams["alpha"] = o["alpha"]
    if off:
        p.off_policy = off
        p.hparams.update({k.replace("off_", "off_policy_"): v for k, v in off.items()})
        p.hparams["off_policy"] = o["off_policy"]
    return p


def reward_fn(scorer, records: list[dict], separator: str | None = None):
    """The combined scorer as a TRL reward function over the dataset's `row` column:
    each completion is scored against its prompt record (prompt, meta, id); a step
    prompt's completion as the text so far (policy/steps.py `scorer_view`)."""
    from .online_trainers import as_completion
    from .steps import scorer_view
    fn = scorer.reward_fn()

    def reward(prompts, completions, row, **_):
        recs = [records[i] for i in row]
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        views = [scorer_view(r, t, separator) for r, t in zip(recs, texts)]
        return fn([r["prompt"] for r in recs],
                  [as_completion(t, r["prompt"]) for (t, _m), r in zip(views, recs)],
                  meta=[m for _t, m in views], id=[r["id"] for r in recs])

    reward.__name__ = fn.__name__
    return reward


def check_rules(data: Data, scorer) -> None:
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


def prompt_rows(data: Data, tok, max_new_tokens: int, max_length: int,
                separator: str | None = None) -> tuple[list[dict], int]:
    """Dataset rows {prompt: the chat-templated text, row: record index}; prompts with
    no room for max_new_tokens under --max-length are dropped (with a warning). A step
    prompt (`meta.steps_prefix`, policy/steps.py) gets its prefix steps + `separator`."""
    from ..generation import encode_prompt, render_prompt
    from .steps import prompt_suffix
    rows, dropped = [], 0
    for i, rec in enumerate(data.records):
        text = render_prompt(tok, rec["prompt"]) + prompt_suffix(data, i, separator)[0]
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


@quiet
def train_online(run: PolicyRun, trainer_kwargs: dict | None = None) -> Path:
    """grpo, gtpo, earl, rloo, p3o, online-ipo, ipo-md (see the module docstring).
    `trainer_kwargs`: more keyword arguments for the method's trainer class (a method
    built on this loop passes what only its trainer takes, e.g. urpo's eval records)."""
    from ..models import load_tokenizer
    from ..scorers.options import ScorerOptions
    opts, data = run.opts, run.data
    started = time.time()
    p = plan(run)
    p.kwargs.update(trainer_kwargs or {})
    check_engine(run)
    if p.off_policy:  # a malformed file fails before any model loads (exit 3)
        p.off_policy["off_policy"] = load_off_policy(run.options["off_policy"], data.records)
    config_cls = import_attr(p.config)
    config_overrides(config_cls, run)
    specs = reward_specs(run.rewards)
    scoring = run.scoring if run.scoring is not None else ScorerOptions()
    from . import mpo, reward_blend
    mpo.check(run.options, specs, scoring.rubric)
    reward_blend.check(run.method, run.options, run.reward_weights, specs, run.scoring)
    # the scorer models keep their own dtype ("auto"), as `alignkit score` without --dtype
    scorer = scoring.build(specs, reward_blend.static_weights(run.reward_weights), dtype="auto",
                           allow_pickle=run.allow_pickle,
                           trust_remote_code=run.trust_remote_code)
    check_rules(data, scorer)
    tok = load_tokenizer(run.model, run.trust_remote_code)
    rows, dropped = prompt_rows(data, tok, p.fields["max_completion_length"], opts.max_length,
                                separator=scoring.step_separator)
    for key in ("min_p", "repetition_penalty", "use_vllm"):
        if key in run.config:
            raise UsageError(f"--opt {key}: online methods sample with alignkit's sampler "
                             "(--engine hf|vllm), which has no such setting")
    engine = None
    if run.options["engine"] == "vllm":  # before the policy loads: vLLM seeds the global RNGs
        from ..vllm_engine import VllmEngine
        engine = VllmEngine(str(run.model), tok, dtype=opts.dtype, seed=opts.seed,
                            trust_remote_code=run.trust_remote_code)
    try:  # closed however training ends (done, failed, interrupted)
        return _train(run, p, config_cls, scorer, scoring, specs, tok, (rows, dropped),
                      engine, started)
    finally:
        if engine is not None:
            engine.close()


def _close_at_train_end(engine):
    """A callback closing the engine when training ends, before `finish` writes the folder
    and tears the process group down (vLLM's own groups live in it; closed after that,
    the engine leaves vLLM's state half torn down and the next engine in the process
    fails to start). `train_online` closes it again (a no-op) on every way out."""
    from transformers import TrainerCallback

    class CloseEngine(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            engine.close()

    return CloseEngine()


def _train(run: PolicyRun, p: Plan, config_cls, scorer, scoring, specs: list[str], tok,
           prompt_rows: tuple[list[dict], int], engine, started: float) -> Path:
    """train_online after the checks: load the models, build the trainer, train, write."""
    from datasets import Dataset

    from ..models import model_sha256
    from ..training import lora_config, prepare_run
    from . import online_trainers
    from .steps import stop_map as step_stops
    m, opts, data = run.method, run.opts, run.data
    rows, dropped = prompt_rows
    sample_every, sync_every = run.options["sample_every"], run.options["sync_every"]
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    ref_spec = run.ref_model or run.model
    ref = None
    if opts.lora_r <= 0 or run.ref_model or m.mixture:  # the mixture sampler needs its own
        ref, _ = load_reference(ref_spec, run)
        if hasattr(ref, "merge_and_unload"):
            ref = ref.merge_and_unload()
    try:
        cfg = config(config_cls, run, work, **p.fields)
    except ValueError as e:  # TRL's own checks of the batch geometry
        raise UsageError(str(e)) from None
    ctx = online_trainers.OnlineContext(
        records=data.records, tokenizer=tok, work=work, seed=opts.seed, sample_every=sample_every,
        alpha=p.alpha, resumed=opts.resume, engine=engine, sync_every=sync_every,
        step_stops=step_stops(data, rows, scoring.step_separator),  # policy/steps.py
        **p.off_policy,
        gen={"model": str(run.out), "base": str(run.model), "method": m.name,
             "temperature": cfg.temperature, "top_p": cfg.top_p,
             "max_new_tokens": cfg.max_completion_length, "seed": opts.seed,
             **({"engine": "vllm", "sync_every": sync_every} if engine is not None else {})})
    from . import reward_blend  # --reward-weights learn:PRIMARY: the BARFI subclass
    trainer = reward_blend.trainer_class(import_attr(p.trainer), run.reward_weights)(
        model=model, reward_funcs=[reward_fn(scorer, data.records, scoring.step_separator)], args=cfg,
        train_dataset=Dataset.from_list(rows), processing_class=tok,
        peft_config=lora_config(opts), ctx=ctx, ref_model=ref, **p.kwargs)
    del ref
    from . import mpo
    mpo.attach(trainer, run.options, scorer, work, opts.seed)  # --meta-judge: MPO
    reward_blend.attach(trainer, scorer, specs, run.reward_weights, run.options)
    if engine is not None:
        trainer.add_callback(_close_at_train_end(engine))
    reference = {"spec": str(ref_spec), "sha256": model_sha256(ref_spec),
                 "kind": "folder" if run.ref_model else
                 ("base (adapter disabled)" if trainer.ref_model is None else "base")}
    hp = hparams(run, p.beta, rewards=specs, reward_weights=run.reward_weights,
                 hybrid=bool(scoring.hybrid), calibrate=scoring.calibrate,
                 transform=scoring.transform, sample_every=sample_every, engine=run.options["engine"],
                 **({"sync_every": sync_every} if engine is not None else {}),
                 aggregate=scoring.aggregate or "min (the maxmin default)", **p.hparams)
    counts = {"records": len(data.records), "prompts": len(rows), "dropped": dropped}
    return finish(trainer, run, work, tok, started, hp, reference, counts)
