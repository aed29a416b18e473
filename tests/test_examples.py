"""The shipped examples really run: the demo chain on tiny-llama, and the cron refresh
script's lock and atomic `current` switch."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ALIGNKIT = Path(sys.executable).parent / "alignkit"


def test_demo_tiny_chain(tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PATH": f"{ALIGNKIT.parent}:{os.environ['PATH']}"}
    p = subprocess.run(["make", "-C", str(ROOT / "examples"), "demo-tiny", f"OUT={out}",
                        f"ALIGNKIT={ALIGNKIT}"], capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    for name in ("samples.jsonl", "scored.jsonl", "pairs.jsonl", "aligned/alignkit.json",
                 "base-samples.jsonl", "report/report.md", "metrics.json", "metrics-types.json",
                 "metrics-three.json", "base-samples-types.jsonl", "summary.md"):
        assert (out / name).exists(), name
    # the three numbers, each on its own held-out set, with the KL
    summary = (out / "summary.md").read_text()
    for label, n in (("held-out prompts, trained types", 8), ("held-out constraint types", 6),
                     ("three constraints", 6)):
        assert f"| {label} | {n} |" in summary, summary
    assert "KL(aligned || base)" in summary and summary in p.stdout
    # provenance: the report walks back to the prompts and the base model
    import json
    lin = subprocess.run([str(ALIGNKIT), "lineage", str(out / "report"), "--json"],
                         capture_output=True, text=True, timeout=120)
    assert lin.returncode == 0, lin.stderr
    tree = json.loads(lin.stdout)

    def walk(node):
        yield node
        for child in node.get("inputs", []):
            yield from walk(child)
    nodes = list(walk(tree))
    names = {Path(n["artifact"]).name for n in nodes}
    assert {"heldout.jsonl", "aligned", "pairs.jsonl", "scored.jsonl", "samples.jsonl",
            "train-prompts.jsonl", "tiny-llama"} <= names, names
    by = {Path(n["artifact"]).name: n for n in nodes}
    assert by["samples.jsonl"]["command"].startswith("alignkit gen-pairs")
    assert by["pairs.jsonl"]["command"].startswith("alignkit relabel")
    assert by["aligned"]["command"].startswith("alignkit train-policy")
    assert all(n["status"] in ("ok", "no manifest", "seen") for n in nodes), nodes
    text = subprocess.run([str(ALIGNKIT), "lineage", str(out / "aligned")], capture_output=True,
                          text=True, timeout=120).stdout
    assert "$ alignkit score" in text and "train-prompts.jsonl" in text
    # change BETA and add ROUNDS=2 -> round 1's sampling, scoring and pairing stay up to
    # date (param files keep their mtime unless their content changes), its training
    # reruns; round 2 samples the next prompts from round 1's model, trains on from it,
    # and the evaluation compares round 2's model with the base (one make run for both
    # checks: each demo-tiny run costs some 20 process starts)
    p4 = subprocess.run(["make", "-C", str(ROOT / "examples"), "demo-tiny", f"OUT={out}",
                         f"ALIGNKIT={ALIGNKIT}", "BETA=0.3", "ROUNDS=2"], capture_output=True,
                        text=True, env=env, timeout=600)
    assert p4.returncode == 0, p4.stdout[-3000:] + p4.stderr[-3000:]
    assert f"-o {out}/samples.jsonl" in p.stdout and f"-o {out}/pairs.jsonl" in p.stdout
    assert f"-o {out}/samples.jsonl" not in p4.stdout
    assert f"-o {out}/scored.jsonl" not in p4.stdout and f"-o {out}/pairs.jsonl" not in p4.stdout
    assert f"{out}/pairs.jsonl -o {out}/aligned" in p4.stdout  # BETA: round 1 retrains
    r2 = out / "round-2"
    first = [json.loads(x)["id"] for x in (out / "train-prompts.jsonl").read_text().splitlines()]
    second = [json.loads(x)["id"] for x in (r2 / "train-prompts.jsonl").read_text().splitlines()]
    assert len(second) == len(first) == 16 and not set(first) & set(second)
    assert f"gen-pairs --model {out}/aligned " in p4.stdout
    assert f"--model {out}/aligned {r2}/pairs.jsonl -o {r2}/aligned" in p4.stdout
    assert f"eval --model {r2}/aligned --baseline" in p4.stdout
    assert "--samples-out" not in p4.stdout  # the base evals are kept
    assert json.loads((out / "metrics.json").read_text())["models"]
    # ONLINE=grpo: an online stage from round 2's model on the prompts after both rounds',
    # the rules reward plus the length term; the evaluation compares its model
    p5 = subprocess.run(["make", "-C", str(ROOT / "examples"), "demo-tiny", f"OUT={out}",
                         f"ALIGNKIT={ALIGNKIT}", "BETA=0.3", "ROUNDS=2", "ONLINE=grpo",
                         "ONLINE_STEPS=1", "ONLINE_BATCH=8"], capture_output=True, text=True,
                        env=env, timeout=600)
    assert p5.returncode == 0, p5.stdout[-3000:] + p5.stderr[-3000:]
    online = [json.loads(x)["id"] for x in
              (out / "online" / "train-prompts.jsonl").read_text().splitlines()]
    assert len(online) == 2 and not set(online) & (set(first) | set(second))
    assert f"train-policy --method grpo --model {r2}/aligned {out}/online/train-prompts" in p5.stdout
    assert "--reward rules --reward length:24:8 --reward-weights 1,0.25" in p5.stdout
    assert f"eval --model {out}/online/aligned --baseline" in p5.stdout
    assert "gen-pairs" not in p5.stdout and "--samples-out" not in p5.stdout
    man = json.loads((out / "online" / "aligned" / "alignkit.json").read_text())
    assert man["method"] == "grpo"


def _refresh(root: Path, cmd: str):
    env = {**os.environ, "ROOT": str(root), "REFRESH_CMD": cmd}
    return subprocess.run(["bash", str(ROOT / "examples" / "cron-refresh.sh")],
                          capture_output=True, text=True, env=env, timeout=60)


def test_cron_refresh_switches_only_complete_runs(tmp_path):
    root = tmp_path / "refresh"
    ok = 'mkdir -p "$RUN/aligned" && echo "{}" > "$RUN/aligned/alignkit.json"'
    p = _refresh(root, ok)
    assert p.returncode == 0, p.stderr
    first = os.readlink(root / "current")
    assert (root / "current" / "aligned" / "alignkit.json").exists()
    # a failing run leaves `current` untouched and exits non-zero
    p = _refresh(root, 'mkdir -p "$RUN/aligned"; echo half > "$RUN/aligned/model.safetensors"; exit 1')
    assert p.returncode != 0
    assert os.readlink(root / "current") == first
    # an incomplete run (no alignkit.json) is not switched to either
    p = _refresh(root, 'mkdir -p "$RUN/aligned"')
    assert p.returncode == 1 and os.readlink(root / "current") == first


def test_cron_refresh_lock(tmp_path):
    root = tmp_path / "refresh"
    root.mkdir()
    holder = subprocess.Popen(["flock", str(root / ".lock"), "sleep", "5"])
    try:
        import time
        time.sleep(0.5)
        p = _refresh(root, 'echo should-not-run; exit 1')
        assert p.returncode == 0 and "another refresh" in p.stderr
        assert not (root / "current").exists()
    finally:
        holder.kill()
