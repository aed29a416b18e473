"""`gen-pairs --engine vllm` on vLLM's CPU build (`make venv-vllm`, then `make test-engines`).

What the vLLM engine promises, checked here on a tiny Llama (head size 32: vLLM's CPU
attention has no 16) and on the real SmolLM2-135M-Instruct, in fp32:
- `logp` is the temperature-1 log-probability of the completion's tokens, EOS included
  when it finished: per token equal to HF teacher forcing (`generation.token_logps`),
  and per record equal to `completion_logps` of the text (re-scored samples too);
- `n_tokens` counts the sampled tokens with the EOS, `finished` means it ended on EOS;
- same --seed -> the same records; a prompt's samples do not depend on the other
  prompts of the run (--shard); a different seed gives different samples;
- greedy decoding picks the HF engine's tokens;
- the modes vLLM cannot do exit 2; the manifest says engine vllm; stdout carries
  records only; `--help` imports neither vLLM nor torch.
Skipped where vllm is not importable (the main .venv); `make test` deselects the marker.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="vllm is not installed (make venv-vllm)")]

# a small KV cache (GiB) keeps the in-process engines light beside the rest of the run;
# the subprocess test below runs alignkit's own default instead
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# no torch.compile for the in-process engines (~10 s to ~2 min per start on 2 cores);
# the subprocess test runs vLLM's default (compiled) path
EAGER = '{"enforce_eager": true}'
os.environ.setdefault("ALIGNKIT_VLLM_ARGS", EAGER)

PROMPTS = [
    {"id": "a", "prompt": "Say hello.", "meta": {"topic": "x"}, "keep_me": [1, 2]},
    {"id": "b", "prompt": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Name a fruit."}]},
    {"id": "c", "prompt": "Describe the sea."},
    {"id": "d", "prompt": "What is 2+2?"},
    {"id": "e", "prompt": "Name a color."},
    {"id": "f", "prompt": "Tell me a joke."},
]
TOL = 1e-3  # per token, fp32 (seen: about 1e-6 on the tiny model, 5e-5 on SmolLM2)


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def gen(*args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", "gen-pairs", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def smollm2():
    from alignkit.models import pull
    home = os.environ.get("ALIGNKIT_TEST_REAL_HOME") or Path.home() / ".cache" / "alignkit"
    folder = Path(home) / "models" / "smollm2-135m-instruct"
    return folder if (folder / "config.json").exists() else pull("smollm2-135m-instruct")


@functools.lru_cache(maxsize=None)
def _hf(folder: str):
    from alignkit.models import load_causal_lm
    return load_causal_lm(folder, "float32")


def hf(folder):
    return _hf(str(folder))


# --- refusals (no engine starts) ---------------------------------------------------------------

@pytest.mark.parametrize("flags", [["--mixture", "REF"], ["--pair-with-reference", "REF"],
                                   ["--contrast-prompt", "ctx"]])
def test_modes_vllm_cannot_do_exit_2(cli, vtiny, tmp_path, flags):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "x", "chosen": "y",
                                              "meta": {"ctx": "x"}}])
    flags = [vtiny if f == "REF" else f for f in flags]
    args = ["gen-pairs", src, "--engine", "vllm", *flags, "-o", tmp_path / "o.jsonl"]
    if "--pair-with-reference" not in flags:
        args += ["--model", vtiny]
    r = cli(args)
    assert r.code == 2, r
    assert "--engine vllm supports plain sampling only" in r.err and "--engine hf" in r.err
    assert not (tmp_path / "o.jsonl").exists()


def test_head_size_vllm_cpu_lacks_is_a_clear_usage_error(cli, tiny_model, tmp_path):
    """The shared tiny fixture has head size 16: refused before the engine starts."""
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = cli(["gen-pairs", src, "--model", tiny_model, "--engine", "vllm", "-o", tmp_path / "o.jsonl"])
    assert r.code == 2, r
    assert "head size 16 is not supported by vLLM's CPU attention" in r.err
    assert "--engine hf" in r.err


def test_bad_alignkit_vllm_args_exit_2(cli, vtiny, tmp_path, monkeypatch):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    monkeypatch.setenv("ALIGNKIT_VLLM_ARGS", "[1]")
    r = cli(["gen-pairs", src, "--model", vtiny, "--engine", "vllm", "-o", tmp_path / "o.jsonl"])
    assert r.code == 2 and "ALIGNKIT_VLLM_ARGS must be a JSON object" in r.err, r


# --- the engine itself: per-token logp, finished, n_tokens, seeds --------------------------------

def _check_rows(engine, tok, prompts, groups, params, model):
    """Each sample against HF teacher forcing, token by token, and the finished/n_tokens
    bookkeeping."""
    from alignkit.generation import pad_id, token_logps
    from alignkit.text import encode_prompt, render_prompt
    worst = 0.0
    for p, group in zip(prompts, groups):
        assert len(group) == params.n
        ids = encode_prompt(tok, render_prompt(tok, p, None, False))
        tf = token_logps(model, [(ids, s["token_ids"]) for s in group], pad_id=pad_id(tok))
        for s, ref in zip(group, tf):
            t = s["token_ids"]
            assert s["n_tokens"] == len(t) == len(s["token_logps"]) >= 1
            assert s["finished"] == (t[-1] in engine.stops)
            assert not any(x in engine.stops for x in t[:-1])
            if not s["finished"]:
                assert len(t) == params.max_new_tokens
            content = t[:-1] if s["finished"] else t
            assert s["text"] == tok.decode(content, skip_special_tokens=True)
            diff = max(abs(a - b) for a, b in zip(s["token_logps"], ref))
            assert diff <= TOL, (s, ref)
            assert s["logp"] == pytest.approx(sum(ref), abs=TOL * len(t))
            worst = max(worst, diff)
    return worst


class TestTinyEngine:
    """One engine for these tests (class scope: it is closed before the next starts)."""

    @pytest.fixture(scope="class")
    def engine(self, vtiny):
        from alignkit.models import load_tokenizer
        from alignkit.vllm_engine import VllmEngine
        with VllmEngine(str(vtiny), load_tokenizer(vtiny), dtype="fp32", seed=0) as engine:
            yield engine

    def test_logp_is_teacher_forcing_per_token(self, engine, vtiny):
        from alignkit.generation import SampleParams
        prompts = [p["prompt"] for p in PROMPTS]
        params = SampleParams(n=3, temperature=1.0, max_new_tokens=12, seed=3)
        groups = engine.sample(prompts, params, keys=[p["id"] for p in PROMPTS], token_logps=True)
        _check_rows(engine, engine.tok, prompts, groups, params, hf(vtiny)[0])

    def test_seeds(self, engine):
        """Per-sample seeds: the same (seed, key, j) gives the same sample whatever else is
        in the batch; another seed or j gives another."""
        from alignkit.generation import SampleParams
        prompts, keys = [p["prompt"] for p in PROMPTS], [p["id"] for p in PROMPTS]
        params = SampleParams(n=2, temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=10, seed=7)
        ids = lambda groups: [[s["token_ids"] for s in g] for g in groups]  # noqa: E731
        full = ids(engine.sample(prompts, params, keys=keys))
        assert ids(engine.sample(prompts, params, keys=keys)) == full
        assert ids(engine.sample(prompts[2:4], params, keys=keys[2:4])) == full[2:4]
        assert ids(engine.sample(prompts[::-1], params, keys=keys[::-1])) == full[::-1]
        params.seed = 8
        assert ids(engine.sample(prompts, params, keys=keys)) != full
        assert full[0][0] != full[0][1]  # j is part of the seed

    def test_teacher_forcing_matches_hf(self, engine, vtiny):
        """The scorer gen-pairs re-scores non-canonical samples with."""
        from alignkit.generation import completion_logps
        from alignkit.text import render_prompt
        tok = engine.tok
        rendered = [render_prompt(tok, p["prompt"], None, False) for p in PROMPTS[:3]]
        texts = ["Hello there.", " sp\u00e9cial  spacing", "x"]
        eos = [True, False, True]
        ours = engine.completion_logps(rendered, texts, add_eos=eos, per_token=True)
        ref = completion_logps(hf(vtiny)[0], tok, rendered, texts, add_eos=eos, per_token=True)
        assert [len(x) for x in ours] == [len(x) for x in ref]
        for a, b in zip(ours, ref):
            assert max(abs(x - y) for x, y in zip(a, b)) <= TOL


# --- gen-pairs through vLLM on the tiny model -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny_runs(vtiny, tmp_path_factory):
    """gen-pairs --engine vllm twice with the same seed, and once on a shard."""
    d = tmp_path_factory.mktemp("vruns")
    src = write_jsonl(d / "p.jsonl", PROMPTS)
    common = [src, "--model", vtiny, "--engine", "vllm", "-n", 3, "--max-new-tokens", 16,
              "--temperature", "0.9", "--dtype", "fp32", "--seed", 5]
    runs = {}
    for name, extra in (("a", []), ("b", []), ("shard", ["--shard", "1/2"])):
        out = d / f"{name}.jsonl"
        assert gen(*common, *extra, "-o", out) == 0
        runs[name] = out
    return src, runs


def test_gen_pairs_vllm_records_and_manifest(tiny_runs, vtiny):
    from alignkit.models import model_sha256
    from alignkit.records import validate
    _, runs = tiny_runs
    recs = read_jsonl(runs["a"])
    assert [r["id"] for r in recs] == [p["id"] for p in PROMPTS]
    assert recs[0]["meta"] == {"topic": "x"} and recs[0]["keep_me"] == [1, 2]
    for r in recs:
        validate(r, "samples")
        assert len(r["completions"]) == 3
        assert r["gen"]["engine"] == "vllm" and r["gen"]["dtype"] == "fp32"
        assert r["gen"]["model_sha256"] == model_sha256(str(vtiny))
        for c in r["completions"]:
            assert 1 <= c["n_tokens"] <= 16 and isinstance(c["finished"], bool)
            if not c["finished"]:
                assert c["n_tokens"] == 16
    assert isinstance(recs[1]["completions"][0]["text"], list)  # a message-list prompt
    m = json.loads(Path(str(runs["a"]) + ".alignkit.json").read_text())
    assert m["gen"]["engine"] == "vllm" and m["options"]["engine"] == "vllm"
    assert m["counts"]["records_written"] == len(PROMPTS)
    assert m["counts"]["tokens"] == sum(c["n_tokens"] for r in recs for c in r["completions"])
    # a random tiny model emits ids that are not its text's own tokenization often:
    # the re-scoring path ran
    assert m["counts"]["samples_rescored"] > 0


def test_gen_pairs_vllm_logp_is_the_texts_teacher_forced_logp(tiny_runs, vtiny):
    """Every record's logp (sampled or re-scored) is the log-prob of its text as trainers
    tokenize it, EOS included when finished."""
    _check_records_logp(read_jsonl(tiny_runs[1]["a"]), vtiny)


def _check_records_logp(recs, folder):
    from alignkit.generation import completion_logps
    from alignkit.models import load_tokenizer
    from alignkit.text import completion_text, encode_completion, render_prompt
    tok, model = load_tokenizer(folder), hf(folder)[0]
    rendered, texts, eos, got = [], [], [], []
    for r in recs:
        for c in r["completions"]:
            rendered.append(render_prompt(tok, r["prompt"], None, False))
            texts.append(completion_text(c["text"]))
            eos.append(c["finished"])
            got.append(c["logp"])
    ref = completion_logps(model, tok, rendered, texts, add_eos=eos)
    for g, want, t, e in zip(got, ref, texts, eos):
        n = len(encode_completion(tok, t, e))
        assert g == pytest.approx(want, abs=TOL * max(n, 1)), (t, g, want)


def test_gen_pairs_vllm_same_seed_same_records(tiny_runs):
    _, runs = tiny_runs
    assert runs["a"].read_bytes() == runs["b"].read_bytes()


def test_gen_pairs_vllm_shard_has_the_full_runs_samples(tiny_runs):
    from alignkit.io import in_shard
    _, runs = tiny_runs
    full = {r["id"]: r for r in read_jsonl(runs["a"])}
    shard = read_jsonl(runs["shard"])
    assert shard and [r["id"] for r in shard] == [k for k in full if in_shard(k, (1, 2))]
    for r in shard:
        for c, f in zip(r["completions"], full[r["id"]]["completions"]):
            assert (c["text"], c["n_tokens"], c["finished"]) == (f["text"], f["n_tokens"], f["finished"])
            assert c["logp"] == pytest.approx(f["logp"], abs=1e-4)


def test_gen_pairs_vllm_stdout_is_records_only_and_default_engine_args(tiny_runs, vtiny, tmp_path):
    """The real console script in a fresh process, with alignkit's defaults (no
    ALIGNKIT_VLLM_ARGS, no VLLM_CPU_KVCACHE_SPACE: vLLM compiles the model), -o -:
    vLLM's log goes to stderr, stdout has the records (the in-process runs' samples)."""
    src, runs = tiny_runs
    env = {k: v for k, v in os.environ.items()
           if k not in ("ALIGNKIT_VLLM_ARGS", "VLLM_CPU_KVCACHE_SPACE")}
    exe = Path(sys.executable).with_name("alignkit")
    p = subprocess.run([str(exe), "gen-pairs", str(src), "--model", str(vtiny), "--engine", "vllm",
                        "-n", "3", "--max-new-tokens", "16", "--temperature", "0.9", "--dtype",
                        "fp32", "--seed", "5"], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    recs = [json.loads(x) for x in p.stdout.splitlines()]  # nothing else on stdout
    want = read_jsonl(runs["a"])
    assert [r["id"] for r in recs] == [r["id"] for r in want]
    for r, w in zip(recs, want):  # compiled vs eager: the same samples up to round-off
        for c, f in zip(r["completions"], w["completions"]):
            assert (c["text"], c["finished"]) == (f["text"], f["finished"])
            assert c["logp"] == pytest.approx(f["logp"], abs=1e-3 * c["n_tokens"])


def test_help_imports_neither_vllm_nor_torch():
    code = ("import sys\nfrom alignkit import cli\n"
            "try:\n    cli.main(['gen-pairs', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('HEAVY', sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "--engine" in p.stdout and "HEAVY []" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]


# --- SmolLM2 ---------------------------------------------------------------------------------------

SMOL_PROMPTS = ["Say hello.", "What is the capital of France?", "Name three colors."]


@pytest.fixture
def smol_engine(smollm2):
    from alignkit.models import load_tokenizer
    from alignkit.vllm_engine import VllmEngine
    tok = load_tokenizer(smollm2)
    with VllmEngine(str(smollm2), tok, dtype="fp32", seed=0) as engine:
        yield engine, tok


def test_smollm2_engine_logp_is_teacher_forcing_and_greedy_is_hfs(smol_engine, smollm2):
    from alignkit.generation import SampleParams, sample
    engine, tok = smol_engine
    model = hf(smollm2)[0]
    keys = [str(i) for i in range(len(SMOL_PROMPTS))]
    params = SampleParams(n=2, temperature=0.7, max_new_tokens=24, seed=0)
    groups = engine.sample(SMOL_PROMPTS, params, keys=keys, token_logps=True)
    worst = _check_rows(engine, tok, SMOL_PROMPTS, groups, params, model)
    flags = [s["finished"] for g in groups for s in g]
    assert any(flags) and not all(flags)  # both kinds checked
    assert all(s["text"].strip() and "<|im_end|>" not in s["text"] for g in groups for s in g)
    print(f"SmolLM2 fp32: worst per-token |vLLM - HF teacher forcing| = {worst:.2e}")
    greedy = SampleParams(n=1, temperature=0.0, max_new_tokens=24)
    v = engine.sample(SMOL_PROMPTS, greedy, keys=keys)
    h = sample(model, tok, SMOL_PROMPTS, greedy, keys=keys, return_ids=True)
    assert [g[0]["token_ids"] for g in v] == [g[0]["token_ids"] for g in h]
    for a, b in zip(v, h):
        assert a[0]["logp"] == pytest.approx(b[0]["logp"], abs=TOL * a[0]["n_tokens"])


def test_smollm2_gen_pairs_vllm(smollm2, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"s{i}", "prompt": p}
                                             for i, p in enumerate(SMOL_PROMPTS)])
    out = tmp_path / "s.jsonl"
    assert gen(src, "--model", smollm2, "--engine", "vllm", "-n", 2, "--max-new-tokens", 24,
               "--dtype", "fp32", "-o", out) == 0
    recs = read_jsonl(out)
    assert [r["id"] for r in recs] == ["s0", "s1", "s2"]
    texts = [c["text"] for r in recs for c in r["completions"]]
    assert all(t.strip() and "<|im_end|>" not in t for t in texts)
    assert "Paris" in " ".join(c["text"] for c in recs[1]["completions"])
    _check_records_logp(recs, smollm2)
    m = json.loads(Path(str(out) + ".alignkit.json").read_text())
    assert m["gen"]["engine"] == "vllm" and m["gen"]["model"] == str(smollm2)
