"""Merge methods: declared parameters, the registry, the per-tensor formulas and the one
place where a merge request is validated (`build_config`). Light at import (no torch):
the command builds its --help from this registry."""
from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UsageError
from ..registry import Entry, Param, Registry

# --- parameters and the registry ---------------------------------------------------------


T = Param("t", float, 0.5, "slerp position: 0 gives the first model (or --base), 1 the second.",
          low=0.0, high=1.0)
LAMBDA = Param("lambda", float, 1.0, "Scale of the merged task vector: base + lambda * merged.")
DENSITY = Param("density", float, 0.5, "Share of each task vector kept (ties: the largest "
                "|entries|; dare: a random Bernoulli(density) mask).", low=0.0, high=1.0, low_open=True)
SIGN = Param("sign", str, "sum", "TIES sign election: sum (of the weighted task vectors) | "
             "count (of their signs).", choices=("sum", "count"))
NORMALIZE = Param("normalize", bool, True, negatable=True, help="Divide by the sum of the weights (ties: of the "
                  "weights that agree with the elected sign).")
RESCALE = Param("rescale", str, "density", "DARE rescale of the kept entries: density (x 1/density, "
                "the paper) | l1 (match the task vector's L1 norm, as mergekit) | none.",
                choices=("density", "l1", "none"))


# A merge method is a registry entry whose implementation is its per-tensor function
# `fn(job) -> tensor`; `info` carries `base` ('reference': optional, only the source of
# config and tokenizer; 'v0': slerp's first endpoint; 'required': task vectors),
# `weighted`, `seeded` (uses --seed, recorded only then), `min_models`, `max_models`.
METHODS = Registry("merge method", "--method")
Method = Entry  # a registered merge method

_INFO = dict(base="reference", weighted=True, seeded=False, min_models=1, max_models=None,
             zero_weight_sum_ok=True)


def register(name: str, summary: str, *, params: tuple[Param, ...] = (), **info) -> Callable:
    """Decorator: add a per-tensor merge function to METHODS."""
    unknown = set(info) - set(_INFO)
    if unknown:
        raise TypeError(f"unknown merge-method info: {', '.join(sorted(unknown))}")
    return METHODS.register(name, summary, params=params, reads="models", writes="model",
                            **{**_INFO, **info})


def all_params() -> dict[str, Param]:
    """Every declared parameter by name (one declaration per name across methods)."""
    return METHODS.params()


def param_help(name: str) -> str:
    return METHODS.param_help(name)


def methods_help() -> str:
    return METHODS.summary_line()


@dataclass
class Job:
    """One output tensor to compute: `load(i)` gives model i's tensor as a fresh float32
    tensor (safe to modify in place), `base()` the base's (None when there is no base)."""

    name: str
    n: int
    load: Callable[[int], Any]
    base: Callable[[], Any] | None
    weights: list[float]
    p: dict[str, Any]
    seed: int


# --- the methods -------------------------------------------------------------------------


def _weighted_sum(job: Job, scale: float = 1.0, minus=None):
    """Σ w_i·scale·(θ_i − minus), accumulated one input at a time."""
    out = None
    for i, w in enumerate(job.weights):
        t = job.load(i)
        if minus is not None:
            t.sub_(minus)
        if out is None:
            out = t.mul_(w * scale)
        else:
            out.add_(t, alpha=w * scale)
    return out


@register("linear", "weighted mean sum(w_i theta_i)/sum(w_i) (the SALSA soup)", params=(NORMALIZE,),
          min_models=2, zero_weight_sum_ok=False)
def _linear(job: Job):
    return _weighted_sum(job, 1.0 / sum(job.weights) if job.p["normalize"] else 1.0)


@register("uniform", "plain mean of the models", weighted=False, min_models=2)
def _uniform(job: Job):
    return _weighted_sum(job, 1.0 / job.n)


@register("slerp", "spherical interpolation of two models (--t)", params=(T,), base="v0",
          weighted=False, min_models=2, max_models=2)
def _slerp(job: Job):
    import torch
    t = job.p["t"]
    v0, v1 = job.load(0), job.load(1)
    n0, n1 = float(v0.norm()), float(v1.norm())
    dot = float((v0 * v1).sum(dtype=torch.float64)) / max(n0 * n1, 1e-12) if n0 and n1 else 0.0
    if abs(dot) > 0.9995:
        return v0.mul_(1.0 - t).add_(v1, alpha=t)
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s = math.sin(omega)
    return v0.mul_(math.sin((1.0 - t) * omega) / s).add_(v1, alpha=math.sin(t * omega) / s)


