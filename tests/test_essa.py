"""ESSA (`train-policy --method essa`): the pure ES pieces on hand-made numbers (centred
ranks, the OpenAI-ES update, the population size, antithetic noise), the SVD of a LoRA
update and its write-back, a seeded tiny run that raises the reward without calling
backward, the output folder in plain peft, same seed -> same adapter, and the errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.policy import es
from conftest import metrics, write_jsonl

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color",
           "What is art", "Describe space", "Talk about music", "Give advice"]
REWARD = '''
def repeat(prompts, completions, **kw):
    """Share of the most common character: a peaked, repetitive output scores high (the
    LoRA on lm_head reaches it by growing its singular values)."""
    out = []
    for c in completions:
        t = c if isinstance(c, str) else c[0]["content"]
        out.append(max(t.count(ch) for ch in set(t)) / len(t) if t else 0.0)
    return out
'''
TARGETS = ["q_proj", "v_proj", "down_proj", "lm_head"]
FAST = ["--popsize", 8, "--fitness-batch", 8, "--max-new-tokens", 12, "--sigma0", 0.5,
        "--es-lr", 1.0, "--temperature", 0.3]


def make_adapter(base_dir, out: Path, seed: int = 0, scale: float = 1.0, targets=TARGETS) -> Path:
    """A LoRA adapter with random A and B (as if SFT had trained it), saved by peft."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_tokenizer
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                        init_lora_weights=False))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.mul_(scale)
    m.save_pretrained(out)
    load_tokenizer(base_dir).save_pretrained(out)
    return out


def delta_ws(model) -> dict:
    """{module name: c·B·A} of a peft model, float64."""
    from peft.tuners.lora import LoraLayer
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, LoraLayer) and "default" in getattr(mod, "lora_A", {}):
            B = mod.lora_B["default"].weight.detach().double()
            A = mod.lora_A["default"].weight.detach().double()
            out[name.replace("base_model.model.", "")] = mod.scaling["default"] * B @ A
    return out


def load_peft(base_dir, folder):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), folder)



@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_model):
    d = tmp_path_factory.mktemp("essa")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    recs[3]["prompt"] = [{"role": "user", "content": PROMPTS[3]}]  # a message list too
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "reward": f"python:{d / 'rew.py'}:repeat",
            "adapter": make_adapter(tiny_model, d / "sft-lora")}


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])


@pytest.fixture(scope="module")
def trained(env):
    """A 12-generation run with backward forbidden: (folder, backward calls)."""
    calls = []

    def forbidden(*a, **k):
        calls.append(1)
        raise AssertionError("ESSA must not call backward")

    out = env["dir"] / "essa-out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.Tensor, "backward", forbidden)
        mp.setattr(torch.autograd, "backward", forbidden)
        code = run(["train-policy", "--method", "essa", "--model", env["adapter"], env["prompts"],
                    "--reward", env["reward"], "-o", out, "--generations", 12, *FAST])
    assert code == 0
    return out, calls


# --- the pure pieces ------------------------------------------------------------------------

def test_centered_ranks_by_hand():
    assert es.centered_ranks([1.0, 3.0, 2.0]) == [-0.5, 0.5, 0.0]     # ranks 0, 2, 1 over λ-1 = 2
    assert es.centered_ranks([1.0, 1.0, 2.0]) == [-0.25, -0.25, 0.5]  # the tie shares rank 0.5
    assert es.centered_ranks([float("nan"), 0.0, -5.0]) == [-0.5, 0.5, 0.0]  # NaN ranks last
    with pytest.raises(ValueError):
        es.centered_ranks([1.0])


def test_es_update_by_hand():
    # u = [-0.5, 0.5, 0]; sum u_i eps_i = -0.5 [1, 0] + 0.5 [0, 1] + 0 [2, 2] = [-0.5, 0.5]
    # alpha / (lambda sigma) = 0.2 / (3 * 0.1) = 2/3 -> theta + [-1/3, 1/3]
    noise = torch.tensor([[1.0, 0.0], [0.0, 1.0], [2.0, 2.0]], dtype=torch.float64)
    u = es.centered_ranks([1.0, 3.0, 2.0])
    new = es.es_update(torch.tensor([1.0, 1.0], dtype=torch.float64), noise, u, 0.2, 0.1)
    assert torch.allclose(new, torch.tensor([2 / 3, 4 / 3], dtype=torch.float64))


