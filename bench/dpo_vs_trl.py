"""DPO: `alignkit train-policy --method dpo` against a plain TRL DPOTrainer script.

The same DPO run (same pairs, model, LoRA, batch size, learning rate, max length, seed,
bf16 autocast, no gradient checkpointing) three ways, each in its own process so that
peak RSS is per run:

- baseline: the script a TRL user writes (conversational dataset, `DPOTrainer` with a
  `peft_config`; the reference log-probs come from the adapter-disabled model inside
  every training step, TRL's default);
- alignkit cold: `train-policy` on an empty reference cache (one reference pass over
  the first epoch's batches before training, then training without reference forwards;
  both passes run each batch in length groups, see `dpo_trainer.LengthChunked`);
- alignkit warm: the rerun, or a second method on the same data (reference log-probs
  read from the cache; records that carry gen-pairs' `logp` skip the pass the same way).

Reported: training tokens/s (the trainer's `num_tokens` over its `train_runtime`; for
the cold run the reference pass time is added), tokens per CPU-second of the process
(steadier than wall time on a shared machine), peak RSS, and the loss at step 1 (with a
fresh LoRA adapter the policy is the reference, so both must give ln 2). `ratio` is
alignkit (warm) over the baseline; `ratio_cold` the same for the cold run.

    .venv/bin/python bench/dpo_vs_trl.py            # tiny-llama and smollm2-135m-instruct
    .venv/bin/python bench/dpo_vs_trl.py --quick    # tiny-llama, < 1 min
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "bench" / "results" / "dpo_vs_trl.json"

TOPICS = ["cooking rice", "planting tomatoes", "learning Python", "saving money", "sleeping well",
          "running a first marathon", "writing a cover letter", "keeping a houseplant alive",
          "studying for an exam", "travelling on a budget", "making cold brew coffee",
          "starting a vegetable garden", "learning to swim", "reducing screen time"]
GOOD = ["Start small and be consistent: a little every day beats a lot once a week.",
        "Plan ahead, write the steps down and check them off as you go.",
        "Measure what you do so that you can see what works and change what does not.",
        "Ask someone with experience for feedback early; it saves weeks of trial and error.",
        "Rest matters as much as effort, so schedule breaks before you need them.",
        "Keep the tools you need within reach and put away everything that distracts you.",
        "When something fails, change one thing at a time and try again."]
BAD = ["Just do it.", "It depends.", "Look it up online.", "Nobody really knows.",
       "Try harder, I guess.", "That is not very important."]


def make_pairs(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        k = rng.randint(3, 6)
        chosen = f"Here are {k} tips for {topic}:\n" + "\n".join(
            f"{j + 1}. {s}" for j, s in enumerate(rng.sample(GOOD, k)))
        rejected = " ".join(rng.sample(BAD, rng.randint(1, 3)))
        pairs.append({"id": f"b{i}", "prompt": f"Give me some practical tips for {topic}.",
                      "chosen": chosen, "rejected": rejected})
    return pairs


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _tokens_and_time(log_history: list[dict]) -> tuple[float, float]:
    tokens = max(row.get("num_tokens", 0) for row in log_history)
    runtime = next(row["train_runtime"] for row in reversed(log_history) if "train_runtime" in row)
    return float(tokens), float(runtime)


# --- workers (one process each) ------------------------------------------------------------

def worker_trl(cfg: dict, data: str, out: str) -> dict:
    """The plain TRL script a user would write for this run."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in open(data)]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]}
                                 for r in rows])
    tok = AutoTokenizer.from_pretrained(cfg["model_path"])
    dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(cfg["model_path"], dtype=dtype)
    args = DPOConfig(output_dir=out, per_device_train_batch_size=cfg["batch_size"],
                     learning_rate=cfg["lr"], num_train_epochs=1, max_length=cfg["max_length"],
                     beta=0.1, bf16=cfg["dtype"] == "bfloat16", logging_steps=1,
                     gradient_checkpointing=False, save_strategy="no", report_to=[],
                     use_cpu=True, seed=0, disable_tqdm=True)
    peft = LoraConfig(r=cfg["lora_r"], lora_alpha=16, lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = DPOTrainer(model=model, args=args, train_dataset=dataset, processing_class=tok,
                         peft_config=peft)
    c0 = time.process_time()
    trainer.train()
    cpu = time.process_time() - c0
    tokens, runtime = _tokens_and_time(trainer.state.log_history)
    first = trainer.state.log_history[0]
    return {"tokens": tokens, "train_runtime_s": runtime, "ref_pass_s": 0.0,
            "train_cpu_s": cpu, "ref_pass_cpu_s": 0.0,
            "loss_step1": first["loss"], "logps_chosen_step1": first["logps/chosen"],
            "steps": trainer.state.global_step}


def worker_alignkit(cfg: dict, data: str, out: str) -> dict:
    """`alignkit train-policy --method dpo ...`, in this process, timing the reference pass."""
    from alignkit import cli
    from alignkit.policy import common, dpo_trainer

    spent = {"ref_pass_s": 0.0, "ref_pass_cpu_s": 0.0, "train_cpu_s": 0.0}

    def timed(fn, wall_key, cpu_key):
        def wrapper(*a, **kw):
            t0, c0 = time.time(), time.process_time()
            try:
                return fn(*a, **kw)
            finally:
                if wall_key:
                    spent[wall_key] += time.time() - t0
                spent[cpu_key] += time.process_time() - c0
        return wrapper

    dpo_trainer.AlignkitDPOTrainer._reference_pass = timed(
        dpo_trainer.AlignkitDPOTrainer._reference_pass, "ref_pass_s", "ref_pass_cpu_s")
    common.run_trainer = timed(common.run_trainer, None, "train_cpu_s")
    args = ["--quiet", "train-policy", "--method", "dpo", "--model", cfg["model_path"], data, "-o", out,
            "--lora-r", str(cfg["lora_r"]), "--dtype", cfg["dtype"], "--batch-size",
            str(cfg["batch_size"]), "--lr", str(cfg["lr"]), "--max-length", str(cfg["max_length"]),
            "--force"]
    code = cli.main(args)
    if code != 0:
        raise SystemExit(f"alignkit exited {code}")
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    tokens, runtime = _tokens_and_time(rows)
    ref = json.loads((Path(out) / "alignkit.json").read_text())["reference"]
    return {"tokens": tokens, "train_runtime_s": runtime, **spent,
            "loss_step1": rows[0]["loss"], "logps_chosen_step1": rows[0]["logps/chosen"],
            "steps": max(r["step"] for r in rows), "reference": {k: ref.get(k) for k in
                                                                 ("from_records", "from_cache", "computed")}}


def _worker_main(argv: list[str]) -> None:
    kind, cfg_json, data, out = argv
    cfg = json.loads(cfg_json)
    if cfg.get("threads"):
        import torch
        torch.set_num_threads(cfg["threads"])
    t0 = time.time()
    res = (worker_trl if kind == "trl" else worker_alignkit)(cfg, data, out)
    res["wall_s"] = round(time.time() - t0, 2)
    res["load_avg_1min_at_end"] = os.getloadavg()[0]
    res["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    print("RESULT " + json.dumps(res), flush=True)


# --- driver ----------------------------------------------------------------------------------

def _run_worker(kind: str, cfg: dict, data: Path, out: Path, home: Path) -> dict:
    env = {**os.environ, "ALIGNKIT_HOME": str(home), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DISABLE_TQDM": "1"}
    p = subprocess.run([sys.executable, __file__, "--worker", kind, json.dumps(cfg), str(data),
                        str(out)], capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((l for l in p.stdout.splitlines() if l.startswith("RESULT ")), None)
    if p.returncode != 0 or line is None:
        raise SystemExit(f"{kind} worker failed ({p.returncode}):\n{p.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def _side(res: dict, with_ref_pass: bool = False) -> dict:
    seconds = res["train_runtime_s"] + (res["ref_pass_s"] if with_ref_pass else 0.0)
    cpu = res["train_cpu_s"] + (res["ref_pass_cpu_s"] if with_ref_pass else 0.0)
    return {"tokens_per_s": round(res["tokens"] / seconds, 2), "peak_rss_mb": res["peak_rss_mb"],
            "tokens_per_cpu_s": round(res["tokens"] / cpu, 2),
            "train_cpu_s": round(res["train_cpu_s"], 2), "ref_pass_cpu_s": round(res["ref_pass_cpu_s"], 2),
            "load_avg_1min_at_end": res["load_avg_1min_at_end"],
            "tokens": res["tokens"], "train_runtime_s": round(res["train_runtime_s"], 2),
            "ref_pass_s": round(res["ref_pass_s"], 2), "wall_s": res["wall_s"],
            "loss_step1": res["loss_step1"], "logps_chosen_step1": res["logps_chosen_step1"],
            "steps": res["steps"], **({"reference": res["reference"]} if "reference" in res else {})}


def _ratio(a: dict, b: dict) -> dict:
    return {k: round(a[k] / b[k], 3) for k in ("tokens_per_s", "peak_rss_mb", "tokens_per_cpu_s")}


def bench_one(model: str, n_pairs: int, max_length: int, lora_r: int, batch_size: int,
              dtype: str, threads: int, tmp: Path) -> dict:
    from alignkit.models import pull
    path = pull(model)  # from the user's cache ($ALIGNKIT_HOME); built/converted once
    cfg = {"model": model, "model_path": str(path), "pairs": n_pairs, "max_length": max_length,
           "lora_r": lora_r, "batch_size": batch_size, "dtype": dtype, "lr": 1e-5, "beta": 0.1,
           "epochs": 1, "gradient_checkpointing": False, "seed": 0, "threads": threads or None}
    work = tmp / model
    work.mkdir(parents=True)
    data = work / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in make_pairs(n_pairs)))
    home = work / "home"  # an empty reference cache
    print(f"[{model}] TRL baseline ...", file=sys.stderr, flush=True)
    base = _run_worker("trl", cfg, data, work / "trl", home)
    print(f"[{model}] alignkit (cold cache) ...", file=sys.stderr, flush=True)
    cold = _run_worker("alignkit", cfg, data, work / "ak_cold", home)
    print(f"[{model}] alignkit (warm cache) ...", file=sys.stderr, flush=True)
    warm = _run_worker("alignkit", cfg, data, work / "ak_warm", home)
    baseline, ak, ak_cold = _side(base), _side(warm), _side(cold, with_ref_pass=True)
    return {"config": cfg, "alignkit": ak, "alignkit_cold": ak_cold, "baseline": baseline,
            "ratio": _ratio(ak, baseline), "ratio_cold": _ratio(ak_cold, baseline),
            "loss_step1_abs_diff": abs(ak["loss_step1"] - baseline["loss_step1"]),
            "loss_step1_abs_diff_cold": abs(ak_cold["loss_step1"] - baseline["loss_step1"])}


def _machine() -> dict:
    from _common import machine
    return {**machine(), "load_avg_1min_at_start": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        _worker_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny-llama, 16 pairs (< 1 min)")
    ap.add_argument("--models", default="tiny-llama,smollm2-135m-instruct")
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads per run (0: torch's default); 1 gives steadier numbers "
                         "on a CPU shared with other work")
    ap.add_argument("--output", default=str(RESULT))
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.pairs, a.max_length = "tiny-llama", 16, 128
    machine = _machine()
    runs = []
    with tempfile.TemporaryDirectory(prefix="dpo_vs_trl.") as tmp:
        for model in a.models.split(","):
            runs.append(bench_one(model, a.pairs, a.max_length, a.lora_r, a.batch_size, a.dtype,
                                  a.threads, Path(tmp)))
    main_run = runs[-1]  # the real model when both run
    result = {"name": "dpo_vs_trl", "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
              "machine": machine, "quick": a.quick, **main_run, "runs": runs}
    if not a.quick or a.output != str(RESULT):
        Path(a.output).parent.mkdir(parents=True, exist_ok=True)
        Path(a.output).write_text(json.dumps(result, indent=2) + "\n")
    for r in runs:
        print(f"{r['config']['model']}: tokens/s x{r['ratio']['tokens_per_s']} "
              f"(cold x{r['ratio_cold']['tokens_per_s']}), peak RSS x{r['ratio']['peak_rss_mb']}, "
              f"step-1 loss {r['alignkit']['loss_step1']:.6f} vs {r['baseline']['loss_step1']:.6f}",
              file=sys.stderr)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
