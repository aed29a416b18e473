"""`--engine ray-vllm --replicas N` on a local Ray cluster of CPU replicas (`make
test-engines`, in `.venv-vllm`, which has vLLM's CPU build and Ray).

The promise: N replicas write the records one vLLM engine writes, in the same order
(every sample has its own seed, so the replica that drew it does not matter), through
gen-pairs (with `--resume-from`) and eval. The cluster is started here with `ray start
--head --num-cpus 2` and reached through RAY_ADDRESS, as a user's cluster would be.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None
                                 or importlib.util.find_spec("ray") is None,
                                 reason="vllm and ray are not installed (make venv-vllm)")]

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("ALIGNKIT_VLLM_ARGS", '{"enforce_eager": true}')

PROMPTS = [{"id": f"p{i}", "prompt": text} for i, text in enumerate([
    "Say hello.", "Name a fruit.", "Describe the sea.", "What is 2+2?", "Name a color.",
    "Tell me a joke.", "Write one word.", "Count to three."])]
COMMON = ["-n", "2", "--max-new-tokens", "12", "--temperature", "0.9", "--dtype", "fp32",
          "--seed", "3"]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def run(*args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A local two-CPU Ray cluster, reached through RAY_ADDRESS; stopped afterwards."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    tmp = tmp_path_factory.mktemp("ray")
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    p = subprocess.run([ray_bin, "start", "--head", "--num-cpus", "2", "--include-dashboard",
                        "false", "--port", "0", "--temp-dir", str(tmp), "--disable-usage-stats"],
                       env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    import re
    m = re.search(r"--address='([^']+)'", p.stdout + p.stderr)
    assert m, p.stdout[-2000:]
    old = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = m.group(1)
    yield m.group(1)
    if old is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = old
    subprocess.run([ray_bin, "stop", "--force"], env=env, capture_output=True, timeout=120)
    shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def runs(vtiny, ray_cluster, tmp_path_factory):
    """gen-pairs with one in-process vLLM engine, with 2 Ray replicas, and 2 replicas
    resuming from the first three records of the one-engine run."""
    d = tmp_path_factory.mktemp("rayruns")
    src = write_jsonl(d / "p.jsonl", PROMPTS)
    out = {}
    assert run("gen-pairs", src, "--model", vtiny, "--engine", "vllm", *COMMON,
               "-o", d / "one.jsonl") == 0
    out["one"] = d / "one.jsonl"
    assert run("gen-pairs", src, "--model", vtiny, "--engine", "ray-vllm", "--replicas", 2,
               *COMMON, "-o", d / "two.jsonl") == 0
    out["two"] = d / "two.jsonl"
    part = d / "part.jsonl"
    part.write_text("".join(out["one"].read_text().splitlines(keepends=True)[:3]))
    assert run("gen-pairs", src, "--model", vtiny, "--engine", "ray-vllm", "--replicas", 2,
               *COMMON, "--resume-from", part, "-o", d / "resumed.jsonl") == 0
    out["resumed"] = d / "resumed.jsonl"
    return out


def _same_records(got: list[dict], want: list[dict]) -> None:
    assert [r["id"] for r in got] == [r["id"] for r in want]
    for r, w in zip(got, want):
        assert {k: v for k, v in r.items() if k != "completions"} == \
               {k: v for k, v in w.items() if k != "completions"}
        assert len(r["completions"]) == len(w["completions"])
        for c, f in zip(r["completions"], w["completions"]):
            assert (c["text"], c["n_tokens"], c["finished"]) == (f["text"], f["n_tokens"], f["finished"])
            assert c["logp"] == pytest.approx(f["logp"], abs=1e-4)


def test_two_replicas_write_the_one_engine_records(runs):
    one, two = read_jsonl(runs["one"]), read_jsonl(runs["two"])
    assert len(one) == len(PROMPTS)
    _same_records(two, one)
    assert all(r["gen"]["engine"] == "vllm" for r in two)
    m = json.loads(Path(str(runs["two"]) + ".alignkit.json").read_text())
    assert m["options"]["engine"] == "ray-vllm" and m["options"]["replicas"] == 2
    assert m["counts"]["records_written"] == len(PROMPTS)


def test_two_replicas_resume_a_partial_file(runs):
    resumed = read_jsonl(runs["resumed"])
    _same_records(resumed, read_jsonl(runs["one"]))
    m = json.loads(Path(str(runs["resumed"]) + ".alignkit.json").read_text())
    assert m["counts"]["records_copied"] == 3 and m["counts"]["prompts_sampled"] == len(PROMPTS) - 3


def test_eval_samples_with_two_replicas_as_with_one_engine(vtiny, ray_cluster, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:5])
    common = ["eval", src, "--model", vtiny, "--max-new-tokens", 10, "--dtype", "fp32",
              "--no-kl", "--scorer", "length"]
    assert run(*common, "--engine", "vllm", "--samples-out", tmp_path / "one.jsonl") == 0
    assert run(*common, "--engine", "ray-vllm", "--replicas", 2,
               "--samples-out", tmp_path / "two.jsonl") == 0
    one, two = read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "two.jsonl")
    _same_records(two, one)
    assert all(c["score"] == f["score"] for r, w in zip(two, one)
               for c, f in zip(r["completions"], w["completions"]))
    assert one[0]["gen"]["engine"] == "vllm"


def test_replicas_without_ray_vllm_and_too_many_replicas_exit_2(vtiny, ray_cluster, tmp_path,
                                                               capsys):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    assert run("gen-pairs", src, "--model", vtiny, "--replicas", 2, "-o", tmp_path / "a.jsonl") == 2
    assert "--replicas needs --engine ray-vllm" in capsys.readouterr().err
    assert run("gen-pairs", src, "--model", vtiny, "--engine", "ray-vllm", "--replicas", 3,
               "-o", tmp_path / "b.jsonl") == 2
    assert "needs at least 3 CPUs" in capsys.readouterr().err
    assert not (tmp_path / "a.jsonl").exists() and not (tmp_path / "b.jsonl").exists()


def test_an_error_in_a_replica_is_the_engines_own_message(tiny_model, ray_cluster, tmp_path,
                                                          capsys):
    """The shared tiny model has head size 16, which vLLM's CPU attention lacks: the
    replicas refuse it as the in-process engine does (exit 2, no output)."""
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    out = tmp_path / "o.jsonl"
    assert run("gen-pairs", src, "--model", tiny_model, "--engine", "ray-vllm", "--replicas", 2,
               "-o", out) == 2
    assert "head size 16 is not supported" in capsys.readouterr().err
    assert not out.exists()
