"""Print the demo's three numbers: prompt-level strict accuracy of the base and the
aligned model, with the 95% interval of the difference, on each held-out set, the KL,
and the check types that got worse.

    python examples/summary.py out/metrics.json out/metrics-types.json out/metrics-three.json

Reads `alignkit eval` metrics files (a model compared with a baseline); writes a Markdown
table to stdout. Standard library only.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

NAMES = {"metrics": "held-out prompts, trained types", "metrics-types": "held-out constraint types",
         "metrics-three": "three constraints"}


def rows(path: Path) -> tuple[str, dict]:
    m = json.loads(path.read_text(encoding="utf-8"))
    base, model = m["models"]["baseline"]["rules"], m["models"]["model"]["rules"]
    cmp_ = m["comparisons"]["model"]
    d = cmp_["prompt_level_diff"]
    line = (f"| {NAMES.get(path.stem, path.stem)} | {d['n']} | {base['prompt_level']:.1%} | "
            f"{model['prompt_level']:.1%} | {100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, "
            f"{100 * d['hi']:+.1f}] |")
    return line, {"base": base["per_check"], "model": model["per_check"], "cmp": cmp_}


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("| set | n | base | aligned | difference, points [95% CI] |")
    print("|---|---|---|---|---|")
    per_base: dict[str, list] = {}
    per_model: dict[str, list] = {}
    kl = None
    for p in argv:
        line, info = rows(Path(p))
        print(line)
        kl = kl or info["cmp"].get("kl")
        for t, v in info["base"].items():
            per_base.setdefault(t, []).append(v)
        for t, v in info["model"].items():
            per_model.setdefault(t, []).append(v)
    if kl:
        print(f"\nKL(aligned || base), exact per-token sum on the aligned model's own samples: "
              f"{kl.get('exact_mean', float('nan')):.2f} ± {kl.get('exact_se', float('nan')):.2f} nats")
    worse = []
    for t in sorted(per_base):
        nb = sum(v["n"] for v in per_base[t])
        b = sum(v["pass_rate"] * v["n"] for v in per_base[t]) / nb
        mv = per_model.get(t, [])
        nm = sum(v["n"] for v in mv) or 1
        a = sum(v["pass_rate"] * v["n"] for v in mv) / nm
        if a < b:
            worse.append((b - a, t, b, a, nb))
    if worse:
        print("\nCheck types that got worse (all sets): " + ", ".join(
            f"{t} {b:.0%} -> {a:.0%} (n={n})" for _, t, b, a, n in sorted(worse, reverse=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
