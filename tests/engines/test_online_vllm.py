"""Online `train-policy --engine vllm` on vLLM's CPU build (`make test-engines`).

What online training on the vLLM engine promises, checked on the tiny Llama with head
size 32 (vLLM's CPU attention has no 16), in fp32:
- grpo with LoRA and `--sync-every 1` trains and writes the adapter folder and valid
  samples.jsonl records (`gen.engine: vllm`);
- after each weight sync the engine's teacher-forced per-token log-probs of a fixed
  completion equal the HF policy's (`generation.token_logps`) within 1e-3, while the
  trained policy is further than that from the base: the sync loads the trained weights
  (LoRA folded in; full fine-tuning with `--sync-every 2`: syncs at steps 0 and 2 only);
- the same --seed gives the same samples.jsonl and weights;
- ipo-md, an adapter folder as --model, several processes and a head size vLLM's CPU
  attention lacks exit 2 before any engine starts, leaving no output.
Skipped where vllm is not importable (the main .venv); `make test` deselects the marker.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (make venv-vllm)")]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # a small KV cache (GiB)
os.environ.setdefault("ALIGNKIT_VLLM_ARGS", '{"enforce_eager": true}')  # no torch.compile

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"]
REWARD = '''
def short(prompts, completions, **kw):
    return [-len(c if isinstance(c, str) else c[0]["content"]) / 40.0 for c in completions]
'''
TOL = 1e-3  # per token, fp32
STEPS = 3


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("online_vllm")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    recs[3]["prompt"] = [{"role": "user", "content": PROMPTS[3]}]  # a message list too
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "reward": f"python:{d / 'rew.py'}:short"}


def _checked_sync(log: list):
    """`weight_sync.sync_to_engine`, then the engine against the HF policy it was given:
    per-token log-probs of one fixed completion (max |engine - HF|), and the HF values
    (to compare with the base's)."""
    from alignkit.generation import token_logps
    from alignkit.policy import weight_sync
    from alignkit.text import encode_pair, render_prompt
    real = weight_sync.sync_to_engine

    def sync(model, engine):
        real(model, engine)
        tok = engine.tok
        pair = encode_pair(tok, render_prompt(tok, "Say hello", None, False),
                           "Hello there, the sea is blue today.", True)
        hf = token_logps(model, [pair])[0]
        eng = engine.token_logps([pair])[0]
        base = None
        if hasattr(model, "disable_adapter"):  # LoRA: the base is the adapter disabled
            with model.disable_adapter():
                base = token_logps(model, [pair])[0]
        log.append({"diff": max(abs(a - b) for a, b in zip(hf, eng)), "hf": hf, "base": base})

    return sync


def _train(env, model, out, *flags, log=None) -> int:
    args = ["train-policy", "--method", "grpo", "--model", model, env["prompts"], "--reward",
            env["reward"], "-o", out, "--max-steps", STEPS, "--batch-size", 8,
            "--max-new-tokens", 8, "--sample-every", 1, "--engine", "vllm", *flags]
    if log is None:
        return run(args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("alignkit.policy.weight_sync.sync_to_engine", _checked_sync(log))
        return run(args)


LORA = ["--lora-r", 4, "--lr", "5e-2", "--sync-every", 1]


@pytest.fixture(scope="module")
def lora_run(env, vtiny):
    """grpo + LoRA on the engine, syncing at every step (the weights checked at each)."""
    out, log = env["dir"] / "lora", []
    assert _train(env, vtiny, out, *LORA, log=log) == 0
    return out, log


# --- (a) it trains and writes the folder and samples.jsonl --------------------------------------

def test_grpo_lora_on_vllm_writes_the_adapter_and_samples(lora_run, env, vtiny):
    from alignkit.records import validate
    out, _ = lora_run
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    assert not Path(str(out) + ".partial").exists()
    man = json.loads((out / "alignkit.json").read_text())
    assert man["method"] == "grpo"
    assert man["hyperparameters"]["engine"] == "vllm" and man["hyperparameters"]["sync_every"] == 1
    recs = read_jsonl(out / "samples.jsonl")
    assert sorted({r["step"] for r in recs}) == list(range(STEPS))
    assert len(recs) == STEPS * 2  # 8 completions per step = 2 prompts x 4
    prompts = {json.loads(x)["id"]: json.loads(x)["prompt"]
               for x in env["prompts"].read_text().splitlines()}
    for r in recs:
        validate(r, "samples")
        assert r["id"] == f"{r['prompt_id']}@{r['step']}" and r["prompt"] == prompts[r["prompt_id"]]
        assert r["gen"]["engine"] == "vllm" and r["gen"]["sync_every"] == 1
        assert len(r["completions"]) == 4
        for c in r["completions"]:
            text = c["text"] if isinstance(c["text"], str) else c["text"][0]["content"]
            assert isinstance(c["text"], list) == isinstance(r["prompt"], list)
            assert c["score"] == pytest.approx(-len(text) / 40.0, abs=1e-6)
            assert 1 <= c["n_tokens"] <= 8 and c["logp"] < 0 and c["logp_ref"] < 0
    # step 0: the engine holds the base (LoRA's B = 0), as the reference does
    step0 = [c for r in recs if r["step"] == 0 for c in r["completions"]]
    assert all(c["logp"] == pytest.approx(c["logp_ref"], abs=TOL * c["n_tokens"]) for c in step0)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "reward" in r]
    assert len(rows) == STEPS and all(r["engine/weights_age"] == 0 for r in rows)
    assert rows[-1]["kl_ref"] != 0.0


# --- (b) the sync loads the trained weights ---------------------------------------------------

def test_after_each_sync_the_engine_matches_the_hf_policy(lora_run):
    _, log = lora_run
    assert len(log) == STEPS  # --sync-every 1: before the sampling of every step
    assert all(x["diff"] <= TOL for x in log), [x["diff"] for x in log]
    moved = max(abs(a - b) for a, b in zip(log[-1]["hf"], log[-1]["base"]))
    assert moved > 10 * TOL, moved  # the trained policy is not the base: the sync mattered
    assert max(abs(a - b) for a, b in zip(log[0]["hf"], log[0]["base"])) <= 1e-6  # B = 0


def test_full_fine_tuning_syncs_every_k_steps(env, vtiny):
    """Full weights, --sync-every 2 over 4 steps: pushed at steps 0 and 2, and the
    samples of steps 1 and 3 come from weights one step old (`engine/weights_age`)."""
    out, log = env["dir"] / "full", []
    assert _train(env, vtiny, out, "--lr", "3e-3", "--sync-every", 2, "--max-steps", 4,
                  log=log) == 0
    assert (out / "model.safetensors").exists()
    assert len(log) == 2 and all(x["diff"] <= TOL for x in log), [x["diff"] for x in log]
    moved = max(abs(a - b) for a, b in zip(log[0]["hf"], log[1]["hf"]))
    assert moved > 10 * TOL, moved
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["engine/weights_age"] for r in rows if "reward" in r] == [0, 1, 0, 1]
    assert {r["step"] for r in read_jsonl(out / "samples.jsonl")} == {0, 1, 2, 3}
    man = json.loads((out / "alignkit.json").read_text())
    assert man["hyperparameters"]["sync_every"] == 2 and man["reference"]["kind"] == "base"


