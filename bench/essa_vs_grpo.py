"""ESSA against GRPO at equal wall time, on the tiny Llama (never SmolLM2 here).

Both start from the same LoRA "SFT" adapter: a random rank-4 adapter on q_proj, v_proj,
down_proj and lm_head, as in tests/test_essa.py. Here ESSA searches its 28 singular
values. GRPO trains every weight of the adapter merged into the tiny model (full
fine-tuning, lr 3e-2 as in tests/test_online.py), because TRL refuses a LoRA on lm_head.
So GRPO has far more free parameters than ESSA's 28. Both optimise the same reward: the share of the
most common character in the completion (`repeat`). They also share the prompts, the
temperature (0.3) and the max new tokens.

Steps:
1. ESSA runs `--generations G` in its own process, and its wall time T is measured.
2. GRPO first runs two calibrations (2 and 6 steps) to measure its start-up time and its
   seconds per step. It then runs as many steps as fit in T, start-up included.
3. Each final model and the initial adapter are scored on the same held-out sampling
   (every prompt, 4 samples, a fixed seed), giving the mean reward.

The JSON also has each run's training-time mean reward (the first and last quarter of
metrics.jsonl), the wall times and the machine (CPU model from `lscpu`).

    .venv/bin/python bench/essa_vs_grpo.py            # G = 30, bench/results/essa_vs_grpo_tiny.json
    .venv/bin/python bench/essa_vs_grpo.py --quick    # G = 8

`--adapter DIR` runs the same comparison on a real model instead: both methods start from
DIR, a LoRA adapter of SmolLM2 (the demo's DPO+SFT adapter, `examples/OUT/aligned`), and
optimise the `rules` reward on the first 64 demo training prompts (ESSA: popsize 6,
fitness batch 12; GRPO: the adapter itself trained, lr 1e-5 x 10 as for LoRA, batch 12,
4 generations); both sample 80 new tokens at temperature 0.7. The held-out number is the
mean `rules` score of 2 samples (seed 123) on each of the first 48 prompts of
examples/data/eval.jsonl. Writes bench/results/essa_vs_grpo_smollm2.json.

    .venv/bin/python bench/essa_vs_grpo.py --adapter examples/out/aligned --generations 10
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests"))

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color",
           "What is art", "Describe space", "Talk about music", "Give advice",
           "Explain rain", "Describe a cat", "Name a fruit", "Tell a story"]
COMMON = ["--reward", None, "--temperature", "0.3", "--max-new-tokens", "12", "--seed", "0"]


def alignkit(*args) -> float:
    """Run the CLI in its own process; its wall seconds."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t = time.time()
    subprocess.run([sys.executable, "-m", "alignkit", "--quiet", *map(str, args)], check=True,
                   env=env, stdout=subprocess.DEVNULL)
    return time.time() - t


