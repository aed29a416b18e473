"""The vLLM sampling engine (`--engine vllm`): the same records as `generation.sample`
from vLLM's offline `LLM` API. vLLM is an optional extra, imported inside functions."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import AlignkitError, UsageError
from .generation import SampleParams, _finish_row, row_seed, stop_token_ids
from .text import encode_prompt, render_prompt


class _GenCfg:
    """Just enough of a model for `stop_token_ids`: the folder's generation config."""

    def __init__(self, folder: Path):
        path = Path(folder) / "generation_config.json"
        eos = json.loads(path.read_text()).get("eos_token_id") if path.exists() else None
        self.generation_config = type("G", (), {"eos_token_id": eos})()


def vllm_available() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def sample_vllm(model_spec: str, tokenizer, prompts: list, params: SampleParams, *,
                system: str | None = None, raw: bool = False, dtype: str = "auto",
                keys: list[str] | None = None, trust_remote_code: bool = False) -> list[list[dict]]:
    """`sample` through vLLM (the optional extra): same prompt rendering and encoding,
    one request per (prompt, j) with the same per-sample seed, `logp` from vLLM's raw
    (pre-temperature) log-probabilities of the sampled tokens. Full model folders only."""
    if not vllm_available():
        raise UsageError("--engine vllm needs vLLM, which is not installed: "
                         "pip install 'alignkit[vllm]' (or use --engine hf)")
    from vllm import LLM
    from vllm import SamplingParams as VllmParams

    from .models import adapter_base, resolve
    params.check()
    folder = resolve(model_spec)
    if adapter_base(folder):
        raise UsageError(f"{model_spec}: --engine vllm takes a full model folder; merge the "
                         "adapter first (train with --merge-lora) or use --engine hf")
    keys = keys or [str(i) for i in range(len(prompts))]
    vdtype = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}.get(dtype, dtype)
    try:
        llm = LLM(model=str(folder), dtype=vdtype, seed=params.seed,
                  trust_remote_code=trust_remote_code, logprobs_mode="raw_logprobs")
    except TypeError as e:
        if "logprobs_mode" not in str(e):
            raise
        raise AlignkitError("--engine vllm needs vLLM >= 0.10.2 (raw log-probabilities, "
                            "`logprobs_mode`); upgrade vllm or use --engine hf") from None
    stops = stop_token_ids(_GenCfg(folder), tokenizer)
    requests, sampling = [], []
    for i, p in enumerate(prompts):
        ids = encode_prompt(tokenizer, render_prompt(tokenizer, p, system, raw))
        for j in range(params.n):
            requests.append({"prompt_token_ids": ids})
            sampling.append(VllmParams(
                n=1, temperature=params.temperature, top_p=params.top_p,
                top_k=params.top_k if params.top_k > 0 else -1,
                max_tokens=params.max_new_tokens, seed=row_seed(params.seed, keys[i], j) % (2**31),
                logprobs=0, stop_token_ids=sorted(stops), skip_special_tokens=True))
    outputs = llm.generate(requests, sampling)
    flat = []
    for o in outputs:
        c = o.outputs[0]
        ids = list(c.token_ids)
        logp = sum(step[t].logprob for step, t in zip(c.logprobs or [], ids))
        flat.append(_finish_row(tokenizer, {"token_ids": ids, "logp": float(logp),
                                            "finished": c.finish_reason == "stop"}, stops, False))
    return [flat[i * params.n:(i + 1) * params.n] for i in range(len(prompts))]
