"""`--engine ray-vllm --replicas N`: vLLM engine replicas on a Ray cluster.

For many GPUs or nodes, sampling fans out to N long-lived Ray actors, each holding one
`alignkit.vllm_engine.VllmEngine` over the same model folder. A batch of prompts is cut
into N contiguous parts, one per replica, and the parts come back in order, so the
records are the single-engine records: every sample has its own seed
(`row_seed(seed, prompt key, j)`), which makes a prompt's samples independent of the
replica and of its batch-mates (up to float round-off of other batch shapes). Re-scoring
of non-canonical samples goes through the replicas the same way. Chunking, the output
order, `--resume-from` and `--shard` are gen-pairs' own and unchanged.

Why Ray actors and not `ray.data.llm`: Ray Data's LLM processor builds its engines per
dataset execution and returns text and token ids, while alignkit needs (a) the raw
temperature-1 log-probabilities and teacher-forced re-scoring through the same engine,
and (b) engines that outlive one chunk, so a cluster pays vLLM's start-up once per run
and gen-pairs still writes, and can resume, chunk by chunk. Each replica is the engine
vLLM's docs recommend (one `LLM` per replica, data parallel by Ray).

The cluster: `RAY_ADDRESS` if set, else the cluster `ray start --head` started on this
machine, else a local one started for this run (and stopped after it). alignkit (and
vLLM) must be importable on every node (same virtualenv). Resources per replica: one GPU
when the cluster has at least N GPUs (times `tensor_parallel_size` from
`ALIGNKIT_VLLM_ARGS`), else an equal share of the cluster's CPUs, and on a CPU-only
cluster each replica's vLLM threads are bound to its own cores of this machine
(`VLLM_CPU_OMP_THREADS_BIND`; set it yourself for other layouts). The driver's `VLLM_*`
and `ALIGNKIT_*` environment variables reach the replicas.

Ray is imported inside functions only.
"""
from __future__ import annotations

import json
import os

from . import console
from .errors import AlignkitError, UsageError

RAY_HINT = ("--engine ray-vllm needs Ray, which is not installed: pip install ray "
            "(on a CPU: `make venv-vllm` installs it, see the README's Engines section)")


def ray_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("ray") is not None


class Replica:
    """One engine replica (runs inside a Ray actor): a VllmEngine and its tokenizer."""

    def __init__(self, folder: str, dtype: str, seed: int, trust_remote_code: bool,
                 verbosity: int, bind: str | None):
        console.VERBOSITY = verbosity
        if bind:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = bind
        from .models import load_tokenizer
        from .vllm_engine import VllmEngine
        self.engine, self.error = None, None
        try:
            self.engine = VllmEngine(folder, load_tokenizer(folder, trust_remote_code),
                                     dtype=dtype, seed=seed, trust_remote_code=trust_remote_code)
        except AlignkitError as e:  # raised again by `ready`, where the driver sees its type
            self.error = e

    def ready(self) -> bool:
        if self.error is not None:
            raise self.error
        return True

    def sample(self, prompts, params, system, raw, keys, token_logps):
        return self.engine.sample(prompts, params, system=system, raw=raw, keys=keys,
                                  token_logps=token_logps)

    def completion_logps(self, rendered, completions, add_eos, per_token):
        return self.engine.completion_logps(rendered, completions, add_eos=add_eos,
                                            per_token=per_token)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()


def _parts(n_items: int, n_parts: int) -> list[tuple[int, int]]:
    """Contiguous [start, end) ranges, sizes differing by at most one, empty ones dropped."""
    base, extra = divmod(n_items, n_parts)
    out, start = [], 0
    for k in range(n_parts):
        end = start + base + (1 if k < extra else 0)
        if end > start:
            out.append((start, end))
        start = end
    return out


def _forwarded_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith(("VLLM_", "ALIGNKIT_"))}


