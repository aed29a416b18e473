"""merge-soup: every method against its formula on tiny models, streaming I/O (sharded
inputs and outputs), tied embeddings, PEFT adapters, refusals with exit 2, provenance."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from alignkit import soup
from alignkit.models import build_tiny, model_sha256


def state(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def assert_same(got: dict, want: dict, atol: float = 2e-6):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=1e-5, atol=atol, msg=k)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tiny_model, tiny_model_b):
    """Four tiny Llamas with one tokenizer: a, b, c to merge and a base."""
    root = tmp_path_factory.mktemp("zoo")
    models = {"a": tiny_model, "b": tiny_model_b}
    for name, seed in (("c", 2), ("base", 3)):
        (root / name).mkdir()
        models[name] = build_tiny(root / name, seed=seed)
    models["sd"] = {k: state(v) for k, v in list(models.items())}
    return models


def run(cli, tmp_path, *args, out="out"):
    r = cli(["merge-soup", *map(str, args), "-o", tmp_path / out])
    assert r.code == 0, r
    return tmp_path / out


# --- the formulas -------------------------------------------------------------------------

def test_linear_weighted_and_uniform(cli, tmp_path, zoo):
    sa, sb, sc = (zoo["sd"][k] for k in "abc")
    out = run(cli, tmp_path, "--method", "linear", zoo["a"], zoo["b"], zoo["c"], "--weights", "1,2,3")
    assert_same(state(out), {k: (sa[k] + 2 * sb[k] + 3 * sc[k]) / 6 for k in sa})
    out = run(cli, tmp_path, "--method", "uniform", zoo["a"], zoo["b"], zoo["c"], out="u")
    assert_same(state(out), {k: torch.stack([sa[k], sb[k], sc[k]]).mean(0) for k in sa})
    out = run(cli, tmp_path, "--method", "linear", "--no-normalize", zoo["a"], zoo["b"],
              "--weights", "0.5 -0.25", out="n")
    assert_same(state(out), {k: 0.5 * sa[k] - 0.25 * sb[k] for k in sa})


def _slerp(v0, v1, t):
    a, b = v0.double(), v1.double()
    dot = float((a * b).sum() / (a.norm() * b.norm()))
    if abs(dot) > 0.9995:
        return ((1 - t) * a + t * b).float()
    om = math.acos(dot)
    return ((math.sin((1 - t) * om) * a + math.sin(t * om) * b) / math.sin(om)).float()


def test_slerp_formula_and_endpoints(cli, tmp_path, zoo):
    sa, sb = zoo["sd"]["a"], zoo["sd"]["b"]
    out = run(cli, tmp_path, "--method", "slerp", "--t", "0.3", zoo["a"], zoo["b"])
    assert_same(state(out), {k: _slerp(sa[k], sb[k], 0.3) for k in sa})
    # t = 0 / 1 give the inputs exactly; --base is the first endpoint
    for t, want in (("0", sa), ("1", sb)):
        got = state(run(cli, tmp_path, "--method", "slerp", "--t", t, "--base", zoo["a"], zoo["b"], out=t))
        assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    # parallel tensors (the norm weights, all ones) take the lerp branch
    assert torch.equal(state(out)["model.norm.weight"], sa["model.norm.weight"])


def test_task_arithmetic(cli, tmp_path, zoo):
    s0, sa, sb = zoo["sd"]["base"], zoo["sd"]["a"], zoo["sd"]["b"]
    out = run(cli, tmp_path, "--method", "task-arithmetic", "--base", zoo["base"], zoo["a"], zoo["b"],
              "--weights", "0.7,0.2", "--lambda", "0.5")
    assert_same(state(out), {k: s0[k] + 0.5 * (0.7 * (sa[k] - s0[k]) + 0.2 * (sb[k] - s0[k])) for k in s0})


def _trim(tau, density):
    n = tau.numel()
    k = int(density * n + 0.5)
    if k >= n:
        return tau
    thr = tau.abs().flatten().kthvalue(n - k + 1).values
    return tau * (tau.abs() >= thr)


def _ties(taus, weights, sign, normalize=True):
    wt = [w * t for w, t in zip(weights, taus)]
    votes = sum(wt) if sign == "sum" else sum(torch.sign(t) for t in wt)
    gamma = torch.where(votes >= 0, 1.0, -1.0)
    agree = [torch.sign(t) == gamma for t in wt]
    merged = sum(t * m for t, m in zip(wt, agree))
    div = sum(w * m.float() for w, m in zip(weights, agree))
    return merged / torch.where(div == 0, 1.0, div) if normalize else merged


@pytest.mark.parametrize("sign", ["sum", "count"])
def test_ties(cli, tmp_path, zoo, sign):
    s0 = zoo["sd"]["base"]
    models = [zoo["sd"][k] for k in "abc"]
    w = [1.0, 0.5, 2.0]
    out = run(cli, tmp_path, "--method", "ties", "--base", zoo["base"], zoo["a"], zoo["b"], zoo["c"],
              "--weights", "1,0.5,2", "--density", "0.3", "--sign", sign, "--lambda", "0.8")
    want = {k: s0[k] + 0.8 * _ties([_trim(m[k] - s0[k], 0.3) for m in models], w, sign) for k in s0}
    got = state(out)
    assert_same(got, want)
    # the trim really keeps about 30% of each task vector
    tau = got["model.layers.0.mlp.up_proj.weight"] - s0["model.layers.0.mlp.up_proj.weight"]
    assert 0.3 <= (tau != 0).float().mean() <= 0.7
    again = run(cli, tmp_path, "--method", "ties", "--base", zoo["base"], zoo["a"], zoo["b"], zoo["c"],
                "--weights", "1,0.5,2", "--density", "0.3", "--sign", sign, "--lambda", "0.8", out="again")
    assert (out / "model.safetensors").read_bytes() == (again / "model.safetensors").read_bytes()


def _dare(name, models, s0, seed, density, rescale):
    out = []
    for i, m in enumerate(models):
        tau = m[name] - s0[name]
        mask = soup.dare_mask(seed, name, i, tau.shape, density)
        kept = tau * mask
        if rescale == "density":
            kept = kept / density
        elif rescale == "l1" and kept.abs().sum() > 0:
            kept = kept * (tau.abs().sum(dtype=torch.float64) / kept.abs().sum(dtype=torch.float64)).float()
        out.append(kept)
    return out


@pytest.mark.parametrize("rescale", ["density", "l1", "none"])
def test_dare_linear(cli, tmp_path, zoo, rescale):
    s0 = zoo["sd"]["base"]
    models = [zoo["sd"][k] for k in "ab"]
    out = run(cli, tmp_path, "--method", "dare-linear", "--base", zoo["base"], zoo["a"], zoo["b"],
              "--weights", "0.6,0.4", "--density", "0.25", "--rescale", rescale, "--seed", "7")
    want = {}
    for k in s0:
        t1, t2 = _dare(k, models, s0, 7, 0.25, rescale)
        want[k] = s0[k] + 0.6 * t1 + 0.4 * t2
    assert_same(state(out), want, atol=1e-5)


def test_dare_ties_seeded(cli, tmp_path, zoo):
    s0 = zoo["sd"]["base"]
    models = [zoo["sd"][k] for k in "abc"]
    args = ["--method", "dare-ties", "--base", zoo["base"], zoo["a"], zoo["b"], zoo["c"], "--density", "0.5"]
    out = run(cli, tmp_path, *args, "--seed", "3", out="s3")
    want = {k: s0[k] + _ties(_dare(k, models, s0, 3, 0.5, "density"), [1.0] * 3, "sum") for k in s0}
    assert_same(state(out), want, atol=1e-5)
    # same seed -> identical bytes; another seed -> other masks
    same = run(cli, tmp_path, *args, "--seed", "3", out="s3b")
    assert json.loads((same / "alignkit.json").read_text())["seed"] == 3
    other = run(cli, tmp_path, *args, "--seed", "4", out="s4")
    assert (out / "model.safetensors").read_bytes() == (same / "model.safetensors").read_bytes()
    k = "model.layers.1.self_attn.o_proj.weight"
    assert not torch.equal(state(out)[k], state(other)[k])
    # the mask keeps about `density` of the entries
    m = soup.dare_mask(3, k, 0, (256, 256), 0.5)
    assert 0.47 < m.float().mean() < 0.53


# --- the output folder ----------------------------------------------------------------------

def test_output_loads_generates_and_records(cli, tmp_path, zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    out = run(cli, tmp_path, "--method", "ties", "--base", zoo["base"], zoo["a"], zoo["b"], "--seed", "1")
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja"):
        assert (out / name).read_bytes() == (zoo["base"] / name).read_bytes(), name
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    gen = model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    assert gen.shape == (1, ids.shape[1] + 4)
    sd = state(out)
    assert torch.equal(model.model.embed_tokens.weight.data, sd["model.embed_tokens.weight"])
    man = json.loads((out / "alignkit.json").read_text())
    assert man["method"] == "ties" and man["weights"] == [1.0, 1.0] and man["seed"] is None
    assert man["params"] == {"density": 0.5, "sign": "sum", "lambda": 1.0, "normalize": True}
    assert man["inputs"] == {str(zoo[k]): model_sha256(zoo[k]) for k in ("base", "a", "b")}
    assert man["tied_embeddings"] is True and "lm_head.weight" not in sd


def test_sharded_output_and_input(cli, tmp_path, zoo):
    from transformers import AutoModelForCausalLM
    one = run(cli, tmp_path, zoo["a"], zoo["b"], "--weights", "1,3", out="one")
    many = run(cli, tmp_path, zoo["a"], zoo["b"], "--weights", "1,3", "--max-shard-size", "100KB", out="many")
    shards = sorted(many.glob("model-*.safetensors"))
    assert len(shards) >= 4 and not (many / "model.safetensors").exists()
    assert all(f.stat().st_size <= 100_000 + 70_000 for f in shards)  # one tensor may overflow
    index = json.loads((many / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {f.name for f in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in state(one).values())
    a, b = state(one), state(many)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    model = AutoModelForCausalLM.from_pretrained(many)
    assert torch.equal(model.model.norm.weight.data, a["model.norm.weight"])
    # a sharded input merges to the same tensors as the unsharded one
    m = AutoModelForCausalLM.from_pretrained(zoo["b"])
    m.save_pretrained(tmp_path / "b_sharded", max_shard_size="150KB")
    assert (tmp_path / "b_sharded" / "model.safetensors.index.json").exists()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(zoo["b"] / f, tmp_path / "b_sharded" / f)
    c = state(run(cli, tmp_path, zoo["a"], tmp_path / "b_sharded", "--weights", "1,3", out="from_sharded"))
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_dtype_bfloat16(cli, tmp_path, zoo):
    sa, sb = zoo["sd"]["a"], zoo["sd"]["b"]
    out = run(cli, tmp_path, zoo["a"], zoo["b"], "--dtype", "bfloat16")
    got = state(out)
    assert all(t.dtype == torch.bfloat16 for t in got.values())
    assert all(torch.equal(got[k], ((sa[k] + sb[k]) / 2).to(torch.bfloat16)) for k in sa)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"


def test_mixed_tied_and_untied_inputs(cli, tmp_path, zoo):
    from transformers import AutoModelForCausalLM
    m = AutoModelForCausalLM.from_pretrained(zoo["b"])
    m.config.tie_word_embeddings = False
    torch.manual_seed(0)
    m.lm_head.weight = torch.nn.Parameter(torch.randn_like(m.lm_head.weight) * 0.02)
    m.save_pretrained(tmp_path / "untied")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy2(zoo["b"] / f, tmp_path / "untied" / f)
    su = state(tmp_path / "untied")
    assert "lm_head.weight" in su
    sa = zoo["sd"]["a"]
    out = run(cli, tmp_path, zoo["a"], tmp_path / "untied")
    got = state(out)
    # the tied input contributes its embedding as its head
    torch.testing.assert_close(got["lm_head.weight"], (sa["model.embed_tokens.weight"] + su["lm_head.weight"]) / 2)
    torch.testing.assert_close(got["model.embed_tokens.weight"],
                               (sa["model.embed_tokens.weight"] + su["model.embed_tokens.weight"]) / 2)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(loaded.lm_head.weight.data, got["lm_head.weight"])
    # a tied model that also stores a head: the stored head is ignored (as transformers does)
    d = _copy(zoo["b"], tmp_path / "tied_with_head")
    sd = state(d)
    sd["lm_head.weight"] = torch.randn_like(sd["model.embed_tokens.weight"])
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    out = run(cli, tmp_path, zoo["a"], d, out="tied")
    sb = zoo["sd"]["b"]
    assert_same(state(out), {k: (sa[k] + sb[k]) / 2 for k in sa})
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True


def test_force_and_atomic(cli, tmp_path, zoo):
    out = run(cli, tmp_path, zoo["a"], zoo["b"])
    r = cli(["merge-soup", zoo["a"], zoo["b"], "-o", out])
    assert r.code == 2 and "--force" in r.err
    before = (out / "model.safetensors").read_bytes()
    r = cli(["merge-soup", zoo["a"], zoo["b"], "--weights", "1,0", "-o", out, "--force"])
    assert r.code == 0 and (out / "model.safetensors").read_bytes() != before
    assert torch.equal(state(out)["model.norm.weight"], zoo["sd"]["a"]["model.norm.weight"])
    # a failing merge leaves the existing folder alone and no temp folder behind
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((zoo["a"] / "config.json").read_text())
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    r = cli(["merge-soup", zoo["a"], bad, "-o", out, "--force"])
    assert r.code == 3 and "model.safetensors" in r.err and "corrupt" in r.err
    assert (out / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# --- refusals ---------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_mismatched_shapes_names_tensor(cli, tmp_path, zoo):
    (tmp_path / "small").mkdir()
    build_tiny(tmp_path / "small", seed=0, hidden=32)
    r = cli(["merge-soup", zoo["a"], tmp_path / "small", "-o", tmp_path / "o"])
    assert r.code == 2 and "model.embed_tokens.weight" in r.err and "shape" in r.err
    assert not (tmp_path / "o").exists()


def test_missing_tensor_and_architecture_and_vocab(cli, tmp_path, zoo):
    # a tensor missing from one input
    d = _copy(zoo["b"], tmp_path / "missing")
    sd = state(d)
    del sd["model.layers.1.mlp.down_proj.weight"]
    save_file(sd, d / "model.safetensors", metadata={"format": "pt"})
    r = cli(["merge-soup", zoo["a"], d, "-o", tmp_path / "o"])
    assert r.code == 2 and "model.layers.1.mlp.down_proj.weight" in r.err
    # same shapes, different head count -> different architecture
    (tmp_path / "heads").mkdir()
    build_tiny(tmp_path / "heads", seed=1, heads=8)
    r = cli(["merge-soup", zoo["a"], tmp_path / "heads", "-o", tmp_path / "o"])
    assert r.code == 2 and "num_attention_heads" in r.err
    # same sizes, two token ids swapped -> different vocabulary
    d = _copy(zoo["b"], tmp_path / "vocab")
    tj = json.loads((d / "tokenizer.json").read_text())
    v = tj["model"]["vocab"]
    x, y = [t for t, i in v.items() if i in (100, 101)]
    v[x], v[y] = v[y], v[x]
    (d / "tokenizer.json").write_text(json.dumps(tj))
    r = cli(["merge-soup", zoo["a"], d, "-o", tmp_path / "o"])
    assert r.code == 2 and "vocabularies differ" in r.err and "model.embed_tokens.weight" in r.err
    # pickle-only weights are never loaded
    d = tmp_path / "pickle"
    d.mkdir()
    shutil.copy2(zoo["b"] / "config.json", d / "config.json")
    torch.save({}, d / "pytorch_model.bin")
    r = cli(["merge-soup", zoo["a"], d, "-o", tmp_path / "o"])
    assert r.code == 2 and "pytorch_model.bin" in r.err


@pytest.mark.parametrize("args,msg", [
    (["--method", "nope"], "unknown merge method"),
    (["--t", "0.5"], "--t does not apply to --method linear"),
    (["--method", "ties", "--base", "{a}", "--density", "0"], "--density must be > 0"),
    (["--method", "ties", "--base", "{a}", "--density", "1.5"], "--density must be <= 1"),
    (["--method", "ties", "--base", "{a}", "--sign", "max"], "--sign must be one of"),
    (["--method", "ties"], "needs --base"),
    (["--method", "slerp", "{c}"], "exactly 2 models"),
    (["--method", "slerp", "--t", "2"], "--t must be <= 1"),
    (["--weights", "1,2,3"], "3 values for 2 models"),
    (["--weights", "1,x"], "--weights must be numbers"),
    (["--weights", "1,-1"], "sum to 0"),
    (["--method", "uniform", "--weights", "1,2"], "--weights does not apply"),
    (["--max-shard-size", "lots"], "--max-shard-size"),
    (["--dtype", "int8"], "--dtype must be"),
])
def test_bad_requests_exit_2(cli, tmp_path, zoo, args, msg):
    args = [a.format(a=zoo["a"], c=zoo["c"]) for a in args]
    r = cli(["merge-soup", zoo["a"], zoo["b"], *args, "-o", tmp_path / "o"])
    assert r.code == 2 and msg in r.err, r
    assert not (tmp_path / "o").exists()


def test_registry_declares_parameters():
    assert soup.METHODS.names() == ["linear", "uniform", "slerp", "task-arithmetic", "ties",
                                  "dare-linear", "dare-ties"]
    for m in soup.METHODS:
        for p in m.params:
            assert p.name and p.type in (bool, float, str) and p.help and p.coerce(p.default) == p.default
    cfg = soup.build_config("dare-ties", ["x"], base="b", seed=2)
    assert cfg.params == {"density": 0.5, "rescale": "density", "sign": "sum", "lambda": 1.0,
                          "normalize": True}
    assert soup.parse_size("2GB") == 2 * 10**9 and soup.parse_size("1.5MiB") == 1572864
    assert soup.parse_weights("0.5, 0.25 1") == [0.5, 0.25, 1.0]
    # trim: k = round(density * n) largest |entries|; ties at the threshold: first by position
    t = torch.tensor([3.0, -1.0, 2.0, -2.0, 0.5, 2.0])
    assert soup.trim_top(t.clone(), 0.5).tolist() == [3.0, 0.0, 2.0, -2.0, 0.0, 0.0]
    assert soup.trim_top(torch.ones(2, 2), 0.5).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    assert soup.trim_top(torch.ones(4), 0.1).tolist() == [0.0] * 4


# --- PEFT adapters ------------------------------------------------------------------------------

def _adapter(base: Path, out: Path, **kw):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(base)
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(init_lora_weights=False, **kw))
    pm.peft_config["default"].base_model_name_or_path = str(base)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload().state_dict()
    return {k: v.detach().clone() for k, v in merged.items() if k != "lm_head.weight"}


def test_peft_adapter_inputs(cli, tmp_path, zoo):
    sa, s0 = zoo["sd"]["a"], zoo["sd"]["base"]
    full = _adapter(zoo["base"], tmp_path / "ad1", r=4, lora_alpha=8,
                    target_modules=["q_proj", "v_proj", "down_proj"])
    assert not torch.equal(full["model.layers.0.self_attn.q_proj.weight"],
                           s0["model.layers.0.self_attn.q_proj.weight"])
    out = run(cli, tmp_path, tmp_path / "ad1", zoo["a"], "--weights", "3,1")
    assert_same(state(out), {k: (3 * full[k] + sa[k]) / 4 for k in sa})
    # rsLoRA with per-module rank and alpha patterns; task arithmetic over the adapter's base
    full2 = _adapter(zoo["base"], tmp_path / "ad2", r=4, lora_alpha=8, use_rslora=True,
                     rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3},
                     target_modules=["q_proj", "v_proj"])
    out = run(cli, tmp_path, "--method", "task-arithmetic", "--base", zoo["base"], tmp_path / "ad2",
              "--lambda", "0.5", out="ta")
    assert_same(state(out), {k: s0[k] + 0.5 * (full2[k] - s0[k]) for k in s0})
    man = json.loads((out / "alignkit.json").read_text())
    assert man["adapters"] == [str(tmp_path / "ad2")]
    assert man["inputs"][str(tmp_path / "ad2")] == model_sha256(tmp_path / "ad2")
    # DoRA is refused
    _adapter(zoo["base"], tmp_path / "dora", r=2, target_modules=["q_proj"], use_dora=True)
    r = cli(["merge-soup", tmp_path / "dora", zoo["a"], "-o", tmp_path / "o"])
    assert r.code == 2 and "DoRA" in r.err


def test_killed_at_random_points_leaves_no_output_and_no_litter(zoo, tmp_path):
    """SIGKILL merge-soup at random moments: the output folder is either absent or
    complete, and the next run sweeps the killed run's temp folder away."""
    import random
    import signal
    import subprocess
    import sys
    import time
    exe = str(Path(sys.executable).parent / "alignkit")
    out = tmp_path / "soup"
    args = [exe, "merge-soup", "--method", "ties", "--base", str(zoo["base"]), str(zoo["a"]),
            str(zoo["b"]), str(zoo["c"]), "-o", str(out), "--max-shard-size", "20KB"]
    started = time.monotonic()
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    duration = time.monotonic() - started
    want = state(out)
    rng = random.Random(1)
    for trial in range(4):
        import shutil
        shutil.rmtree(out)
        p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.6, 1.0) * duration)
        p.send_signal(signal.SIGKILL)
        p.wait()
        if out.exists():  # finished before the kill: complete
            assert (out / "alignkit.json").exists()
            assert_same(state(out), want)
            continue
        r = subprocess.run(args, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        assert_same(state(out), want)
        assert sorted(x.name for x in tmp_path.iterdir()) == ["soup"], list(tmp_path.iterdir())