def test_popsize_and_antithetic_noise():
    assert es.auto_popsize(56) == 16      # 4 + floor(3 ln 56 = 12.08)
    assert es.auto_popsize(28) == 14      # 4 + floor(9.997) = 13 -> even
    assert es.auto_popsize(3000) == 28    # 4 + floor(24.02), ALGORITHMS.md's ~28
    e = es.antithetic_noise(5, 6, seed=3)
    assert e.shape == (6, 5) and torch.equal(e[0], -e[1]) and torch.equal(e[4], -e[5])
    assert not torch.equal(e[0], e[2])
    assert torch.equal(e, es.antithetic_noise(5, 6, seed=3))
    assert not torch.equal(e, es.antithetic_noise(5, 6, seed=4))
    with pytest.raises(ValueError):
        es.antithetic_noise(5, 3, seed=0)


def test_lora_svd_and_write_back_by_hand():
    # c B A = 0.5 [[1,0],[0,2],[0,0]] [[3,0,0,0],[0,0,0,1]] = rows [1.5,0,0,0], [0,0,0,1], 0
    B = torch.tensor([[1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    A = torch.tensor([[3.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    U, s, Vh = es.lora_svd(B, A, 0.5)
    assert torch.allclose(s, torch.tensor([1.5, 1.0], dtype=torch.float64))
    dw = torch.zeros(3, 4, dtype=torch.float64)
    dw[0, 0], dw[1, 3] = 1.5, 1.0
    assert torch.allclose(U @ torch.diag(s) @ Vh, dw)
    B2, A2 = es.lora_factors(U, s, Vh, 0.5)
    assert torch.allclose(0.5 * B2 @ A2, dw)
    B3, A3 = es.lora_factors(U, s * torch.tensor([2.0, 0.0], dtype=torch.float64), Vh, 0.5)
    dw2 = torch.zeros(3, 4, dtype=torch.float64)
    dw2[0, 0] = 3.0  # s' = [3, 0]: the first direction doubled, the second gone
    assert torch.allclose(0.5 * B3 @ A3, dw2)


def test_svd_round_trip_keeps_every_delta_w(env, tiny_model, tmp_path):
    from alignkit.policy.essa import SingularValues
    model = load_peft(tiny_model, env["adapter"])
    before = delta_ws(model)
    with torch.no_grad():
        space = SingularValues(model)       # A' = Vᵀ, B' = U diag(s)/c, z = 0
    assert space.n == 4 * len(before) == 4 * 7  # q, v, down x 2 layers + lm_head, r = 4
    model.save_pretrained(tmp_path / "rt")
    after = delta_ws(load_peft(tiny_model, tmp_path / "rt"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.allclose(before[k], after[k], atol=1e-5), k


# --- the run ---------------------------------------------------------------------------------

def test_reward_rises_without_backward(trained):
    out, calls = trained
    assert calls == []
    rows = metrics(out)
    assert [r["generation"] for r in rows] == list(range(1, 13))
    mean = [r["fitness_mean"] for r in rows]
    first, last = sum(mean[:3]) / 3, sum(mean[-3:]) / 3
    assert last - first >= 0.2, mean
    for r in rows:
        assert r["fitness_worst"] <= r["fitness_mean"] <= r["fitness_best"] and r["sigma"] == 0.5


def test_output_loads_in_plain_peft_with_frozen_singular_vectors(env, trained, tiny_model):
    out, _ = trained
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and cfg["lora_alpha"] == 8
    man = json.loads((out / "alignkit.json").read_text())
    assert man["method"] == "essa" and man["hyperparameters"]["popsize"] == 8
    assert man["hyperparameters"]["search_dim"] == 28 and (out / "README.md").exists()
    new = delta_ws(load_peft(tiny_model, out))
    old = delta_ws(load_peft(tiny_model, env["adapter"]))
    moved = 0
    for k, dw in old.items():
        U, s, Vh = es.lora_svd(*_factors(dw))
        inner = U.T @ new[k] @ Vh.T       # diag(s') when U and V are the frozen ones
        assert torch.allclose(inner, torch.diag(torch.diagonal(inner)), atol=1e-4), k
        assert torch.allclose(U @ inner @ Vh, new[k], atol=1e-4), k
        moved += not torch.allclose(torch.diagonal(inner), s, atol=1e-3)
    assert moved == len(old)


def _factors(dw):
    """(B, A, 1) with B A = dw (rank 4), for `lora_svd`."""
    U, s, Vh = torch.linalg.svd(dw, full_matrices=False)
    return U[:, :4] * s[:4], Vh[:4], 1.0


def test_same_seed_same_adapter_and_init_adapter_form(env, tiny_model):
    from safetensors.torch import load_file
    outs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = env["dir"] / f"seed-{name}"
        assert run(["train-policy", "--method", "essa", "--model", tiny_model, "--init-adapter",
                    env["adapter"], env["prompts"], "--reward", env["reward"], "-o", out,
                    "--generations", 2, "--seed", seed, *FAST]) == 0
        outs[name] = load_file(out / "adapter_model.safetensors")
    assert outs["a"].keys() == outs["b"].keys() and outs["a"]
    assert all(torch.equal(outs["a"][k], outs["b"][k]) for k in outs["a"])
    assert not all(torch.equal(outs["a"][k], outs["c"][k]) for k in outs["a"])
    cfg = json.loads((env["dir"] / "seed-a" / "adapter_config.json").read_text())
    assert Path(cfg["base_model_name_or_path"]) == Path(tiny_model).resolve()


# --- errors ------------------------------------------------------------------------------------

def test_no_adapter_is_a_usage_error_saying_to_sft_first(cli, env, tiny_model, tmp_path):
    r = cli(["train-policy", "--method", "essa", "--model", tiny_model, env["prompts"],
             "--reward", env["reward"], "-o", tmp_path / "m"])
    assert r.code == 2 and "--method sft --lora-r" in r.err, r
    r = cli(["train-policy", "--method", "essa", "--model", tiny_model, "--init-adapter",
             tmp_path, env["prompts"], "--reward", env["reward"], "-o", tmp_path / "m"])
    assert r.code == 2 and "not a peft adapter folder" in r.err, r
    r = cli(["train-policy", "--method", "essa", "--model", env["adapter"], "--init-adapter",
             env["adapter"], env["prompts"], "--reward", env["reward"], "-o", tmp_path / "m"])
    assert r.code == 2 and "is an adapter folder already" in r.err, r
    assert not (tmp_path / "m.partial").exists() and not (tmp_path / "m").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--popsize", 7], "--popsize must be even"),
    (["--lora-r", 8], "--lora-r does not apply to essa"),
    (["--beta", 0.1], "essa has no KL term"),
    (["--lr", 0.3], "--es-lr"),
    (["--sigma0", 0], "--sigma0 must be > 0"),
    (["--num-generations", 4], "--num-generations does not apply"),
    (["--reward", "length", "--reward-weights", "learn:length"],
     "--reward-weights learn: works with"),
])
def test_flag_errors_exit_2(cli, env, tmp_path, extra, needle):
    r = cli(["train-policy", "--method", "essa", "--model", env["adapter"], env["prompts"],
             "--reward", env["reward"], "-o", tmp_path / "m", *extra])
    assert r.code == 2 and needle in r.err, r
    r = cli(["train-policy", "--method", "essa", "--model", env["adapter"], env["prompts"],
             "-o", tmp_path / "m"])
    assert r.code == 2 and "need --reward" in r.err, r


def test_malformed_prompt_line_exits_3_with_path_and_line(cli, env, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": "x"\n')
    r = cli(["train-policy", "--method", "essa", "--model", env["adapter"], bad,
             "--reward", env["reward"], "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err, r
    bad.write_text('{"id": "a", "prompt": "hi"}\n{"id": "b", "prompt": 7}\n')
    r = cli(["train-policy", "--method", "essa", "--model", env["adapter"], bad,
             "--reward", env["reward"], "-o", tmp_path / "m"])
    assert r.code == 3 and f"{bad}:2" in r.err and "prompt" in r.err, r
    assert not (tmp_path / "m.partial").exists()


@pytest.mark.slow
def test_smollm2_essa_runs_and_loads(tmp_path, smollm2):
    """Two generations on SmolLM2-135M-Instruct with a small random LoRA; the folder loads
    in plain peft and its ΔW keeps the adapter's singular vectors."""

    base = smollm2
    adapter = make_adapter(base, tmp_path / "lora", scale=0.05, targets="all-linear")
    (tmp_path / "rew.py").write_text(REWARD)
    prompts = write_jsonl(tmp_path / "p.jsonl",
                          [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS[:4])])
    out = tmp_path / "out"
    assert run(["train-policy", "--method", "essa", "--model", adapter, prompts, "--reward",
                f"python:{tmp_path / 'rew.py'}:repeat", "-o", out, "--generations", 2,
                "--popsize", 2, "--fitness-batch", 2, "--max-new-tokens", 8]) == 0
    assert len(metrics(out)) == 2 and all(math.isfinite(r["fitness_mean"]) for r in metrics(out))
    assert delta_ws(load_peft(base, out)).keys() == delta_ws(load_peft(base, adapter)).keys()
