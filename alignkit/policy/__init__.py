"""Policy-training methods: one registry, offline and online.

`METHODS` maps a method name to a `Method`: the data kind it trains from, a one-line
summary, the TRL trainer it wraps (empty for alignkit's own losses), its defaults, and
`entry`, the "module:function" that trains it (imported on use, so listing the methods
imports nothing heavy). Every entry function has the signature

    fn(method: Method, model_spec: str, data: Data, out: str, opts: TrainOptions,
       **method_options) -> Path

where `data` is `alignkit.policy.data.Data` (validated records, their line numbers and
the input sha256) and `method_options` holds the common options (`beta`, `ref_model`,
`ref_cache`, `record_ref`, `rewards`, `allow_pickle`, `trust_remote_code`, `config`)
plus the method's own (`Method.options`). `Method.train(...)` calls it.

Data kinds: "pairs", "samples", "ranking", "unpaired", "sft", "prompts" (see
`data.DATA_KINDS`). Adding a method is one entry below plus its function: online methods
(grpo, gtpo, earl, rloo, p3o, online-ipo, ipo-md) go in `alignkit/policy/online.py`
with `data="prompts"`, `online=True`, and receive the repeatable `--reward SCORER`
values as `rewards`.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module

from ..errors import UsageError

# Options every entry function accepts (the command fills them).
COMMON_OPTIONS = ("beta", "ref_model", "ref_cache", "record_ref", "rewards", "allow_pickle",
                  "trust_remote_code", "config")


@dataclass(frozen=True)
class Method:
    name: str
    data: str                 # one of data.DATA_KINDS
    summary: str
    entry: str                # "module:function"
    trl: str = ""             # the TRL trainer wrapped ("" = alignkit's loss in losses.py)
    default_lr: float = 1e-6  # full fine-tuning; x10 with LoRA
    default_beta: float | None = None
    needs_ref: bool = False
    online: bool = False
    options: tuple[str, ...] = ()

    def train(self, model_spec, data, out, opts, **method_options):
        unknown = set(method_options) - set(COMMON_OPTIONS) - set(self.options)
        if unknown:
            raise UsageError(f"--method {self.name} does not take: {', '.join(sorted(unknown))}")
        module, fn = self.entry.split(":")
        return getattr(import_module(module), fn)(self, model_spec, data, out, opts,
                                                  **method_options)


_OFF = "alignkit.policy.offline"
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair",
              "sppo_hard", "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
              "sigmoid_norm")

_ON = "alignkit.policy.online"
_ONLINE = ("reward_weights", "hybrid", "calibrate", "transform", "sample_every",
           "max_new_tokens", "temperature")
_GRPO = ("loss", "scale_rewards", "num_generations", "epsilon", "epsilon_high",
         "importance_sampling", "mask_truncated")

METHODS: dict[str, Method] = {m.name: m for m in [
    Method("sft", "sft", "supervised fine-tuning on prompt+completion (or the chosen side of pairs)",
           f"{_OFF}:train_sft", trl="SFTTrainer", default_lr=2e-5),
    Method("dpo", "pairs", "DPO; --loss takes every TRL DPO loss (comma list, --loss-weights); "
           "--label-smoothing with sigmoid = cDPO", f"{_OFF}:train_pairs", trl="DPOTrainer",
           default_lr=1e-6, default_beta=0.1, needs_ref=True,
           options=("loss", "loss_weights", "label_smoothing")),
    Method("sppo", "pairs", "soft SPPO with p_win (eta = 1/beta); --loss sppo_single for the "
           "single-pair variant", f"{_OFF}:train_pairs", default_lr=5e-7, default_beta=0.001,
           needs_ref=True, options=("loss", "loss_weights")),
    Method("copg", "pairs", "contrastive policy gradient on pairs with score_chosen/score_rejected",
           f"{_OFF}:train_pairs", default_lr=1e-6, default_beta=0.1, needs_ref=True,
           options=("loss", "loss_weights")),
    Method("pro", "ranking", "PRO listwise ranking loss plus the SFT term (--sft-weight)",
           f"{_OFF}:train_groups", default_lr=5e-6, options=("sft_weight",)),
    Method("grao", "samples", "GRAO group alignment on scored samples with a reference answer "
           "(--grao-lambda)", f"{_OFF}:train_groups", default_lr=1e-6, default_beta=0.5,
           options=("grao_lambda",)),
    Method("simpo", "pairs", "SimPO (reference-free, length-normalised; --simpo-gamma)",
           f"{_OFF}:train_simpo", trl="experimental CPOTrainer", default_lr=1e-6,
           default_beta=2.0, options=("simpo_gamma",)),
    Method("orpo", "pairs", "ORPO (odds-ratio preference + SFT, no reference)",
           f"{_OFF}:train_orpo", trl="experimental ORPOTrainer", default_lr=1e-6,
           default_beta=0.1),
    Method("kto", "unpaired", "KTO on unpaired records {prompt, completion, label}",
           f"{_OFF}:train_kto", trl="KTOTrainer", default_lr=1e-6, default_beta=0.1,
           needs_ref=True),
    # online methods (alignkit/policy/online.py): prompts in, --reward scorers
    Method("grpo", "prompts", "GRPO through TRL (--loss, --scale-rewards, --num-generations, --beta "
           "k3 KL, --epsilon[-high], --importance-sampling sequence = GSPO)", f"{_ON}:train_online",
           trl="GRPOTrainer", default_lr=1e-6, default_beta=0.0, online=True,
           options=_ONLINE + _GRPO),
    Method("gtpo", "prompts", "GTPO: conflict-token protection + entropy filter, no reference "
           "in the loss", f"{_ON}:train_online", default_lr=1e-6, online=True,
           options=_ONLINE + ("num_generations", "mask_truncated", "entropy_threshold")),
    Method("earl", "prompts", "EARL: GRPO with the PG term gated to high-entropy tokens "
           "(--entropy-quantile, --entropy-scope)", f"{_ON}:train_online", default_lr=1e-6,
           default_beta=0.04, online=True,
           options=_ONLINE + _GRPO + ("entropy_quantile", "entropy_scope")),
    Method("rloo", "prompts", "RLOO through TRL (leave-one-out baseline, KL in the reward)",
           f"{_ON}:train_online", trl="RLOOTrainer", default_lr=1e-6, default_beta=0.05,
           online=True, options=_ONLINE + ("num_generations", "epsilon", "epsilon_high",
                                           "mask_truncated")),
    Method("p3o", "prompts", "P3O: pairwise PPO on two samples per prompt (--clip pair|token, "
           "--beta = kappa)", f"{_ON}:train_online", default_lr=5e-7, default_beta=0.01,
           needs_ref=True, online=True, options=_ONLINE + ("clip", "epsilon")),
    Method("online-ipo", "prompts", "online IPO: two policy samples per prompt labelled by the "
           "scorer (--beta = tau)", f"{_ON}:train_online", default_lr=1e-6, default_beta=0.1,
           needs_ref=True, online=True, options=_ONLINE),
    Method("ipo-md", "prompts", "IPO-MD: online IPO on samples from the geometric mixture with "
           "the reference (--alpha)", f"{_ON}:train_online", default_lr=1e-6, default_beta=0.1,
           needs_ref=True, online=True, options=_ONLINE + ("alpha",)),
]}


def get(name: str) -> Method:
    if name not in METHODS:
        raise UsageError(f"unknown --method {name!r}; known: {', '.join(METHODS)}")
    return METHODS[name]


def table() -> list[str]:
    """One line per method, for `train-policy --list-methods`."""
    w = max(len(name) for name in METHODS)
    lines = [f"{'method':{w}} {'data':9} {'trainer':26} summary"]
    for m in METHODS.values():
        trainer = m.trl or ("online" if m.online else "alignkit loss (DPOTrainer)")
        lines.append(f"{m.name:{w}} {m.data:9} {trainer:26} {m.summary}")
    return lines
