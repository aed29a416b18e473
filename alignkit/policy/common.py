"""What every policy trainer shares, offline and online: the run (`PolicyRun`), beta,
loading the policy and the reference, the TRL config and its `--opt KEY=VALUE`
overrides, the hyperparameters and the output folder (`finish`).

Nothing heavy is imported at module level (the registering modules import this one).
"""
from __future__ import annotations

import dataclasses
import gc
import warnings
from dataclasses import dataclass, field
from importlib import import_module
from pathlib import Path
from typing import Any

from .. import console
from ..errors import UsageError
from ..registry import Entry
from ..training import (TrainOptions, end_process_group, final_metrics, full_state_dict,
                        run_trainer, save_output, trainer_kwargs)
from .data import Data

__all__ = ["PolicyRun", "quiet", "import_attr", "method_beta", "check_offline",
           "resolve_dtypes", "load_policy", "load_reference", "config", "config_overrides",
           "tokenized", "hparams", "finish"]


@dataclass
class PolicyRun:
    """One `train-policy` run: the method, its inputs and every option."""

    method: Entry
    model: str                      # the base model spec
    data: Data
    out: str
    opts: TrainOptions
    options: dict = field(default_factory=dict)   # the method's own (`Entry.options`)
    beta: float | None = None       # --beta as given (None: the method's default)
    ref_model: str | None = None
    ref_cache: bool = True
    record_ref: bool = True
    rewards: list[str] = field(default_factory=list)       # --reward (online)
    reward_weights: str | None = None
    scoring: Any = None             # scorers.options.ScorerOptions (online; None: defaults)
    allow_pickle: bool = False
    trust_remote_code: bool = False
    config: dict = field(default_factory=dict)    # --opt KEY=VALUE


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


def import_attr(path: str) -> Any:
    """The object named by "module:attribute" (TRL's config and trainer classes)."""
    module, _, attr = path.partition(":")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" and deprecation notices
        return getattr(import_module(module), attr)


# --- checks ---------------------------------------------------------------------------------

def method_beta(run: PolicyRun) -> float | None:
    """The method's beta: --beta, else its default. A method without one (`no_beta`)
    refuses --beta and gets its default_beta (None, or 0 for a KL coefficient it lacks)."""
    m = run.method
    if m.no_beta:
        if run.beta is not None:
            raise UsageError(m.no_beta)
        return m.default_beta
    beta = m.default_beta if run.beta is None else float(run.beta)
    if beta is None or beta < 0 or (beta == 0 and not m.zero_beta_ok):
        raise UsageError(f"--beta must be {'>=' if m.zero_beta_ok else '>'} 0 for {m.name}, "
                         f"got {beta}")
    return beta


def _online_flags(run: PolicyRun) -> list[str]:
    """The flags given that only online methods read (--reward and the scorer options)."""
    from ..registry import params_of
    given = [f for f, v in (("--reward", run.rewards), ("--reward-weights", run.reward_weights))
             if v]
    if run.scoring is not None:
        given += [p.flag_name for p in params_of(type(run.scoring))
                  if getattr(run.scoring, p.name) != p.default]
    return given


def check_offline(run: PolicyRun) -> None:
    """An offline method takes no reward flags, and --ref-model only when it has a
    reference."""
    flags = _online_flags(run)
    if flags:
        raise UsageError(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} for online "
                         f"methods; {run.method.name} trains offline from records")
    if not run.method.needs_ref and run.ref_model:
        raise UsageError(f"{run.method.name} uses no reference model (drop --ref-model)")


# --- models -----------------------------------------------------------------------------------

def resolve_dtypes(opts: TrainOptions):
    """(weights dtype name, bf16 autocast?) LoRA keeps the frozen base in the compute
    dtype; full fine-tuning keeps fp32 master weights and autocasts."""
    import torch

    from ..models import torch_dtype
    compute = torch_dtype(opts.dtype)
    if compute == torch.float16 and not torch.cuda.is_available():
        raise UsageError("--dtype float16 needs a GPU; use bfloat16 on CPU")
    if opts.lora_r > 0:
        weights = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(compute, "float32")
    else:
        weights = "float32"
    return weights, compute == torch.bfloat16