def quarters(folder: Path, key: str) -> dict:
    vals = [r[key] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if r.get(key) is not None]
    k = max(1, len(vals) // 4)
    return {"first_quarter": sum(vals[:k]) / k, "last_quarter": sum(vals[-k:]) / k,
            "rows": len(vals)}


def held_out(folder: Path, reward) -> float:
    """Mean reward over every prompt x 4 samples (seed 123) from the model in `folder`."""
    from alignkit.generation import SampleParams, sample
    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(folder, "float32")  # an adapter stays unmerged
    out = sample(model, tok, PROMPTS, SampleParams(n=4, temperature=0.3, max_new_tokens=12,
                                                   seed=123))
    scores = reward(None, [s["text"] for row in out for s in row])
    return sum(scores) / len(scores)


def grpo_for(seconds: float, grpo: list, d: Path, short: int, long: int) -> dict:
    """GRPO run for about `seconds` of wall time, start-up included: two calibration runs
    (`short` and `long` steps) give the start-up time and the seconds per step."""
    t_s = alignkit(*grpo, "-o", d / f"calib{short}", "--max-steps", short)
    t_l = alignkit(*grpo, "-o", d / f"calib{long}", "--max-steps", long)
    per_step = max((t_l - t_s) / (long - short), 1e-3)
    startup = max(t_s - short * per_step, 0.0)  # loading, scorer, writing the folder
    steps = max(1, round((seconds - startup) / per_step))
    wall = alignkit(*grpo, "-o", d / "grpo", "--max-steps", steps)
    return {"wall_s": wall, "steps": steps, "startup_s": startup, "per_step_s": per_step}


def untied_merge(tiny: Path, adapter: Path, out: Path) -> None:
    """The adapter folded into the tiny model with lm_head untied from the embeddings
    first (merging a LoRA on a tied lm_head would change the input embeddings too)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_tokenizer
    base = AutoModelForCausalLM.from_pretrained(tiny)
    base.lm_head.weight = torch.nn.Parameter(base.get_input_embeddings().weight.detach().clone())
    base.config.tie_word_embeddings = False
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
    merged.save_pretrained(out)
    load_tokenizer(tiny).save_pretrained(out)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    from _common import machine
    return machine()["cpu"]


def rules_held_out(folder: Path, prompts: list[dict]) -> float:
    """Mean `rules` score over 2 samples (seed 123, temperature 0.7, 80 tokens) per prompt."""
    from alignkit.generation import SampleParams, sample
    from alignkit.models import load_causal_lm
    from alignkit.scorers import build_scorer
    model, tok = load_causal_lm(folder, "bfloat16", merged=True)
    out = sample(model, tok, [r["prompt"] for r in prompts],
                 SampleParams(n=2, temperature=0.7, max_new_tokens=80, seed=123))
    fn = build_scorer(["rules"]).reward_fn()
    scores = fn([r["prompt"] for r in prompts for _ in range(2)],
                [s["text"] for row in out for s in row],
                meta=[r.get("meta") for r in prompts for _ in range(2)])
    scores = [x for x in scores if x is not None]
    return sum(scores) / len(scores)


def real_model(adapter: Path, gens: int) -> dict:
    from _common import machine
    data = ROOT / "examples" / "data"
    train = [json.loads(x) for x in (data / "train.jsonl").read_text().splitlines()[:64]]
    held = [json.loads(x) for x in (data / "eval.jsonl").read_text().splitlines()[:48]]
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        prompts = d / "prompts.jsonl"
        prompts.write_text("".join(json.dumps(r) + "\n" for r in train))
        common = ["--reward", "rules", "--temperature", "0.7", "--max-new-tokens", "80",
                  "--seed", "0", "--dtype", "bfloat16"]
        t_essa = alignkit("train-policy", "--method", "essa", "--model", adapter, prompts,
                          "-o", d / "essa", "--generations", gens, "--popsize", 6,
                          "--fitness-batch", 12, *common)
        grpo = ["train-policy", "--method", "grpo", "--model", adapter, prompts,
                "--batch-size", 12, "--num-generations", 4, "--sample-every", 0, *common]
        g = grpo_for(t_essa, grpo, d, 1, 3)
        return {
            "model": f"SmolLM2-135M-Instruct + LoRA adapter {adapter}",
            "reward": "rules (the demo's verifiable checks)",
            "start": {"held_out_reward": rules_held_out(adapter, held)},
            "essa": {"wall_s": round(t_essa, 1), "generations": gens, "popsize": 6,
                     "fitness_batch": 12, "held_out_reward": rules_held_out(d / "essa", held),
                     "train_fitness_mean": quarters(d / "essa", "fitness_mean")},
            "grpo": {"wall_s": round(g["wall_s"], 1), "steps": g["steps"], "batch_size": 12,
                     "calibration": {"startup_s": round(g["startup_s"], 1),
                                     "per_step_s": round(g["per_step_s"], 2)},
                     "held_out_reward": rules_held_out(d / "grpo", held),
                     "train_reward": quarters(d / "grpo", "reward")},
            "machine": {**machine(), "cpu_lscpu": cpu_model()},
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--generations", type=int, default=None)
    ap.add_argument("--adapter", type=Path, default=None,
                    help="a SmolLM2 LoRA adapter folder: compare on the real model")
    args = ap.parse_args()
    if args.adapter is not None:
        result = real_model(args.adapter.resolve(), args.generations or 10)
        out = ROOT / "bench" / "results" / "essa_vs_grpo_smollm2.json"
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(json.dumps(result, indent=2))
        return
    gens = args.generations or (8 if args.quick else 30)

    from _common import machine
    from test_essa import REWARD, make_adapter
    from alignkit.models import build_tiny
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        os.environ["ALIGNKIT_HOME"] = str(d / "home")  # the merged bases stay in tmp
        (d / "m").mkdir()
        tiny = build_tiny(d / "m", seed=0)
        adapter = make_adapter(tiny, d / "sft-lora")
        (d / "rew.py").write_text(REWARD)
        ns: dict = {}
        exec(REWARD, ns)
        reward = ns["repeat"]
        prompts = d / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"id": f"q{i}", "prompt": p}) + "\n"
                                   for i, p in enumerate(PROMPTS)))
        common = [c if c is not None else f"python:{d / 'rew.py'}:repeat" for c in COMMON]

        t_essa = alignkit("train-policy", "--method", "essa", "--model", adapter, prompts,
                          "-o", d / "essa", "--generations", gens, "--popsize", 8,
                          "--fitness-batch", 8, "--sigma0", 0.5, "--es-lr", 1.0, *common)
        untied_merge(tiny, adapter, d / "sft-merged")
        grpo = ["train-policy", "--method", "grpo", "--model", d / "sft-merged", prompts,
                "--lr", "3e-2", "--batch-size", 16, "--sample-every", 0, *common]
        g = grpo_for(t_essa, grpo, d, 2, 6)

        result = {
            "model": "tiny-llama (alignkit.models.build_tiny, seed 0)",
            "reward": "repeat: share of the most common character",
            "start": {"held_out_reward": held_out(adapter, reward)},
            "essa": {"wall_s": round(t_essa, 2), "generations": gens, "popsize": 8,
                     "held_out_reward": held_out(d / "essa", reward),
                     "train_fitness_mean": quarters(d / "essa", "fitness_mean")},
            "grpo": {"wall_s": round(g["wall_s"], 2), "steps": g["steps"], "batch_size": 16,
                     "calibration": {"startup_s": round(g["startup_s"], 2),
                                     "per_step_s": round(g["per_step_s"], 3)},
                     "held_out_reward": held_out(d / "grpo", reward),
                     "train_reward": quarters(d / "grpo", "reward")},
            "machine": {**machine(), "cpu_lscpu": cpu_model()},
        }
    (ROOT / "bench" / "results" / "essa_vs_grpo_tiny.json").write_text(
        json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
