"""SIGKILL at random moments of training, then --resume: no OUT is left by a killed run
(only OUT.partial/), never both (a kill after OUT is published leaves at most a swept
temp), and the resumed run ends with the weights of an uninterrupted run
of the same seed (fp32 tiny model: max abs difference <= 1e-6), for train-policy
(offline and online), train-rm and distill."""
from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from alignkit.io import sweep_stale_temps
from conftest import write_jsonl

EXE = str(Path(sys.executable).parent / "alignkit")
COMMON = ["--dtype", "float32", "--seed", "5", "--save-steps", "1", "--batch-size", "4"]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    assert out, f"no weights in {folder}"
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _kill_loop(tmp_path: Path, args: list[str], steps: int, trials: int = 2, seed: int = 0) -> None:
    """Kill each trial once its k-th checkpoint appears (k random), after a random extra
    delay, so kills land mid-training, mid-checkpoint or in the final save."""
    ref = tmp_path / "ref"
    subprocess.run([EXE, *args, "-o", str(ref)], check=True, capture_output=True, timeout=600)
    want = _weights(ref)
    rng = random.Random(seed)
    resumed = 0
    for trial in range(trials):
        out = tmp_path / f"run{trial}"
        partial = tmp_path / f"run{trial}.partial"
        k = rng.randint(1, steps - 1)
        p = subprocess.Popen([EXE, *args, "-o", str(out)], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while p.poll() is None and time.monotonic() < deadline \
                and not (partial / f"checkpoint-{k}").exists():
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # it had finished: a complete folder
            assert (out / "alignkit.json").exists()
            # a kill inside the work folder's final deletion leaves it only under a temp
            # name, which the next write to OUT sweeps
            sweep_stale_temps(out)
        else:
            assert partial.exists()
            resumed += 1
            r = subprocess.run([EXE, *args, "-o", str(out), "--resume"], capture_output=True,
                               text=True, timeout=600)
            assert r.returncode == 0, r.stderr[-2000:]
        assert not partial.exists()
        assert _max_diff(_weights(out), want) <= 1e-6, trial
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers
    assert resumed >= 1, "no kill landed mid-training"


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kill")
    recs = [{"id": f"p{i}", "prompt": f"Question {i}?", "chosen": f"A good answer {i}.",
             "rejected": f"bad {i}"} for i in range(24)]
    return write_jsonl(d / "pairs.jsonl", recs)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    d = tmp_path_factory.mktemp("killp")
    return write_jsonl(d / "prompts.jsonl", [{"id": f"q{i}", "prompt": f"Say {i} things."}
                                             for i in range(16)])


def test_train_rm_killed_then_resumed_equals_uninterrupted(tmp_path, pairs, tiny_model):
    _kill_loop(tmp_path, ["train-rm", "--method", "bt", "--model", str(tiny_model), str(pairs),
                          "--max-steps", "8", "--lr", "1e-3", *COMMON], steps=8)


def test_train_policy_dpo_killed_then_resumed_equals_uninterrupted(tmp_path, pairs, tiny_model):
    _kill_loop(tmp_path, ["train-policy", "--method", "dpo", "--model", str(tiny_model),
                          str(pairs), "--max-steps", "8", "--lr", "1e-3", "--no-ref-cache",
                          *COMMON], steps=8)


def test_train_policy_grpo_killed_then_resumed_equals_uninterrupted(tmp_path, prompts, tiny_model):
    _kill_loop(tmp_path, ["train-policy", "--method", "grpo", "--model", str(tiny_model),
                          str(prompts), "--reward", "length:8:4", "--max-new-tokens", "8",
                          "--max-steps", "6", "--lr", "1e-3", *COMMON], steps=6)


def test_distill_killed_then_resumed_equals_uninterrupted(tmp_path, prompts, tiny_model,
                                                          tiny_model_b):
    _kill_loop(tmp_path, ["distill", "--method", "tvdpp", "--teacher", str(tiny_model_b),
                          "--student", str(tiny_model), str(prompts), "--max-new-tokens", "8",
                          "--max-steps", "6", "--lr", "1e-3", *COMMON], steps=6)
