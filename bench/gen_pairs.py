"""Benchmark: `alignkit gen-pairs` vs what a user would otherwise run, on the demo's workload.

The workload is `make demo`'s sampling step: SmolLM2-135M-Instruct, the first
`--prompts` (320) prompts of examples/data/train.jsonl through the chat template, N = 4
completions each, at most 112 new tokens, temperature 0.9, bfloat16. Sides, each in its
own child process, one after another (so peak RSS and threads are its own):

- `alignkit`: `run_gen_pairs` (the whole gen-pairs command, in-process; the sampling
  phase as the manifest times it);
- `generate`: the loop a transformers user writes, one `model.generate(do_sample=True,
  num_return_sequences=N)` per prompt (on `--generate-prompts` of the prompts: it is
  slow);
- `vllm`: vLLM's offline `LLM.generate` with `SamplingParams(n=N)`, run from the engine
  virtualenv `.venv-vllm` (`make venv-vllm`) when it exists; its start-up (engine and
  compilation) is reported apart from the sampling time.

Metric: generated tokens (EOS included) per second of sampling, model loading excluded.
The result also gives alignkit's share of the CPU's bf16 bound (`--bound-gflops`, the
sustained bf16 matrix-product rate of the machine, x 1e9 / 2 FLOPs per parameter per
token). Results go to bench/results/gen_pairs.json with the CPU model.

    python bench/gen_pairs.py                 # the demo workload (about 15 minutes)
    python bench/gen_pairs.py --quick         # 32 prompts, 48 tokens, under 3 minutes
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "examples" / "data" / "train.jsonl"
RESULT = ROOT / "bench" / "results" / "gen_pairs.json"
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"

DEFAULT = {"model": "smollm2-135m-instruct", "dtype": "bfloat16", "prompts": 320,
           "generate_prompts": 32, "n": 4, "max_new_tokens": 112, "temperature": 0.9,
           "top_p": 1.0, "batch_size": 32, "seed": 0, "threads": 0}
QUICK = {**DEFAULT, "prompts": 32, "generate_prompts": 8, "max_new_tokens": 48}


def _prompts(k: int) -> list[dict]:
    with open(PROMPTS, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(k))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _threads(cfg: dict) -> None:
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def worker_generate(folder: str, cfg: dict) -> dict:
    """One `generate` call per prompt, N return sequences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    _threads(cfg)
    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, cfg["dtype"])).eval()
    eos = {tok.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    prompts = [r["prompt"] for r in _prompts(cfg["generate_prompts"])]
    torch.manual_seed(cfg["seed"])

    def run(prompt_list, max_new):
        tokens = 0
        for p in prompt_list:
            enc = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                          return_tensors="pt", return_dict=True)
            with torch.inference_mode():
                out = model.generate(**enc, do_sample=True, temperature=cfg["temperature"],
                                     top_p=cfg["top_p"], top_k=0, max_new_tokens=max_new,
                                     num_return_sequences=cfg["n"], pad_token_id=tok.pad_token_id)
            for row in out[:, enc["input_ids"].shape[1]:].tolist():
                tokens += next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        return tokens

    run(prompts[:1], 2)  # warm-up
    t0 = time.perf_counter()
    tokens = run(prompts, cfg["max_new_tokens"])
    secs = time.perf_counter() - t0
    return {"prompts": len(prompts), "tokens": tokens, "seconds": round(secs, 3),
            "tokens_per_s": round(tokens / secs, 2), "peak_rss_mb": round(_peak_rss_mb(), 1)}


