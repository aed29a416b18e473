"""`eval --report DIR`: report.md plus PNG plots (matplotlib, Agg backend).

Plots: score / pass-rate bars with 95% intervals for each model vs the baseline,
per-check pass rates, reward vs KL when several models are compared, the best-of-N curve,
and training curves from a metrics.jsonl.
"""
from __future__ import annotations

import json
from pathlib import Path

from .io import atomic_dir, check_output_dir


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> bool:
    """Finish a figure: layout, write the PNG, free it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _bar_scores(metrics: dict, path: Path) -> bool:
    plt = _plt()
    labels, means, errs = [], [], [[], []]
    for label, m in metrics["models"].items():
        r = (m.get("rules") or {}).get("prompt_level_ci") or m.get("score")
        if not r:
            continue
        labels.append(label)
        means.append(r["mean"])
        errs[0].append(r["mean"] - r["lo"])
        errs[1].append(r["hi"] - r["mean"])
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(labels, means, yerr=errs, capsize=6, color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(labels)])
    ax.set_ylabel("prompt-level accuracy" if metrics["models"][labels[0]].get("rules") else "mean score")
    ax.set_title("Score with 95% bootstrap interval")
    return _save(fig, path)


def _bar_checks(metrics: dict, path: Path) -> bool:
    plt = _plt()
    per = {label: (m.get("rules") or {}).get("per_check") for label, m in metrics["models"].items()}
    per = {k: v for k, v in per.items() if v}
    if not per:
        return False
    types = sorted({t for v in per.values() for t in v})
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(types) * len(per)), 4))
    width = 0.8 / len(per)
    for i, (label, v) in enumerate(per.items()):
        xs = [j + i * width for j in range(len(types))]
        ax.bar(xs, [v.get(t, {}).get("pass_rate", 0) for t in types], width, label=label)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))], types, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("pass rate")
    ax.legend()
    ax.set_title("Pass rate per check type")
    return _save(fig, path)


def _reward_vs_kl(metrics: dict, path: Path) -> bool:
    cmps = metrics.get("comparisons") or {}
    pts = [(c["kl"].get("exact_mean", c["kl"]["k3_mean"]), metrics["models"][label]["score"]["mean"], label)
           for label, c in cmps.items() if c.get("kl") and metrics["models"][label].get("score")]
    if len(pts) < 2:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    for x, y, label in pts:
        ax.annotate(label, (x, y), fontsize=8)
    ax.set_xlabel("KL(model || baseline) per sequence, nats (temperature-1 samples)")
    ax.set_ylabel("mean score")
    ax.set_title("Reward vs KL")
    return _save(fig, path)


def _bon(metrics: dict, path: Path) -> bool:
    curves = {k: m["best_of_n"] for k, m in metrics["models"].items() if m.get("best_of_n")}
    if not curves:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, c in curves.items():
        ax.plot(c["n"], c["expected_best"], "o-", label=label)
    ax.set_xlabel("n")
    ax.set_ylabel("expected best score")
    ax.set_title("Best-of-N")
    ax.legend()
    return _save(fig, path)


def _training_curves(metrics_files: list[str], path: Path) -> bool:
    rows_by = {}
    for f in metrics_files:
        rows = [json.loads(line) for line in Path(f).read_text().splitlines() if line.strip()]
        rows_by[f] = [r for r in rows if "loss" in r]
    if not any(rows_by.values()):
        return False
    plt = _plt()
    keys = ["loss", "rewards/margins", "rewards/accuracies"]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2))
    for ax, key in zip(axes, keys):
        for f, rows in rows_by.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                ax.plot(*zip(*pts), label=Path(f).parent.name or f)
        ax.set_title(key)
        ax.set_xlabel("step")
    axes[0].legend(fontsize=7)
    return _save(fig, path)


def _fmt(ci: dict | None, pct: bool = False) -> str:
    if not ci:
        return "n/a"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.3f}")
    return f"{f(ci['mean'])} [{f(ci['lo'])}, {f(ci['hi'])}]"


def markdown(metrics: dict, plots: list[str]) -> str:
    lines = ["# alignkit evaluation report", ""]
    lines += ["| model | spec | prompts | mean score (95% CI) | prompt-level acc % (95% CI) | instruction-level acc % | mean words |",
              "|---|---|---|---|---|---|---|"]
    for label, m in metrics["models"].items():
        rules = m.get("rules") or {}
        inst = f"{100 * rules['instruction_level']:.1f}" if rules else "n/a"
        lines.append(f"| {label} | `{m.get('spec')}` | {m['n_prompts']} | {_fmt(m.get('score'))} | "
                     f"{_fmt(rules.get('prompt_level_ci'), True)} | {inst} | {m['mean_length_words']:.1f} |")
    for label, c in (metrics.get("comparisons") or {}).items():
        lines += ["", f"## {label} vs baseline", ""]
        if c.get("prompt_level_diff"):
            d = c["prompt_level_diff"]
            lines.append(f"- prompt-level accuracy difference: {100 * d['diff']:+.1f} points "
                         f"(95% CI {100 * d['lo']:+.1f} to {100 * d['hi']:+.1f}, n={d['n']})")
        if c.get("win_rate"):
            w = c["win_rate"]
            lines.append(f"- win rate: {100 * w['win_rate']:.1f}% (95% CI {100 * w['lo']:.1f}–{100 * w['hi']:.1f}; "
                         f"{w['wins']} wins, {w['ties']} ties, {w['losses']} losses)")
        if c.get("lc_win_rate"):
            lines.append(f"- length-controlled win rate: {100 * c['lc_win_rate']['lc_win_rate']:.1f}%")
        if c.get("kl"):
            k = c["kl"]
            exact = (f"exact {k['exact_mean']:.3f} ± {k['exact_se']:.3f}, " if "exact_mean" in k else "")
            lines.append(f"- KL(model‖baseline) per sequence, on {k['n']} samples drawn from the model at "
                         f"temperature 1: {exact}k1 {k['k1_mean']:.3f} ± {k['k1_se']:.3f}, "
                         f"k3 {k['k3_mean']:.3f} ± {k['k3_se']:.3f} nats")
        if c.get("topk_entropy_bits") is not None:
            lines.append(f"- top-10 entropy {c['topk_entropy_bits']:.3f} bits, top-10 mass {c['topk_mass']:.3f}")
    per = {label: (m.get("rules") or {}).get("per_check") for label, m in metrics["models"].items()}
    per = {k: v for k, v in per.items() if v}
    if per:
        types = sorted({t for v in per.values() for t in v})
        lines += ["", "## Pass rate per check type", "",
                  "| check | " + " | ".join(per) + " |", "|---|" + "---|" * len(per)]
        for t in types:
            cells = [f"{100 * v[t]['pass_rate']:.0f}% (n={v[t]['n']})" if t in v else "" for v in per.values()]
            lines.append(f"| {t} | " + " | ".join(cells) + " |")
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(metrics: dict, out_dir: str, metrics_files: list[str] | None = None, *,
                 force: bool = False, manifest: dict | None = None) -> Path:
    """Write report.md, metrics.json and the plots into `out_dir` (atomically). An
    existing non-empty folder is replaced only with `force`; a file never."""
    check_output_dir(out_dir, force, empty_ok=True)
    with atomic_dir(out_dir, force=True) as tmp:
        plots = []
        for name, fn in (("scores.png", _bar_scores), ("checks.png", _bar_checks),
                         ("reward_vs_kl.png", _reward_vs_kl), ("best_of_n.png", _bon)):
            if fn(metrics, tmp / name):
                plots.append(name)
        if metrics_files and _training_curves(metrics_files, tmp / "training.png"):
            plots.append("training.png")
        (tmp / "report.md").write_text(markdown(metrics, plots), encoding="utf-8")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
        if manifest is not None:  # provenance (alignkit lineage reads it)
            (tmp / "alignkit.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    return Path(out_dir)
