"""The scorer options: one group of flags for every command that builds scorers
(`score`, `eval`, `relabel`, `train-policy --reward`), declared once here.

The scorer specs themselves (`--scorer` / `--reward`) and their weights (`--weights` /
`--reward-weights`) are named by each command; everything else about how the scorers
run is this dataclass, so an option such as `--aggregate` or `--rubric` reaches the
scorers the same way from all four commands.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Optional, Sequence

from ..registry import opt


@dataclass
class ScorerOptions:
    """How the scorers run (one flag per field)."""

    hybrid: bool = opt(False, "Records with meta.checks are scored by rules only; the "
                       "others by the other scorers.")
    calibrate: Optional[str] = opt(None, "InfAlign: replace each score by its quantile "
                                   "among these reference samples' scores for the same "
                                   "prompt.", metavar="REF_SAMPLES")
    transform: Optional[str] = opt(None, "After --calibrate: exp:T -> exp(T*u), neg-exp:T -> "
                                   "-exp(-T*u).", metavar="exp:T|neg-exp:T")
    rubric: Optional[str] = opt(None, "Judge rubric file for records without meta.rubric "
                                "(JSON list, or one item per line, 'hard: ...' for hard "
                                "rules).", metavar="FILE")
    tokenizer: Optional[str] = opt(None, "Model whose tokenizer counts tokens for the "
                                   "length scorer.", metavar="MODEL")
    user: Optional[str] = opt(None, "User id for pluralistic (pal/maxmin) reward models "
                              "when a record has no meta.user.", metavar="ID")
    aggregate: Optional[str] = opt(None, "How a scorer's parts combine. maxmin reward "
                                   "models, the K rewards: min | mean | user (default min, "
                                   "the MaxMin objective). prm (prm:DIR), the step scores: "
                                   "min | prod | last | mean (default min, as Easy-to-Hard).",
                                   choices=("min", "mean", "user", "prod", "last"))
    scorer_batch_size: int = opt(8, "Texts per scorer model forward pass.", low=1)
    scorer_max_length: Optional[int] = opt(None, "Max tokens per scorer model input "
                                           "(default 1024 rm/pairwise, 2048 judge).", low=1)
    scorer_device: Optional[str] = opt(None, "Device of the scorer models: cpu, cuda, "
                                       "cuda:1, ... (default: cuda if available).",
                                       metavar="DEVICE")
    code_timeout: float = opt(5.0, "code scorer: wall-clock seconds for one completion's "
                              "code and all its tests (the process group is killed after).",
                              low=0, low_open=True, metavar="SECONDS")
    code_memory_mb: int = opt(512, "code scorer: address-space limit of the test "
                              "subprocess (RLIMIT_AS), MiB.", low=16, metavar="MB")
    code_workers: int = opt(2, "code scorer: test subprocesses run in parallel.", low=1)
    step_separator: Optional[str] = opt(None, "mc-rollout scorer, relabel step-prompts and "
                                        "train-policy on step prompts (meta.steps_prefix; "
                                        "default there meta.step_separator): splits a "
                                        "completion into steps (escapes \\n \\t decoded; "
                                        "default a blank line, \\n\\n).", metavar="TEXT")
    rollouts: int = opt(8, "mc-rollout scorer: continuations M sampled from each step prefix "
                        "(v(s_k) = mean verifier score of the M).", low=1, metavar="M")
    verifier: str = opt("rules", "mc-rollout scorer: the scorer spec that scores each rollout "
                        "and the completion itself (e.g. rules, code).",
                        metavar="SPEC")
    rollout_temperature: float = opt(1.0, "mc-rollout scorer: sampling temperature of the "
                                     "rollouts.", low=0.0)
    rollout_max_new_tokens: int = opt(256, "mc-rollout scorer: max new tokens of one rollout.",
                                      low=1)
    rollout_seed: int = opt(0, "mc-rollout scorer: seed of the rollouts (per record, step "
                            "prefix and rollout streams).")

    def as_dict(self) -> dict:
        return asdict(self)

    def build(self, specs: Sequence[str], weights: Any = None, *, dtype: str = "auto",
              allow_pickle: bool = False, trust_remote_code: bool = False):
        """The `CombinedScorer` of `specs` with these options."""
        from . import build_scorer
        return build_scorer(list(specs), weights, hybrid=self.hybrid,
                            calibrate=self.calibrate, transform=self.transform,
                            **self.model_options(dtype=dtype, allow_pickle=allow_pickle,
                                                 trust_remote_code=trust_remote_code))

    def model_options(self, **more) -> dict:
        """The per-scorer options dict (`Scorer.options`) these flags give."""
        return dict(rubric=self.rubric, tokenizer=self.tokenizer, user=self.user,
                    aggregate=self.aggregate, batch_size=self.scorer_batch_size,
                    max_length=self.scorer_max_length, device=self.scorer_device,
                    code_timeout=self.code_timeout, code_memory_mb=self.code_memory_mb,
                    code_workers=self.code_workers, step_separator=self.step_separator,
                    rollouts=self.rollouts, verifier=self.verifier,
                    rollout_temperature=self.rollout_temperature,
                    rollout_max_new_tokens=self.rollout_max_new_tokens,
                    rollout_seed=self.rollout_seed, **more)
