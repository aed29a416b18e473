"""alignkit: composable alignment steps for language models.

The library is importable on its own; the CLI in `alignkit.cli` is a thin layer over it.
Importing this package imports nothing heavy: the names below are loaded on first use.

    import alignkit
    rows = alignkit.load_records("samples.jsonl", "samples")
    scorer = alignkit.build_scorer(["rules"])
    scorer.score_records(rows)
    alignkit.registries()["policy method"].names()
"""
from __future__ import annotations

from importlib import import_module

__version__ = "0.1.0"

# public name -> "module:attribute" (imported on first access)
_LAZY = {
    "read_records": "alignkit.io:read_records",
    "load_records": "alignkit.io:load_records",
    "RecordWriter": "alignkit.io:RecordWriter",
    "validate": "alignkit.records:validate",
    "detect_kind": "alignkit.records:detect_kind",
    "run_checks": "alignkit.checks:run_checks",
    "build_scorer": "alignkit.scorers:build_scorer",
    "ScorerOptions": "alignkit.scorers.options:ScorerOptions",
    "load_causal_lm": "alignkit.models:load_causal_lm",
    "load_reward_model": "alignkit.reward_models:load_reward_model",
    "completion_text": "alignkit.text:completion_text",
    "render_prompt": "alignkit.text:render_prompt",
    "TrainOptions": "alignkit.training:TrainOptions",
    "merge": "alignkit.soup:merge",
    "build_merge": "alignkit.soup:build_config",
    "evaluate": "alignkit.evaluation:evaluate",
    "AlignkitError": "alignkit.errors:AlignkitError",
    "UsageError": "alignkit.errors:UsageError",
    "DataError": "alignkit.errors:DataError",
}

# registry kind -> "module:attribute" of its Registry
REGISTRIES = {
    "scorer": "alignkit.scorers:SCORERS",
    "relabel strategy": "alignkit.relabel:STRATEGIES",
    "policy method": "alignkit.policy:POLICY",
    "reward-model method": "alignkit.reward_models:RM_METHODS",
    "distill method": "alignkit.distill:DISTILL",
    "merge method": "alignkit.soup.methods:METHODS",
    "check type": "alignkit.checks:CHECK_TYPES",
}

__all__ = ["__version__", "registries", *_LAZY]


def _resolve(target: str):
    module, _, attr = target.partition(":")
    return getattr(import_module(module), attr)


def registries() -> dict:
    """Every plug-in registry by kind (`Registry` objects; see `alignkit.registry`)."""
    return {kind: _resolve(t) for kind, t in REGISTRIES.items()}


def __getattr__(name: str):
    if name in _LAZY:
        value = _resolve(_LAZY[name])
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignkit' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