class RayVllmEngine:
    """N `VllmEngine` replicas as Ray actors, with VllmEngine's `sample` /
    `completion_logps` / `close`."""

    def __init__(self, model_spec: str, tokenizer, *, replicas: int, dtype: str = "auto",
                 seed: int = 0, trust_remote_code: bool = False):
        if not ray_available():
            raise UsageError(RAY_HINT)
        from .vllm_engine import full_model_folder
        folder = full_model_folder(model_spec, "ray-vllm")
        import ray
        self.tok, self.n = tokenizer, int(replicas)
        self._started = not ray.is_initialized()
        address = os.environ.get("RAY_ADDRESS") or None
        try:
            if self._started:
                ray.init(address=address, log_to_driver=console.VERBOSITY >= 2,
                         include_dashboard=False, configure_logging=True,
                         logging_level="INFO" if console.VERBOSITY >= 2 else "ERROR",
                         runtime_env={"env_vars": _forwarded_env()})
        except Exception as e:  # an unreachable RAY_ADDRESS, a dead cluster
            raise AlignkitError(f"cannot reach the Ray cluster ({address or 'local'}): {e}") from None
        try:
            self._start(folder, dtype, int(seed), trust_remote_code)
        except BaseException:
            self.close()  # no replica, and no Ray connection, outlives a failed start
            raise

    def _start(self, folder, dtype: str, seed: int, trust_remote_code: bool) -> None:
        import ray
        from .vllm_engine import cpu_list, extra_args, kv_cache_space, usable_cpus
        res = ray.cluster_resources()
        extra = extra_args()
        tp = int(extra.get("tensor_parallel_size", 1))
        gpus, cpus = float(res.get("GPU", 0)), float(res.get("CPU", 0))
        binds: list[str | None] = [None] * self.n
        if gpus >= self.n * tp:
            shape = {"num_gpus": tp, "num_cpus": 1}
        elif gpus > 0:
            raise UsageError(f"--replicas {self.n} needs {self.n * tp} GPUs; the Ray cluster "
                             f"has {gpus:g}")
        else:
            if cpus < self.n:
                raise UsageError(f"--replicas {self.n} needs at least {self.n} CPUs; the Ray "
                                 f"cluster has {cpus:g}")
            shape = {"num_cpus": int(cpus // self.n)}
            mine = sorted(usable_cpus())
            per = max(1, len(mine) // self.n)
            binds = [cpu_list(mine[(k * per) % len(mine):(k * per) % len(mine) + per])
                     for k in range(self.n)]
            if "VLLM_CPU_OMP_THREADS_BIND" in os.environ:
                binds = [None] * self.n  # the user's binding wins
            space = kv_cache_space(extra, self.n)  # the replicas share this machine's memory
            if space is not None:
                shape["runtime_env"] = {"env_vars": {
                    **_forwarded_env(),
                    "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", space)}}
        console.debug(f"ray-vllm: {self.n} replicas, {json.dumps(shape)}, binds {binds}")
        actor = ray.remote(Replica)
        self.replicas = [actor.options(**shape).remote(
            str(folder), dtype, seed, trust_remote_code, console.VERBOSITY, binds[k])
            for k in range(self.n)]
        self._get([r.ready.remote() for r in self.replicas])

    # --- the work, split over the replicas ----------------------------------------------

    def _get(self, futures: list):
        import ray
        try:
            return ray.get(futures)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, AlignkitError):
                raise cause from None
            raise AlignkitError(f"ray-vllm replica failed: {cause or e}") from None
        except ray.exceptions.RayActorError as e:
            raise AlignkitError(f"ray-vllm replica died: {e}") from None

    def sample(self, prompts: list, params, *, system: str | None = None, raw: bool = False,
               keys: list[str] | None = None, token_logps: bool = False) -> list[list[dict]]:
        """`VllmEngine.sample` over the replicas: the same records, in prompt order."""
        keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise ValueError("keys must have one entry per prompt")
        parts = _parts(len(prompts), self.n)
        futures = [r.sample.remote(prompts[a:b], params, system, raw, keys[a:b], token_logps)
                   for r, (a, b) in zip(self.replicas, parts)]
        return [group for part in self._get(futures) for group in part]

    def completion_logps(self, rendered_prompts: list[str], completions: list, *,
                         add_eos: bool | list[bool] = True, per_token: bool = False):
        """`VllmEngine.completion_logps` over the replicas."""
        if len(rendered_prompts) != len(completions):
            raise ValueError("rendered_prompts and completions must have the same length")
        flags = add_eos if isinstance(add_eos, list) else [add_eos] * len(completions)
        parts = _parts(len(completions), self.n)
        futures = [r.completion_logps.remote(rendered_prompts[a:b], completions[a:b],
                                             flags[a:b], per_token)
                   for r, (a, b) in zip(self.replicas, parts)]
        return [x for part in self._get(futures) for x in part]

    def close(self) -> None:
        """Stop the replicas (and the local Ray instance this engine started)."""
        import ray
        replicas = self.__dict__.pop("replicas", [])
        if replicas:
            try:
                ray.get([r.close.remote() for r in replicas], timeout=60)
            except Exception as e:  # best effort: a replica may be dead already
                console.debug(f"ray-vllm close: {e}")
            for r in replicas:
                ray.kill(r)
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False

    def __enter__(self) -> "RayVllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