def load_policy(run: PolicyRun):
    """(model, tokenizer) of the policy to train."""
    from ..models import load_causal_lm
    weights, _ = resolve_dtypes(run.opts)
    model, tok = load_causal_lm(run.model, weights, allow_pickle=run.allow_pickle,
                                trust_remote_code=run.trust_remote_code,
                                trainable_adapter=run.opts.lora_r <= 0)
    if run.opts.lora_r > 0 and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()  # a new adapter on top of the merged one
    return model, tok


def load_reference(spec: str, run: PolicyRun):
    """(model, tokenizer) of a reference model folder."""
    from ..models import load_causal_lm
    weights, _ = resolve_dtypes(run.opts)
    return load_causal_lm(spec, weights, allow_pickle=run.allow_pickle,
                          trust_remote_code=run.trust_remote_code, merged=True)


# --- the TRL config ---------------------------------------------------------------------------

def config(cls, run: PolicyRun, work: Path, **fields):
    """A TRL config from the shared flags, the method's fields and `--opt KEY=VALUE`."""
    kw = trainer_kwargs(run.opts, work)
    _, bf16 = resolve_dtypes(run.opts)
    kw["bf16"] = bf16
    kw["fp16"] = False
    kw["ddp_find_unused_parameters"] = False
    kw.update(fields)
    kw.update(config_overrides(cls, run))
    return cls(**kw)


def config_overrides(cls, run: PolicyRun) -> dict:
    """`--opt KEY=VALUE` settings, checked against the config class (before any work)."""
    names = {f.name for f in dataclasses.fields(cls)}
    for key in run.config:
        if key not in names:
            raise UsageError(f"--opt {key}: {cls.__name__} has no such setting")
    return dict(run.config)


def tokenized(run: PolicyRun, build):
    """Tokenize the records before any model is loaded: (datasets.Dataset, Built without
    its row list, tokenization fingerprint, counts for the manifest). The tokenizer and the
    row list are dropped here, so they do not add to the training's peak memory."""
    from datasets import Dataset

    from ..models import load_tokenizer
    from .data import Tokenization
    tk = Tokenization(load_tokenizer(run.model, run.trust_remote_code), run.opts.max_length)
    built = build(tk)
    dataset = Dataset.from_list(built.rows)
    counts = {"records": len(run.data.records), "rows": len(built.rows),
              "dropped": built.dropped, "cut": built.cut}
    built.rows = []
    fingerprint = tk.fingerprint()
    del tk
    gc.collect()
    return dataset, built, fingerprint, counts


# --- the output -------------------------------------------------------------------------------

def hparams(run: PolicyRun, beta: float | None, **extra) -> dict:
    """The hyperparameters alignkit.json records: the shared flags, beta, the method's."""
    h = {k: v for k, v in run.opts.as_dict().items() if k not in ("resume", "force", "extra")}
    h.update(beta=beta, **extra)
    if run.config:
        h["trl_config"] = run.config
    return h


def finish(trainer, run: PolicyRun, work: Path, tok, started: float, hparams: dict,
           reference: dict | None, counts: dict) -> Path:
    """Train, then write the folder (main process only) with alignkit.json. Weights
    sharded over the processes (FSDP, ZeRO-3) are gathered first, on every rank."""
    opts, name = run.opts, run.method.name
    run_trainer(trainer, work, opts.resume)
    metrics = final_metrics(trainer)
    acc = trainer.accelerator
    state = full_state_dict(trainer)  # None unless sharded
    acc.wait_for_everyone()
    if acc.is_main_process:
        model = acc.unwrap_model(trainer.model)
        info = {"method": name, "trainer": type(trainer).__name__,
                "hyperparameters": hparams,
                "data": {"path": run.data.path, "sha256": run.data.sha256, "kind": run.data.kind,
                         **counts},
                "base": {"spec": str(run.model), "sha256": sha_or_none(run.model)},
                "reference": reference, "final_metrics": metrics,
                "processes": acc.num_processes}
        save_output(model, tok, run.out, work, force=opts.force, merge_lora=opts.merge_lora,
                    info=info, started=started, seed=opts.seed,
                    inputs={"data": run.data.sha256}, state_dict=state)
        console.info(f"wrote {run.out} ({name}, loss {metrics.get('loss', float('nan')):.4f})")
    acc.wait_for_everyone()
    end_process_group()
    return Path(run.out)


def sha_or_none(spec) -> str | None:
    from ..models import model_sha256
    try:
        return model_sha256(spec)
    except Exception:  # an odd folder must not lose a finished run
        return None
