"""`eval --report DIR`: report.md plus PNG plots (matplotlib, Agg backend).

Plots: accuracy (or score) bars with 95% intervals per model, the accuracy difference vs the
baseline with its interval, per-check pass rates with counts, reward vs KL (the baseline
at KL 0), the best-of-N curve, and training curves from a metrics.jsonl. Labels name the
models; titles say how many prompts.
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


def _name(label: str, m: dict) -> str:
    """A plot label a reader recognises: the model's folder or embedded name."""
    spec = str(m.get("spec") or label)
    return f"{label}\n{Path(spec).name}" if spec not in (label, "samples") else label


def _bar_scores(metrics: dict, path: Path) -> bool:
    plt = _plt()
    labels, means, errs, ns = [], [], [[], []], []
    acc = any(m.get("rules") for m in metrics["models"].values())
    for label, m in metrics["models"].items():
        r = (m.get("rules") or {}).get("prompt_level_ci") if acc else m.get("score")
        if not r:
            continue
        labels.append(_name(label, m))
        means.append(r["mean"])
        errs[0].append(r["mean"] - r["lo"])
        errs[1].append(r["hi"] - r["mean"])
        ns.append(r["n"])
    if not labels:
        return False
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(labels, means, yerr=errs, capsize=6,
           color=["#4c72b0", "#dd8452", "#55a868", "#c44e52"][:len(labels)])
    for x, (mean, n) in enumerate(zip(means, ns)):
        ax.annotate(f"{100 * mean:.1f}%" if acc else f"{mean:.3f}", (x, mean), ha="center",
                    va="bottom", fontsize=8, xytext=(12, 2), textcoords="offset points")
    if acc:
        ax.set_ylim(0, 1)
        ax.set_ylabel("prompt-level accuracy (strict)")
    else:
        ax.set_ylabel("mean score")
    ax.set_title(f"{'Prompt-level accuracy' if acc else 'Mean score'} with 95% bootstrap "
                 f"interval (n={max(ns)} prompts)", fontsize=9)
    return _save(fig, path)


def _bar_diff(metrics: dict, path: Path) -> bool:
    """The number a comparison is about: the accuracy difference with its interval."""
    rows = [(label, c["prompt_level_diff"]) for label, c in (metrics.get("comparisons") or {}).items()
            if c.get("prompt_level_diff")]
    if not rows:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 1.2 + 0.6 * len(rows)))
    for y, (label, d) in enumerate(rows):
        ax.errorbar([100 * d["diff"]], [y], xerr=[[100 * (d["diff"] - d["lo"])],
                                                  [100 * (d["hi"] - d["diff"])]],
                    fmt="o", capsize=6, color="#4c72b0")
        ax.annotate(f"{100 * d['diff']:+.1f} [{100 * d['lo']:+.1f}, {100 * d['hi']:+.1f}]",
                    (100 * d["diff"], y), xytext=(0, 8), textcoords="offset points",
                    ha="center", fontsize=8)
    ax.axvline(0, color="grey", lw=1, ls="--")
    ax.set_yticks(range(len(rows)), [_name(lb, metrics["models"][lb]) for lb, _ in rows])
    ax.set_xlabel("prompt-level accuracy difference vs baseline (points)")
    ax.set_title(f"Difference with 95% paired bootstrap interval (n={rows[0][1]['n']} prompts)",
                 fontsize=9)
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
        ax.bar(xs, [v.get(t, {}).get("pass_rate", 0) for t in types], width,
               label=_name(label, metrics["models"][label]).replace("\n", ": "))
    ns = {t: max(v.get(t, {}).get("n", 0) for v in per.values()) for t in types}
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(types))],
                  [f"{t} (n={ns[t]})" for t in types], rotation=60, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel("pass rate (strict)")
    ax.legend(fontsize=7)
    ax.set_title("Pass rate per check type (n = prompts with that check)", fontsize=9)
    return _save(fig, path)


def _reward_vs_kl(metrics: dict, path: Path) -> bool:
    cmps = metrics.get("comparisons") or {}
    models = metrics["models"]

    def y(label):
        m = models[label]
        r = (m.get("rules") or {}).get("prompt_level_ci") or m.get("score")
        return r["mean"] if r else None
    pts = [(c["kl"].get("exact_mean", c["kl"]["k3_mean"]), y(label), label)
           for label, c in cmps.items() if c.get("kl") and y(label) is not None]
    if not pts or "baseline" not in models or y("baseline") is None:
        return False
    pts = [(0.0, y("baseline"), "baseline")] + pts  # the baseline sits at KL 0
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-")
    for x, yy, label in pts:
        ax.annotate(_name(label, models[label]).replace("\n", ": "), (x, yy), fontsize=8)
    ax.set_xlabel("KL(model || baseline) per sequence, nats (temperature-1 samples)")
    ax.set_ylabel("prompt-level accuracy" if models["baseline"].get("rules") else "mean score")
    ax.set_title("Reward vs KL", fontsize=9)
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
    lines += ["IFEval accuracies in % with 95% bootstrap intervals (strict: the response as "
              "is; loose: also without its first/last line and without `*`).", "",
              "| model | spec | prompts | mean score (95% CI) | prompt-level strict | prompt-level loose "
              "| instruction-level strict | instruction-level loose | mean words |",
              "|---|---|---|---|---|---|---|---|---|"]
    for label, m in metrics["models"].items():
        rules = m.get("rules") or {}
        accs = " | ".join(_fmt(rules.get(k), True) for k in (
            "prompt_level_ci", "prompt_level_loose_ci", "instruction_level_ci",
            "instruction_level_loose_ci"))
        lines.append(f"| {label} | `{m.get('spec')}` | {m['n_prompts']} | {_fmt(m.get('score'))} | "
                     f"{accs} | {m['mean_length_words']:.1f} |")
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
        for name, fn in (("scores.png", _bar_scores), ("difference.png", _bar_diff),
                         ("checks.png", _bar_checks),
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
