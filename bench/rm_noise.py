"""Benchmark: reward-model accuracy under label noise, `crm` vs plain Bradley-Terry.

Both sides train on the same synthetic pairs (`alignkit.reward_models.synthetic`: the
chosen completion holds a marker word) in which a share of the labels is flipped
(0%, 20%, 40%), with the same backbone, steps, learning rate and seed, and are scored
on the same clean held-out pairs (ties count as wrong):

- baseline: Bradley-Terry through TRL's RewardTrainer (`train-rm --method bt`), what a
  user would otherwise run;
- alignkit: `train-rm --method crm` (two peers with co-teaching and the easy->hard
  curriculum), `--noise-rate` set to the true flip rate (the prior it expects), 0.1 at
  0% noise; also `crm --no-curriculum` (reported under `variants`).

The task (`markers=antonyms`): each pair differs in one of 24 antonym words, so every
antonym's direction is learned from ~1/24 of the pairs and flipped labels can win
locally; with a single marker word both sides stay at 100% and only the margin moves.

Everything runs in this process, one run after another, on one torch thread (on a
shared 2-core machine a second intra-op thread only spin-waits). Results go to
bench/results/rm_noise.json in the DESIGN.md bench format: the headline
`alignkit`/`baseline`/`ratio` hold the clean held-out accuracy at each noise level
(`accuracy_noise_20` = 20% flipped) plus the wall time of the whole sweep; `runs` has
every run's held-out metrics.

    python bench/rm_noise.py            # default configuration (minilm-l6; several minutes)
    python bench/rm_noise.py --quick    # tiny-llama, under a minute
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "rm_noise.json"

DEFAULT = {"model": "minilm-l6", "markers": "antonyms", "train_pairs": 160, "eval_pairs": 96,
           "noise": [0.0, 0.2, 0.4], "epochs": 3, "batch_size": 8, "lr": 1e-4, "max_length": 64,
           "seed": 0}
QUICK = {**DEFAULT, "model": "tiny-llama", "train_pairs": 96, "eval_pairs": 48, "epochs": 2,
         "lr": 1e-3}


def _write(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


def run_one(method: str, train: str, clean: str, out: Path, cfg: dict, noise: float) -> dict:
    from alignkit import console
    from alignkit.reward_models import RMConfig
    from alignkit.reward_models import train as train_rm
    from alignkit.training import TrainOptions
    console.set_verbosity(0)
    opts = TrainOptions(epochs=cfg["epochs"], lr=cfg["lr"], batch_size=cfg["batch_size"],
                        max_length=cfg["max_length"], seed=cfg["seed"], logging_steps=10,
                        force=True)
    name = method.split("-")[0]
    rm = RMConfig(method=name, eval_pairs=clean, noise_rate=noise if noise > 0 else 0.1,
                  curriculum="no-curriculum" not in method)
    t0 = time.time()
    result = train_rm(name, train, cfg["model"], out, opts, rm)
    return {**result, "wall_s": round(time.time() - t0, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, under a minute")
    ap.add_argument("--out", default=str(RESULT), help="result JSON path")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                    help="override a configuration value, e.g. --set epochs=5")
    args = ap.parse_args()
    cfg = dict(QUICK if args.quick else DEFAULT)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in cfg:
            ap.error(f"--set: unknown key {key!r} (known: {', '.join(cfg)})")
        cfg[key] = json.loads(value) if value[:1] in "[{0123456789-.tfn" else value

    import torch

    from alignkit.reward_models.synthetic import ANTONYMS, MARKERS, marker_pairs
    markers = ANTONYMS if cfg["markers"] == "antonyms" else MARKERS
    torch.set_num_threads(1)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    side = {"crm": "alignkit", "bt": "baseline", "crm-no-curriculum": "crm_no_curriculum"}
    results: dict[str, dict] = {s: {} for s in side.values()}
    runs = []
    t_all = {s: 0.0 for s in side.values()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clean = _write(tmp / "clean.jsonl", marker_pairs(cfg["eval_pairs"], seed=cfg["seed"] + 99,
                                                         markers=markers, id_prefix="c"))
        for noise in cfg["noise"]:
            train = _write(tmp / f"train{noise}.jsonl",
                           marker_pairs(cfg["train_pairs"], seed=cfg["seed"], noise=noise,
                                        markers=markers))
            for method in side:
                r = run_one(method, train, clean, tmp / f"{method}{noise}", cfg, noise)
                key = f"accuracy_noise_{round(noise * 100)}"
                results[side[method]][key] = r["heldout"]["accuracy"]
                t_all[side[method]] += r["wall_s"]
                runs.append({"method": method, "noise": noise, "wall_s": r["wall_s"],
                             "heldout": r["heldout"],
                             **({"heldout_peer": r["heldout_peer"]} if "heldout_peer" in r else {})})
                print(f"noise {noise:.0%} {method:17s} accuracy {r['heldout']['accuracy']:.4f} "
                      f"margin {r['heldout']['mean_margin']:.3f} ({r['wall_s']:.1f}s)", flush=True)
    for s in results:
        results[s]["wall_s"] = round(t_all[s], 2)
    ratio = {k: (round(results["alignkit"][k] / results["baseline"][k], 4)
                 if results["baseline"][k] else None) for k in results["baseline"]}
    data = {
        "name": "rm_noise",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
                    "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)},
        "config": {**cfg, "quick": args.quick, "alignkit": "train-rm --method crm",
                   "baseline": "train-rm --method bt (TRL RewardTrainer)",
                   "task": f"synthetic marker words ({cfg['markers']}), labels flipped at the "
                           "noise rate; accuracy on clean held-out pairs, ties wrong"},
        "alignkit": results["alignkit"],
        "baseline": results["baseline"],
        "ratio": ratio,
        "variants": {"crm_no_curriculum": results["crm_no_curriculum"]},
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(json.dumps({k: data[k] for k in ("alignkit", "baseline", "ratio")}, indent=2))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
