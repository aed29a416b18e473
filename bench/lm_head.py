"""Benchmark: alignkit's CPU LM head (`policy/cpu_head.py`) vs torch's chunked
`torch.nn.functional.linear_cross_entropy`, on a DPO batch's labelled positions.

Both compute per-token log-probabilities of the targets under the LM head (SmolLM2's
shape: hidden 576, vocabulary 49152, weights in bf16 as under bf16 autocast) and their
gradient with respect to the hidden states (the head frozen, as under LoRA); torch's with
`reduction="none"` and `LinearCrossEntropyOptions()` (its CPU default: "accurate"
accumulation, aspect-ratio chunks), under bf16 autocast (`torch`) and in float32
(`torch_fp32`, the reference of the comparison: alignkit's head runs its matrix
products in bf16). Each side runs in its own child process so peak RSS
is its own. Reports the forward+backward time per batch, the peak RSS, and the largest
difference of the log-probs and of the gradients between the two.

    python bench/lm_head.py            # 16 sequences x 192 labelled tokens, 5 repeats
    python bench/lm_head.py --quick
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "lm_head.json"


def _inputs(rows: int, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, 576, generator=g) * 0.5
    weight = torch.randn(49152, 576, generator=g) * 0.05
    targets = torch.randint(0, 49152, (rows,), generator=g)
    return hidden, weight, targets


def _alignkit(hidden, weight, targets):
    import torch

    from alignkit.policy.cpu_head import _ChunkedLogProb
    return _ChunkedLogProb.apply(hidden, weight, None, targets, torch.bfloat16, ())[0]


def _torch(hidden, weight, targets):
    import torch
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return -F.linear_cross_entropy(hidden.to(torch.bfloat16), weight.to(torch.bfloat16), targets,
                                       reduction="none", options=LinearCrossEntropyOptions())


def _torch_fp32(hidden, weight, targets):
    import torch.nn.functional as F
    from torch.nn import LinearCrossEntropyOptions
    return -F.linear_cross_entropy(hidden, weight, targets, reduction="none",
                                   options=LinearCrossEntropyOptions())


SIDES = {"alignkit": _alignkit, "torch": _torch, "torch_fp32": _torch_fp32}


def worker(side: str, rows: int, repeats: int, train_head: bool = False) -> dict:
    import torch
    hidden, weight, targets = _inputs(rows)
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(train_head)  # frozen under LoRA (the demo)
    fn = SIDES[side]
    times = []
    for i in range(repeats + 1):
        h.grad = w.grad = None
        t0 = time.perf_counter()
        logp = fn(h, w, targets)
        logp.float().sum().backward()
        if i:  # the first call warms up
            times.append(time.perf_counter() - t0)
    out = {"seconds": round(sorted(times)[len(times) // 2], 4),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}
    torch.save({"logp": logp.detach().float(), "gh": h.grad.float()},
               f"/tmp/lm_head.{side}.pt")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--output", default=None)
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, rows, repeats = args.worker
        print(json.dumps(worker(side, int(rows), int(repeats))))
        return
    rows, repeats = (512, 2) if args.quick else (16 * 192, 5)
    res = {}
    for side in SIDES:
        p = subprocess.run([sys.executable, __file__, "--worker", side, str(rows), str(repeats)],
                           capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(f"{side} failed:\n{p.stderr[-3000:]}")
        res[side] = json.loads(p.stdout.strip().splitlines()[-1])
        print(side, res[side], file=sys.stderr)
    import torch
    a = torch.load("/tmp/lm_head.alignkit.pt")
    diff = {}
    for side in ("torch", "torch_fp32"):
        b = torch.load(f"/tmp/lm_head.{side}.pt")
        diff[side] = {k: float((a[k] - b[k]).abs().max()) for k in a}
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import machine
    result = {"name": "lm_head", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(), "config": {"rows": rows, "hidden": 576, "vocab": 49152,
                                               "dtype": "bfloat16", "repeats": repeats},
              "results": res, "max_abs_diff": diff,
              "ratio": {f"{s}_over_alignkit_seconds": round(res[s]["seconds"] /
                                                          res["alignkit"]["seconds"], 3)
                        for s in ("torch", "torch_fp32")}}
    out = Path(args.output or ("/tmp/lm_head.quick.json" if args.quick else RESULT))
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratio"]), json.dumps(diff))


if __name__ == "__main__":
    main()
