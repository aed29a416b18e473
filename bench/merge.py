"""Benchmark: `alignkit merge-soup --method linear` vs loading every state dict in torch.

Three perturbed copies of one model (smollm2-135m-instruct; `--quick`: a small random
Llama) are written to a temp folder first (model + seeded Gaussian noise of 1% of each
tensor's std). Then each side merges them with equal weights, in its own fresh child
process, one after the other:

- baseline: `safetensors.torch.load_file` of all three, average every tensor, `save_file`
  (plus config and tokenizer copies): what a user would write;
- alignkit: `soup.merge(build_config("linear", ...))`, the library call behind the CLI.

Per side: wall time, peak RSS during the merge (VmHWM in the child, read after
resetting the kernel's peak mark once the imports are done; a 5 ms RSS sampler where
that reset is not allowed), the RSS just before the merge (both children import torch,
safetensors, transformers and alignkit.soup first), and
`peak_rss_over_model_size` = (peak − before) / the byte size of one input's weights.
The two merged models are compared tensor by tensor (`max_abs_diff`). Results go to
bench/results/merge.json in the DESIGN.md bench format (ratio = alignkit / baseline).

    python bench/merge.py            # default: smollm2-135m-instruct (about a minute)
    python bench/merge.py --quick    # tiny models, well under a minute (temp result file)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "merge.json"
DEFAULT = {"model": "smollm2-135m-instruct", "copies": 3, "noise": 0.01, "method": "linear"}
QUICK = {**DEFAULT, "model": "tiny (hidden 256, 4 layers)"}
AUX = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
       "special_tokens_map.json", "chat_template.jinja")


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_mb() -> float:
    """VmHWM: this process's peak RSS. getrusage's ru_maxrss would also do, except that
    Linux carries the pre-exec peak of the forking parent into it."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024.0
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) so that the
    imports' transient peak does not count as the merge's; False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class _Sampler(threading.Thread):
    """Fallback when the peak cannot be reset: sample RSS every 5 ms."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.stop = 0.0, threading.Event()

    def run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _rss_mb())


def worker(side: str, out: str, inputs: list[str]) -> dict:
    import safetensors.torch  # noqa: F401  (imports paid before the measurement on both sides)
    import torch
    import transformers  # noqa: F401

    from alignkit import soup
    torch.set_grad_enabled(False)
    reset = _reset_peak()
    sampler = None if reset else _Sampler()
    before = _rss_mb()
    if sampler:
        sampler.start()
    t0 = time.perf_counter()
    if side == "alignkit":
        soup.merge(soup.build_config("linear", inputs), out)
    else:
        from safetensors.torch import load_file, save_file
        sds = [load_file(Path(d) / "model.safetensors") for d in inputs]
        avg = {k: sum(sd[k] for sd in sds) / len(sds) for k in sds[0]}
        Path(out).mkdir()
        save_file(avg, Path(out) / "model.safetensors", metadata={"format": "pt"})
        for name in AUX:
            if (Path(inputs[0]) / name).exists():
                shutil.copy2(Path(inputs[0]) / name, Path(out) / name)
    wall = time.perf_counter() - t0
    if sampler:
        sampler.stop.set()
        sampler.join()
    peak = _peak_mb() if reset else max(sampler.peak, _rss_mb())
    return {"wall_s": round(wall, 3), "peak_rss_mb": round(peak, 1),
            "rss_before_mb": round(before, 1), "merge_rss_mb": round(peak - before, 1)}


def _child(side: str, out: Path, inputs: list[Path]) -> dict:
    cmd = [sys.executable, __file__, "--worker", side, str(out), *map(str, inputs)]
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{side} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def make_inputs(quick: bool, root: Path, cfg: dict) -> tuple[list[Path], int]:
    """Three perturbed copies of the source model; returns them and one model's weight bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    from alignkit.models import build_tiny, pull
    if quick:
        src = root / "src"
        src.mkdir()
        build_tiny(src, seed=0, hidden=256, layers=4, heads=4)
    else:
        src = pull(cfg["model"])
    sd = load_file(src / "model.safetensors")
    size = sum(t.numel() * t.element_size() for t in sd.values())
    dirs = []
    for k in range(cfg["copies"]):
        d = root / f"m{k}"
        d.mkdir()
        g = torch.Generator().manual_seed(k)
        noisy = {n: t + cfg["noise"] * t.float().std() * torch.randn(t.shape, generator=g) if t.numel() > 1 else t
                 for n, t in sd.items()}
        save_file(noisy, d / "model.safetensors", metadata={"format": "pt"})
        for name in AUX:
            if (src / name).exists():
                shutil.copy2(src / name, d / name)
        dirs.append(d)
    return dirs, size


def _max_abs_diff(a: Path, b: Path) -> float:
    from safetensors.torch import load_file
    x, y = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert sorted(x) == sorted(y), "the two sides wrote different tensor names"
    return max(float((x[k].float() - y[k].float()).abs().max()) for k in x)


def _machine() -> dict:
    import torch
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny models (< 1 min)")
    ap.add_argument("--output", default=None, help="result JSON (default bench/results/merge.json; "
                                                   "with --quick a temp file)")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        side, out, *inputs = args.worker
        print(json.dumps(worker(side, out, inputs)))
        return
    cfg = dict(QUICK if args.quick else DEFAULT)
    with tempfile.TemporaryDirectory(prefix="bench_merge_") as tmp:
        root = Path(tmp)
        t0 = time.time()
        inputs, size = make_inputs(args.quick, root, cfg)
        prep = time.time() - t0
        base = _child("baseline", root / "out_baseline", inputs)
        ours = _child("alignkit", root / "out_alignkit", inputs)
        diff = _max_abs_diff(root / "out_alignkit", root / "out_baseline")
    mb = size / 2**20
    for side in (ours, base):
        side["peak_rss_over_model_size"] = round(side["merge_rss_mb"] / mb, 3)
    result = {
        "name": "merge_vs_torch",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(),
        "config": {**cfg, "quick": args.quick, "model_bytes": size, "model_mb": round(mb, 1),
                   "prepare_inputs_s": round(prep, 1), "max_abs_diff": diff,
                   "baseline": "safetensors.torch.load_file x3, average each tensor, save_file",
                   "metric": "wall time and peak RSS of the merge, each side in a fresh child; "
                             "merge_rss_mb = peak RSS - RSS just before the merge",
                   "note": "2 CPU cores shared with other jobs during the run: wall times are noisy. "
                           "alignkit's time includes the sha256 of every input (for alignkit.json) "
                           "and the architecture/vocabulary checks; the baseline does neither. "
                           "alignkit does its arithmetic on one torch thread (soup.engine), the "
                           "baseline on torch's default threads"},
        "alignkit": ours,
        "baseline": base,
        "ratio": {k: round(ours[k] / base[k], 3) for k in ours if base.get(k)},
    }
    out = Path(args.output or (Path(tempfile.gettempdir()) / "merge.quick.json" if args.quick else RESULT))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}", file=sys.stderr)
    print(json.dumps({"alignkit": ours, "baseline": base, "ratio": result["ratio"]}))


if __name__ == "__main__":
    main()