@register("task-arithmetic", "base + lambda * sum(w_i tau_i)", params=(LAMBDA,), base="required")
def _task_arithmetic(job: Job):
    base = job.base()
    return base.add_(_weighted_sum(job, minus=base), alpha=job.p["lambda"])


def trim_top(tau, density: float):
    """Keep the k = round(density·numel) entries of largest |tau| (in place); among
    magnitudes equal to the k-th largest, the first ones by position. The threshold comes from
    numpy's introselect (several times faster than torch.topk/kthvalue on CPU)."""
    import numpy as np
    import torch
    n = tau.numel()
    k = int(density * n + 0.5)
    if k >= n:
        return tau
    if k == 0:
        return tau.zero_()
    mag = tau.abs().reshape(-1)
    thr = float(np.partition(mag.numpy(), n - k)[n - k])
    keep = mag >= thr
    excess = int(torch.count_nonzero(keep)) - k
    if excess > 0:  # magnitudes tied with the threshold: drop the last ones by position
        keep[(mag == thr).nonzero().reshape(-1)[-excess:]] = False
    return tau.mul_(keep.view(tau.shape))


def ties_combine(taus: list, weights: list[float], sign: str, normalize: bool):
    """TIES sign election and disjoint merge of (already sparsified) task vectors."""
    import torch
    wt = [t.mul_(w) for t, w in zip(taus, weights)]
    votes = torch.zeros_like(wt[0])
    for t in wt:
        votes.add_(t if sign == "sum" else torch.sign(t))
    gamma = torch.where(votes >= 0, 1.0, -1.0)
    del votes
    merged, div = torch.zeros_like(gamma), torch.zeros_like(gamma)
    for t, w in zip(wt, weights):
        agree = torch.sign(t) == gamma
        merged.add_(t.mul_(agree))
        div.add_(agree, alpha=w)
    if normalize:
        div[div == 0] = 1.0
        merged.div_(div)
    return merged


@register("ties", "TIES: trim to --density, elect signs (--sign), merge agreeing entries",
          params=(DENSITY, SIGN, LAMBDA, NORMALIZE), base="required")
def _ties(job: Job):
    base = job.base()
    taus = [trim_top(job.load(i).sub_(base), job.p["density"]) for i in range(job.n)]
    return base.add_(ties_combine(taus, job.weights, job.p["sign"], job.p["normalize"]),
                     alpha=job.p["lambda"])


