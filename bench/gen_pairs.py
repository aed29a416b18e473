"""Benchmark: `alignkit gen-pairs` vs the per-prompt `model.generate` loop a user would write.

Both sides sample the same prompts (examples/data/eval.jsonl, through the chat template)
with the same model, N completions per prompt, temperature, top-p and max new tokens:

- baseline: for each prompt, `model.generate(do_sample=True, num_return_sequences=N)`;
- alignkit: `run_gen_pairs` (the whole gen-pairs command, in-process, writing a temp file).

Metric: generated tokens per second of the sampling phase (model loading excluded on both
sides; EOS counted, padding not), and the peak RSS of each side. Every (model, dtype,
side) runs in its own child process so that peak RSS and thread state are its own; the
children run one after another. Results go to bench/results/gen_pairs.json in the
DESIGN.md bench format: the headline `alignkit`/`baseline`/`ratio` are smollm2 in
float32 (what `--dtype auto` picks on a CPU); `runs` holds every model and dtype, and
`bf16_vs_fp32` the bfloat16/float32 speed ratio of each side.

    python bench/gen_pairs.py            # default configuration (a few minutes on 2 cores)
    python bench/gen_pairs.py --quick    # small configuration, under a minute
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
PROMPTS = ROOT / "examples" / "data" / "eval.jsonl"
RESULT = ROOT / "bench" / "results" / "gen_pairs.json"

DEFAULT = {"models": ["tiny-llama", "smollm2-135m-instruct"], "dtypes": ["float32", "bfloat16"],
           "prompts": 8, "n": 4, "max_new_tokens": 64, "temperature": 0.7, "top_p": 1.0,
           "batch_size": 8, "seed": 0, "threads": 1}
QUICK = {**DEFAULT, "dtypes": ["bfloat16"], "prompts": 4, "max_new_tokens": 16}


def _prompts(k: int) -> list[dict]:
    with open(PROMPTS, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(k))]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _threads(cfg: dict) -> None:
    import torch
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))


def worker_baseline(model_spec: str, dtype: str, cfg: dict) -> dict:
    """What a user would write: one `generate` call per prompt, N return sequences."""
    import torch
    _threads(cfg)

    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(model_spec, dtype)
    eos = {tok.eos_token_id} | set(_as_list(model.generation_config.eos_token_id))
    prompts = [r["prompt"] for r in _prompts(cfg["prompts"])]
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
    return {"tokens": tokens, "seconds": round(secs, 3), "tokens_per_s": round(tokens / secs, 2),
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def worker_alignkit(model_spec: str, dtype: str, cfg: dict) -> dict:
    """`alignkit gen-pairs` in-process; the sampling phase is timed by the pipeline."""
    from alignkit.gen_pairs import GenPairsOptions, run_gen_pairs
    from alignkit.generation import SampleParams
    from alignkit.models import model_sha256
    _threads(cfg)
    model_sha256(model_spec)  # hashing the weights is not sampling: do it before timing
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "prompts.jsonl"
        src.write_text("".join(json.dumps(r) + "\n" for r in _prompts(cfg["prompts"])))

        def opts(max_new):
            return GenPairsOptions(model=model_spec, dtype=dtype, params=SampleParams(
                n=cfg["n"], temperature=cfg["temperature"], top_p=cfg["top_p"],
                max_new_tokens=max_new, seed=cfg["seed"], batch_size=cfg["batch_size"]))

        warm = Path(d) / "warm.jsonl"
        warm.write_text(src.read_text().splitlines()[0] + "\n")
        run_gen_pairs(str(warm), str(Path(d) / "w.jsonl"), opts(2))  # warm-up
        out = Path(d) / "out.jsonl"
        run_gen_pairs(str(src), str(out), opts(cfg["max_new_tokens"]))
        man = json.loads(Path(f"{out}.alignkit.json").read_text())
    tokens, tps = man["counts"]["tokens"], man["tokens_per_s"]
    return {"tokens": tokens, "seconds": round(tokens / tps, 3), "tokens_per_s": tps,
            "peak_rss_mb": round(_peak_rss_mb(), 1)}


def _as_list(x):
    return [] if x is None else [x] if isinstance(x, int) else list(x)


def _child(side: str, model: str, dtype: str, cfg: dict) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, model, dtype, json.dumps(cfg)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{side} {model} {dtype} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def _ratio(a: dict, b: dict) -> dict:
    return {k: round(a[k] / b[k], 3) for k in ("tokens_per_s", "peak_rss_mb") if b.get(k)}


def _machine() -> dict:
    import torch  # noqa: F401

    from _common import machine
    return {**machine(), "torch_default_threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="small configuration (< 1 min)")
    ap.add_argument("--output", default=None,
                    help=f"result JSON path (default {RESULT.relative_to(ROOT)}; with --quick a temp file)")
    ap.add_argument("--note", default="", help="free text stored in config.note")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of each side (default 1: on a shared CPU, 2+ threads "
                         "stall on OpenMP barriers and the timings mean nothing; 0 = torch's default)")
    ap.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, model, dtype, cfg = args.worker
        fn = worker_alignkit if side == "alignkit" else worker_baseline
        print(json.dumps(fn(model, dtype, json.loads(cfg))))
        return

    from alignkit.models import pull
    cfg = dict(QUICK if args.quick else DEFAULT)
    if args.threads is not None:
        cfg["threads"] = args.threads
    load_before = os.getloadavg()
    for m in cfg["models"]:
        pull(m)
    runs = []
    t_start = time.time()
    for model in cfg["models"]:
        for dtype in cfg["dtypes"]:
            base = _child("baseline", model, dtype, cfg)
            ours = _child("alignkit", model, dtype, cfg)
            run = {"model": model, "dtype": dtype, "alignkit": ours, "baseline": base,
                   "ratio": _ratio(ours, base)}
            runs.append(run)
            print(f"{model:24} {dtype:9} alignkit {ours['tokens_per_s']:9.1f} tok/s   "
                  f"baseline {base['tokens_per_s']:9.1f} tok/s   ratio {run['ratio']['tokens_per_s']:.2f}x",
                  file=sys.stderr)
    head = next((r for r in runs if r["model"] == "smollm2-135m-instruct" and r["dtype"] == "float32"),
                next((r for r in runs if r["model"] == "smollm2-135m-instruct"), runs[-1]))
    by = {(r["model"], r["dtype"]): r for r in runs}
    bf16_vs_fp32 = {m: {side: round(by[(m, "bfloat16")][side]["tokens_per_s"]
                                    / by[(m, "float32")][side]["tokens_per_s"], 3)
                        for side in ("alignkit", "baseline")}
                    for m in cfg["models"] if (m, "bfloat16") in by and (m, "float32") in by}
    result = {
        "name": "gen_pairs",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {**cfg, "quick": args.quick, "headline": {"model": head["model"], "dtype": head["dtype"]},
                   "baseline": "per-prompt model.generate(do_sample=True, num_return_sequences=n)",
                   "metric": "generated tokens (EOS included) per second of sampling; load excluded",
                   "note": args.note or ("2-core CPU shared with other jobs during the run (see "
                                         "loadavg); timings are noisy, one run each"),
                   "wall_s": round(time.time() - t_start, 1),
                   "loadavg_1m_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)]},
        "alignkit": head["alignkit"], "baseline": head["baseline"], "ratio": head["ratio"],
        "runs": runs, "bf16_vs_fp32": bf16_vs_fp32,
    }
    out = Path(args.output or (Path(tempfile.gettempdir()) / "gen_pairs.quick.json" if args.quick else RESULT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)
    print(json.dumps({"ratio": head["ratio"], "headline": result["config"]["headline"],
                      "bf16_vs_fp32": bf16_vs_fp32}))


if __name__ == "__main__":
    main()
