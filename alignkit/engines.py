"""Sampling engines: where `gen-pairs` and `eval` send their sampling.

| engine     | what samples                                              | needs          |
|------------|-----------------------------------------------------------|----------------|
| `hf`       | alignkit's sampler in this process (`alignkit.generation`)| nothing extra  |
| `vllm`     | one vLLM engine in this process (`alignkit.vllm_engine`)  | `vllm`         |
| `ray-vllm` | `--replicas N` vLLM engines on a Ray cluster              | `vllm`, `ray`  |
|            | (`alignkit.ray_engine`)                                   |                |

The two vLLM engines give the same records: every sample has its own seed, so a prompt's
samples do not depend on which replica drew them or what else was in its batch, and
records say `gen.engine: vllm` for both (the replica count is a deployment detail, kept
in the manifest's options). The group of flags is declared once here, for every command
that samples.
"""
from __future__ import annotations

from dataclasses import dataclass

from .errors import UsageError
from .registry import opt

ENGINES = ("hf", "vllm", "ray-vllm")


@dataclass
class EngineOptions:
    """Which engine samples, and how many replicas it runs (one flag per field)."""

    engine: str = opt("hf", "Who samples: alignkit's own sampler (hf), one vLLM engine in "
                      "this process (vllm), or --replicas vLLM engines on a Ray cluster "
                      "(ray-vllm; RAY_ADDRESS, else a local one). See the README's Engines.",
                      choices=ENGINES)
    replicas: int = opt(1, "ray-vllm: engine replicas (one GPU each where the cluster has "
                        "GPUs, else an equal share of its CPUs).", low=1)

    def check(self) -> "EngineOptions":
        if self.engine not in ENGINES:
            raise UsageError(f"--engine must be one of {' | '.join(ENGINES)}, got {self.engine!r}")
        if self.replicas < 1:
            raise UsageError(f"--replicas must be >= 1, got {self.replicas}")
        if self.replicas > 1 and self.engine != "ray-vllm":
            raise UsageError("--replicas needs --engine ray-vllm")
        if self.engine != "hf":
            from .vllm_engine import INSTALL_HINT, vllm_available
            if not vllm_available():
                raise UsageError(INSTALL_HINT.replace("--engine vllm", f"--engine {self.engine}"))
        if self.engine == "ray-vllm":
            from .ray_engine import RAY_HINT, ray_available
            if not ray_available():
                raise UsageError(RAY_HINT)
        return self

    @property
    def uses_vllm(self) -> bool:
        return self.engine != "hf"

    @property
    def record_name(self) -> str:
        """The engine as records name it (`gen.engine`): the samples' maker."""
        return "hf" if self.engine == "hf" else "vllm"


def open_engine(opts: EngineOptions, model_spec: str, tokenizer, *, dtype: str, seed: int,
                trust_remote_code: bool = False):
    """The engine object for a vLLM engine (`sample`, `completion_logps`, `close`), or None
    for `hf` (the caller samples with `alignkit.generation.sample`)."""
    if opts.engine == "hf":
        return None
    if opts.engine == "vllm":
        from .vllm_engine import VllmEngine
        return VllmEngine(model_spec, tokenizer, dtype=dtype, seed=seed,
                          trust_remote_code=trust_remote_code)
    from .ray_engine import RayVllmEngine
    return RayVllmEngine(model_spec, tokenizer, replicas=opts.replicas, dtype=dtype, seed=seed,
                         trust_remote_code=trust_remote_code)
