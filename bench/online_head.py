"""Benchmark: an online step (GRPO, SmolLM2-135M-Instruct, LoRA r=16, bf16, the rules
reward on the demo's training prompts) on alignkit's CPU head (`policy/cpu_head.py`,
the online trainers' default on CPU) against TRL's fused head (ALIGNKIT_CPU_HEAD=0, what
a plain TRL GRPOTrainer runs), everything else equal.

Each side is one `alignkit train-policy --method grpo` in its own process, same seed, so
both sample the same completions; the difference is the log-prob passes (the loss pass
with its backward, and the reference pass). Reports seconds per optimizer step (wall
time of the run over its steps, model loading excluded by subtracting a 0-step run's
start-up) and the peak RSS of each side.

    .venv/bin/python bench/online_head.py            # 6 steps of 4 prompts x 4 samples
    .venv/bin/python bench/online_head.py --quick    # 2 steps, 48 new tokens
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
RESULT = ROOT / "bench" / "results" / "online_head.json"
sys.path.insert(0, str(Path(__file__).resolve().parent))


def worker(argv: list[str]) -> None:
    """One train-policy run in this process; prints its wall time and peak RSS."""
    from alignkit import cli
    t = time.perf_counter()
    code = cli.main(["--quiet", *argv])
    wall = time.perf_counter() - t
    print(json.dumps({"code": code, "wall_s": wall,
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def run(head: str, args: list[str]) -> dict:
    env = {**os.environ, "ALIGNKIT_CPU_HEAD": head}
    p = subprocess.run([sys.executable, __file__, "--worker", json.dumps(args)], env=env,
                       capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"worker failed ({head}):\n{p.stderr[-3000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if res["code"] != 0:
        raise SystemExit(f"train-policy exited {res['code']} ({head}):\n{p.stderr[-3000:]}")
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--output")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return worker(json.loads(a.worker))
    steps = a.steps or (2 if a.quick else 6)
    new = 48 if a.quick else 112
    from _common import machine
    with tempfile.TemporaryDirectory() as d:
        prompts = Path(d) / "prompts.jsonl"
        rows = (ROOT / "examples" / "data" / "train.jsonl").read_text().splitlines()
        prompts.write_text("\n".join(rows[:4 * steps]) + "\n")

        def args(out: str, n: int) -> list[str]:
            return ["train-policy", "--method", "grpo", "--model", a.model, str(prompts),
                    "-o", str(Path(d) / out), "--reward", "rules", "--num-generations", "4",
                    "--batch-size", "16", "--max-new-tokens", str(new), "--max-steps", str(n),
                    "--lora-r", "16", "--lora-alpha", "32", "--dtype", "bfloat16", "--beta",
                    "0.04", "--lr", "1e-4", "--seed", "0", "--force"]

        sides = {}
        for name, head in (("alignkit", "1"), ("trl_head", "0")):
            start = run(head, args(f"{name}-0", 1))  # start-up plus one step
            full = run(head, args(name, steps + 1))
            per = (full["wall_s"] - start["wall_s"]) / steps
            sides[name] = {"s_per_step": round(per, 2), "wall_s": round(full["wall_s"], 1),
                           "peak_rss_mb": round(full["peak_rss_mb"], 1)}
    result = {
        "name": "online_head", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "config": {"model": a.model, "method": "grpo", "steps": steps, "prompts_per_step": 4,
                   "num_generations": 4, "max_new_tokens": new, "lora_r": 16,
                   "dtype": "bfloat16", "beta": 0.04, "reward": "rules",
                   "metric": "seconds per optimizer step (a 1-step run's time subtracted)"},
        "results": sides,
        "ratio": {"speedup": round(sides["trl_head"]["s_per_step"] / sides["alignkit"]["s_per_step"], 3),
                  "rss": round(sides["alignkit"]["peak_rss_mb"] / sides["trl_head"]["peak_rss_mb"], 3)},
    }
    out = Path(a.output or ("/tmp/online_head.quick.json" if a.quick else RESULT))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio"]), json.dumps(sides))


if __name__ == "__main__":
    main()