def _derived_seed(seed: int, name: str, index: int) -> int:
    h = hashlib.sha256(f"{seed}\0{name}\0{index}".encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def dare_mask(seed: int, name: str, index: int, shape, density: float):
    """The DARE keep-mask of model `index` for tensor `name`: Bernoulli(density) entries
    from a generator seeded by (seed, name, index)."""
    import torch
    g = torch.Generator().manual_seed(_derived_seed(seed, name, index))
    return torch.rand(tuple(shape), generator=g) < density


def dare_drop(tau, mask, density: float, rescale: str):
    """Apply a DARE mask to a task vector (in place) and rescale the survivors."""
    import torch
    l1 = float(tau.abs().sum(dtype=torch.float64)) if rescale == "l1" else 0.0
    tau.mul_(mask)
    if rescale == "density":
        tau.div_(density)
    elif rescale == "l1":
        kept = float(tau.abs().sum(dtype=torch.float64))
        if l1 > 1e-12 and kept > 1e-12:
            tau.mul_(l1 / kept)
    return tau


def _dare_taus(job: Job, base) -> list:
    d, r = job.p["density"], job.p["rescale"]
    out = []
    for i in range(job.n):
        tau = job.load(i).sub_(base)
        out.append(dare_drop(tau, dare_mask(job.seed, job.name, i, tau.shape, d), d, r))
    return out


@register("dare-linear", "DARE drop/rescale (--density, --seed), then task arithmetic",
          params=(DENSITY, RESCALE, LAMBDA), base="required", seeded=True)
def _dare_linear(job: Job):
    base = job.base()
    for w, tau in zip(job.weights, _dare_taus(job, base)):
        base.add_(tau, alpha=w * job.p["lambda"])
    return base


@register("dare-ties", "DARE drop/rescale (--density, --seed), then TIES sign election",
          params=(DENSITY, RESCALE, SIGN, LAMBDA, NORMALIZE), base="required", seeded=True)
def _dare_ties(job: Job):
    base = job.base()
    merged = ties_combine(_dare_taus(job, base), job.weights, job.p["sign"], job.p["normalize"])
    return base.add_(merged, alpha=job.p["lambda"])


# --- configuration: validated in one place -----------------------------------------------


@dataclass
class MergeConfig:
    method: Method
    models: list[str]          # the merged models, in order (slerp: [v0, v1])
    base: str | None           # task-vector base ('required' methods) or reference
    weights: list[float]
    params: dict[str, Any]
    seed: int
    dtype: str = "auto"
    max_shard_bytes: int = 2 * 10**9

    def describe(self) -> dict:
        return {"method": self.method.name, "models": self.models, "base": self.base,
                "weights": self.weights, "params": self.params,
                "seed": self.seed if self.method.seeded else None,
                "dtype": self.dtype, "max_shard_bytes": self.max_shard_bytes}


def parse_weights(text: str | None) -> list[float] | None:
    """'0.3,0.7' (commas or spaces) -> [0.3, 0.7]."""
    if text is None or (isinstance(text, str) and not text.strip()):
        return None
    parts = text if isinstance(text, (list, tuple)) else re.split(r"[,\s\[\]]+", str(text).strip())
    try:
        return [float(x) for x in parts if str(x) != ""]
    except ValueError:
        raise UsageError(f"--weights must be numbers separated by commas, got {text!r}") from None


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*", re.I)


def parse_size(text: str | int) -> int:
    """'2GB' / '500MiB' / '1000000' -> bytes (KB, MB, GB are powers of 1000; KiB... of 1024)."""
    if isinstance(text, int):
        size = text
    else:
        m = _SIZE.fullmatch(str(text))
        if not m:
            raise UsageError(f"--max-shard-size must look like 2GB or 500MiB, got {text!r}")
        unit = (m.group(2) or "").lower().rstrip("b")
        base = 1024 if unit.endswith("i") else 1000
        power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[unit.rstrip("i")]
        size = int(float(m.group(1)) * base ** power)
    if size <= 0:
        raise UsageError(f"--max-shard-size must be positive, got {text!r}")
    return size


_DTYPES = {"auto": "auto", "float32": "float32", "fp32": "float32", "bfloat16": "bfloat16",
           "bf16": "bfloat16", "float16": "float16", "fp16": "float16"}


def build_config(method: str, models: list[str], *, base: str | None = None,
                 weights: list[float] | None = None, params: dict[str, Any] | None = None,
                 seed: int = 0, dtype: str = "auto", max_shard_size: str | int = "2GB") -> MergeConfig:
    """Check a merge request against the method's declaration; fill the defaults."""
    m = METHODS.get(method)
    given = {k: v for k, v in (params or {}).items() if v is not None}
    own = {p.name: p for p in m.params}
    for k in given:
        if k not in own:
            takes = ", ".join(f"--{n}" for n in own) or "no parameters"
            raise UsageError(f"--{k} does not apply to --method {method} (it takes {takes})")
    values = {n: (p.coerce(given[n]) if n in given else p.default) for n, p in own.items()}
    models = [str(x) for x in models]
    if m.base == "v0" and base is not None:
        models, base = [str(base)] + models, None
    if m.base == "required" and base is None:
        raise UsageError(f"--method {method} needs --base (the model the task vectors are taken from)")
    n = len(models)
    if n < m.min_models or (m.max_models is not None and n > m.max_models):
        want = (f"exactly {m.min_models}" if m.min_models == m.max_models
                else f"at least {m.min_models}")
        extra = " (counting --base)" if m.base == "v0" else ""
        raise UsageError(f"--method {method} merges {want} models{extra}, got {n}")
    if weights is not None and not m.weighted:
        raise UsageError(f"--weights does not apply to --method {method}")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise UsageError(f"--weights has {len(w)} values for {n} models")
    if not all(math.isfinite(x) for x in w):
        raise UsageError("--weights must be finite numbers")
    if values.get("normalize") and abs(sum(w)) < 1e-12 and not m.zero_weight_sum_ok:
        raise UsageError("--weights sum to 0: cannot normalise (use --no-normalize)")
    if dtype not in _DTYPES:
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return MergeConfig(m, models, None if base is None else str(base), w, values, int(seed),
                       _DTYPES[dtype], parse_size(max_shard_size))