# --- (c) same seed, same samples -------------------------------------------------------------

def test_same_seed_same_samples(lora_run, env, vtiny):
    first, _ = lora_run
    again = env["dir"] / "lora-again"
    assert _train(env, vtiny, again, *LORA, log=[]) == 0
    a, b = ([{**r, "gen": {**r["gen"], "model": None}} for r in read_jsonl(o / "samples.jsonl")]
            for o in (first, again))
    assert a == b and len(a) == STEPS * 2
    assert ((first / "adapter_model.safetensors").read_bytes()
            == (again / "adapter_model.safetensors").read_bytes())


# --- (d) what the engine cannot do exits 2 -----------------------------------------------------

@pytest.mark.parametrize("case", ["ipo-md", "adapter", "processes", "head16"])
def test_refused_modes_exit_2(cli, env, vtiny, tiny_model, lora_run, tmp_path, monkeypatch, case):
    method, model, needle = "grpo", vtiny, ""
    if case == "ipo-md":
        method, needle = "ipo-md", "geometric mixture"
    elif case == "adapter":
        model, needle = lora_run[0], "PEFT adapter; merge it first"
    elif case == "processes":
        monkeypatch.setenv("WORLD_SIZE", "2")
        needle = "this run has 2 processes"
    else:  # the shared tiny fixture: head size 16
        model, needle = tiny_model, "head size 16 is not supported by vLLM's CPU attention"
    out = tmp_path / "m"
    r = cli(["train-policy", "--method", method, "--model", model, env["prompts"], "--reward",
             env["reward"], "-o", out, "--batch-size", 8, "--max-steps", 1, "--engine", "vllm"])
    assert r.code == 2, r
    assert needle in r.err and "--engine hf" in r.err, r.err
    assert not out.exists() and not Path(str(out) + ".partial").exists()
