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
    aggregate: Optional[str] = opt(None, "maxmin reward models: how the K rewards combine "
                                   "(default: min, the MaxMin objective).",
                                   choices=("min", "mean", "user"))
    scorer_batch_size: int = opt(8, "Texts per scorer model forward pass.", low=1)
    scorer_max_length: Optional[int] = opt(None, "Max tokens per scorer model input "
                                           "(default 1024 rm/pairwise, 2048 judge).", low=1)
    scorer_device: Optional[str] = opt(None, "Device of the scorer models: cpu, cuda, "
                                       "cuda:1, ... (default: cuda if available).",
                                       metavar="DEVICE")

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
                    max_length=self.scorer_max_length, device=self.scorer_device, **more)