def worker_alignkit(folder: str, cfg: dict) -> dict:
    """`alignkit gen-pairs` in-process; the sampling phase is timed by the pipeline."""
    from alignkit.gen_pairs import GenPairsOptions, run_gen_pairs
    from alignkit.generation import SampleParams
    from alignkit.models import model_sha256
    _threads(cfg)
    model_sha256(folder)  # hashing the weights is not sampling: do it before timing
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "prompts.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in _prompts(cfg["prompts"])))

        def opts(max_new):
            return GenPairsOptions(model=folder, dtype=cfg["dtype"], params=SampleParams(
                n=cfg["n"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                max_new_tokens=max_new, seed=cfg["seed"], batch_size=cfg["batch_size"]))

        warm = Path(d) / "warm.jsonl"
        warm.write_text(src.read_text().splitlines()[0] + "\n")
        run_gen_pairs(str(warm), str(Path(d) / "w.jsonl"), opts(2))  # warm-up
        out = Path(d) / "out.jsonl"
        run_gen_pairs(str(src), str(out), opts(cfg["max_new_tokens"]))
        man = json.loads(Path(f"{out}.alignkit.json").read_text())
    tokens, tps = man["counts"]["tokens"], man["tokens_per_s"]
    return {"prompts": cfg["prompts"], "tokens": tokens, "seconds": round(tokens / tps, 3),
            "tokens_per_s": tps, "peak_rss_mb": round(_peak_rss_mb(), 1)}


def worker_vllm(folder: str, cfg: dict) -> dict:
    """vLLM's offline API as its documentation shows it (run in the engine venv)."""
    os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")  # stdout: the result
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{(os.cpu_count() or 1) - 1}")
    # the KV cache size vLLM's CPU docs tell a user to set: its default reserves 92% of
    # the memory node and refuses to start when that much is not free (it did on a
    # 2-core AMD EPYC machine whose node 0 has 14 GiB); 4 GiB holds this workload's
    # 128 sequences many times over
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams
    t0 = time.perf_counter()
    llm = LLM(model=folder, dtype=cfg["dtype"], seed=cfg["seed"])
    startup = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(folder)
    # the chat template as text, then its tokens (transformers 5's tokenize=True returns
    # a dict, which vLLM does not take as token ids)
    prompts = [{"prompt_token_ids": tok(tok.apply_chat_template(
        [{"role": "user", "content": r["prompt"]}], add_generation_prompt=True, tokenize=False),
        add_special_tokens=False)["input_ids"]} for r in _prompts(cfg["prompts"])]
    sp = SamplingParams(n=cfg["n"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                        max_tokens=cfg["max_new_tokens"])
    llm.generate(prompts[:1], SamplingParams(max_tokens=2))  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    secs = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    return {"prompts": len(prompts), "tokens": tokens, "seconds": round(secs, 3),
            "tokens_per_s": round(tokens / secs, 2), "startup_s": round(startup, 1),
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


WORKERS = {"alignkit": worker_alignkit, "generate": worker_generate, "vllm": worker_vllm}


def _as_list(x):
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _child(side: str, folder: str, cfg: dict) -> dict | None:
    python = str(VLLM_PYTHON) if side == "vllm" else sys.executable
    cmd = [python, __file__, "--worker", side, folder, json.dumps(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"{side} failed:\n{p.stderr[-3000:]}", file=sys.stderr)
        return {"error": p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "failed"}
    lines = [x for x in p.stdout.splitlines() if x.startswith("{")]  # engines may log there
    return json.loads(lines[-1])


def _n_params(folder: Path) -> int:
    """Parameters stored in the folder's safetensors (a tied head counted once: it is
    the one matrix product per token it stands for)."""
    from math import prod

    from safetensors import safe_open
    n = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as sf:
            n += sum(prod(sf.get_slice(k).get_shape()) for k in sf.keys())
    return n


def _machine() -> dict:
    import torch  # noqa: F401

    from _common import machine
    return {**machine(), "torch_default_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configuration")
    ap.add_argument("--prompts", type=int, default=None, help="prompts for alignkit and vLLM")
    ap.add_argument("--sides", default="alignkit,generate,vllm",
                    help="comma-separated sides to run (vllm needs .venv-vllm)")
    ap.add_argument("--bound-gflops", type=float, default=380.0,
                    help="the machine's sustained bf16 matrix-product GFLOP/s (for the bound)")
    ap.add_argument("--output", default=None,
                    help=f"result JSON path (default {RESULT.relative_to(ROOT)}; with --quick a temp file)")
    ap.add_argument("--note", default="", help="free text stored in config.note")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (0 = torch's default)")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, folder, cfg = args.worker
        print(json.dumps(WORKERS[side](folder, json.loads(cfg))))
        return

    from alignkit.models import model_sha256, pull, resolve
    cfg = dict(QUICK if args.quick else DEFAULT)
    if args.prompts:
        cfg["prompts"] = args.prompts
    if args.threads is not None:
        cfg["threads"] = args.threads
    pull(cfg["model"])
    folder = str(resolve(cfg["model"]))
    model_sha256(folder)
    sides = [s for s in args.sides.split(",") if s]
    if "vllm" in sides and not VLLM_PYTHON.exists():
        print("vllm: .venv-vllm not found (make venv-vllm); skipped", file=sys.stderr)
        sides.remove("vllm")
    load_before = os.getloadavg()
    t_start = time.time()
    results = {}
    for side in sides:
        results[side] = _child(side, folder, cfg)
        print(f"{side:9} {json.dumps(results[side])}", file=sys.stderr)
    n_params = _n_params(Path(folder))
    ours = results.get("alignkit") or {}
    ratios = {f"alignkit_vs_{s}": round(ours["tokens_per_s"] / r["tokens_per_s"], 3)
              for s, r in results.items() if s != "alignkit" and r and "tokens_per_s" in r
              and "tokens_per_s" in ours}
    bound = args.bound_gflops * 1e9 / (2 * n_params) if n_params else None
    result = {
        "name": "gen_pairs",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {**cfg, "quick": args.quick, "sides": sides,
                   "metric": "generated tokens (EOS included) per second of sampling; load excluded",
                   "note": args.note, "wall_s": round(time.time() - t_start, 1),
                   "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "results": results, "ratio": ratios,
        "bf16_bound": {"gflops": args.bound_gflops, "tokens_per_s": round(bound, 1),
                       "alignkit_share": round(ours["tokens_per_s"] / bound, 3)}
        if bound and "tokens_per_s" in ours else None,
    }
    out = Path(args.output or (Path(tempfile.gettempdir()) / "gen_pairs.quick.json" if args.quick else RESULT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)
    print(json.dumps({"ratio": ratios, "bf16_bound": result["bf16_bound"]}))


if __name__ == "__main__":
    main()
