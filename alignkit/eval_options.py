"""The options of `alignkit eval` (light: the command reads its defaults from here)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .engines import EngineOptions
from .scorers.options import ScorerOptions

KL_FORWARD_ROWS = 4  # sequences per teacher-forced KL forward (full-vocabulary fp32 logits)


@dataclass
class EvalOptions:
    scorers: list[str] = field(default_factory=lambda: ["rules"])
    weights: list[float] | None = None
    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_new_tokens: int = 128
    batch_size: int = 64          # prompts the sampler holds at once (its slots)
    seed: int = 0
    dtype: str = "auto"
    system: str | None = None
    n_boot: int = 1000
    kl: bool = True
    topk: bool = True
    kl_samples: int = 1          # temperature-1 samples per prompt for the KL estimate
    value_guides: list = field(default_factory=list)  # --value-guide [{"dir", "beta"}]: --model only
    scoring: ScorerOptions = field(default_factory=ScorerOptions)
    engines: EngineOptions = field(default_factory=EngineOptions)  # samples; KL stays hf
