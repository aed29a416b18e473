"""--entropy-coef (the Policy Cliff's entropy bonus, on every online method) and --credit
chunk (IPA's chunk-level ratios, grpo): the pure functions on hand-made numbers, the
trainers' losses on a fixed batch of the tiny Llama (the bonus is exactly −C·H with H
computed here from the model's logits, and carries the gradient), the CLI runs and
their metrics, and the usage errors."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from alignkit.policy import online_losses as L
from conftest import metrics, write_jsonl

REWARD = '''
def short(prompts, completions, **kw):
    return [-len(c if isinstance(c, str) else c[0]["content"]) / 40.0 for c in completions]
'''



@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("entchunk")
    (d / "rew.py").write_text(REWARD)
    recs = [{"id": f"q{i}", "prompt": p} for i, p in
            enumerate(["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"])]
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "reward": f"python:{d / 'rew.py'}:short"}


# --- pure functions ----------------------------------------------------------------------------

def test_token_entropy_and_bonus_match_the_formula():
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]], [[0.0, 0.0], [5.0, 5.0]]])
    h = L.token_entropy(logits)
    h_skew = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))  # p = (3/4, 1/4)
    assert h.flatten().tolist() == pytest.approx([math.log(2), h_skew, math.log(2), math.log(2)])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert L.entropy_bonus(h, mask).item() == pytest.approx((2 * math.log(2) + h_skew) / 3)
    assert L.entropy_bonus(h, torch.zeros_like(mask)).item() == 0.0


def test_chunk_ids_by_newline_sentence_and_regex():
    assert L.chunk_ids(["a", "\n", "b", "\n", "c"], "newline").tolist() == [0, 0, 1, 1, 2]
    assert L.chunk_ids(["a", "\n\n", "b"], "newline").tolist() == [0, 0, 1]
    assert L.chunk_ids(["a", "\nb", "c"], "newline").tolist() == [0, 1, 1]  # the token past it
    # two sentences; "3.5" is not a sentence end (no whitespace after the dot)
    assert L.chunk_ids(["Hi", " there", ".", " Pi", " is", " 3", ".", "14", "."],
                       "sentence").tolist() == [0, 0, 0, 1, 1, 1, 1, 1, 1]
    assert L.chunk_ids(["Ok", "!", " Go", "?", " x"], "sentence").tolist() == [0, 0, 1, 1, 2]
    assert L.chunk_ids(["x;", "y", ";z"], "regex:;").tolist() == [0, 1, 2]
    assert L.chunk_ids(["abc"], "newline").tolist() == [0]
    for bad in ("regex:[", "regex:", "words"):
        with pytest.raises(ValueError):
            L.chunk_pattern(bad)


def test_token_pieces_rebuild_the_text_and_chunk_real_tokens(tiny_model):
    from alignkit.models import load_tokenizer
    tok = load_tokenizer(str(tiny_model))
    text = "Say caf\u00e9.\nNext \u4e2d line!\n\nEnd"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = L.token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text  # multi-byte chars land whole
    assert "\ufffd" not in "".join(pieces)
    chunks = L.chunk_ids(pieces, "newline").tolist()
    ends = [k for k, p in enumerate(pieces) if "\n" in p]
    assert chunks[-1] == 2 and chunks == sorted(chunks)
    assert all(chunks[k] < chunks[k + 1] for k in (ends[0], ends[-1]))  # a new chunk after each
    texts = ["".join(p for p, c in zip(pieces, chunks) if c == j) for j in range(3)]
    assert texts == ["Say caf\u00e9.\n", "Next \u4e2d line!\n\n", "End"]
    assert L.chunk_ids(pieces, "sentence").tolist()[-1] == 2


def test_chunk_ratios_and_clipped_terms_on_a_two_chunk_completion():
    # chunk 0 = tokens 0-1 (log-ratios 0.1, -0.3: mean -0.1, inside [0.8, 1.2]);
    # chunk 1 = tokens 2-4 (log-ratios 0.5, 0.4, 0.3: mean 0.4, e^0.4 = 1.49 > 1.2);
    # token 5 is padding (its log-ratio 9 must not count)
    old = torch.tensor([[-1.0, -2.0, -1.5, -0.5, -3.0, 0.0]])
    logps = (old + torch.tensor([[0.1, -0.3, 0.5, 0.4, 0.3, 9.0]])).requires_grad_()
    ids = torch.tensor([[0, 0, 1, 1, 1, 1]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 1.0, 1.0, 0.0]])
    ratio, rho, counts = L.chunk_ratios(logps, old, ids, mask)
    r0, r1 = math.exp(-0.1), math.exp(0.4)
    assert rho[0].tolist() == pytest.approx([r0, r1])
    assert counts.tolist() == [[2.0, 3.0]]
    assert ratio[0, :5].tolist() == pytest.approx([r0, r0, r1, r1, r1])
    # A > 0: chunk 0 keeps rho*A, chunk 1 is clipped to (1 + 0.2)*A
    A = 2.0
    per = L.chunk_clipped_loss(ratio, torch.tensor([A]), 0.2, 0.2)
    want = [-r0 * A] * 2 + [-1.2 * A] * 3
    assert per[0, :5].tolist() == pytest.approx(want)
    loss = L.aggregate_loss(per, mask, "bnpo")
    assert loss.item() == pytest.approx(sum(want) / 5)
    loss.backward()
    # d/d logp_t of -(2/5) * rho_0 * A / 2 ... = -A * rho_0 / 5 on chunk 0; clipped chunk: 0
    assert logps.grad[0].tolist() == pytest.approx([-A * r0 / 5] * 2 + [0.0] * 4)
    # A < 0: min picks the unclipped term for rho > 1 + eps, the clipped one below 1 - eps
    per_neg = L.chunk_clipped_loss(ratio, torch.tensor([-1.0]), 0.2, 0.2)
    assert per_neg[0, :5].tolist() == pytest.approx([r0] * 2 + [r1] * 3)
    low = torch.full((1, 2), math.exp(-0.5))  # 0.61 < 0.8 -> clipped to 0.8 for A < 0
    assert L.chunk_clipped_loss(low, torch.tensor([-1.0]), 0.2, 0.2)[0].tolist() == \
        pytest.approx([0.8, 0.8])


def test_chunk_topr_loss_is_ipas_split():
    """--chunk-clip ipa: A > 0 -> -A log p (no ratio); A <= 0 -> -sg([rho_c]_0^1) A log p."""
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -1.5], [-3.0, -1.0]], requires_grad=True)
    ratio = torch.tensor([[1.5, 0.7], [1.5, 0.7], [2.0, 2.0]])
    adv = torch.tensor([2.0, -1.0, 0.0])
    per = L.chunk_topr_loss(logps, ratio, adv)
    want = [[-2.0 * -1.0, -2.0 * -2.0], [1.0 * -0.5, 0.7 * -1.5], [0.0, 0.0]]
    for got, w in zip(per.tolist(), want):
        assert got == pytest.approx(w)
    per.sum().backward()  # the truncated ratio is a weight, not differentiated
    for got, w in zip(logps.grad.tolist(), [[-2.0, -2.0], [1.0, 0.7], [0.0, 0.0]]):
        assert got == pytest.approx(w)


def test_aggregate_loss_matches_trls_four_aggregations():
    per = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    assert L.aggregate_loss(per, mask, "grpo").item() == pytest.approx((2.0 + 4.0) / 2)
    assert L.aggregate_loss(per, mask, "bnpo").item() == pytest.approx(10.0 / 4)
    assert L.aggregate_loss(per, mask, "dr_grpo", max_len=5).item() == pytest.approx(10.0 / 10)
    assert L.aggregate_loss(per, mask, "dapo", n_tokens=8).item() == pytest.approx(10.0 / 8)
    with pytest.raises(ValueError):
        L.aggregate_loss(per, mask, "cispo")


# --- the trainers' losses on a fixed batch -----------------------------------------------------

def _trainer(cls, tiny_model, tmp_path, **kw):
    from datasets import Dataset
    from trl import GRPOConfig

    from alignkit.models import load_causal_lm
    from alignkit.policy.online_trainers import OnlineContext
    model, tok = load_causal_lm(str(tiny_model), "float32")
    cfg = GRPOConfig(output_dir=str(tmp_path / "t"), per_device_train_batch_size=4,
                     num_generations=2, max_completion_length=4, report_to=[], use_cpu=True,
                     beta=0.0, log_completions=False, loss_type="dapo")
    ctx = OnlineContext(records=[{"id": "a", "prompt": "hi"}], tokenizer=tok, work=tmp_path,
                        seed=0)
    trainer = cls(model=model, reward_funcs=[lambda completions, **_: [0.0] * len(completions)],
                  args=cfg, train_dataset=Dataset.from_list([{"prompt": "hi", "row": 0}] * 4),
                  processing_class=tok, ctx=ctx, **kw)
    trainer.model.eval()  # eval mode: no gradient-accumulation divisor
    return trainer


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 200, (4, 3), generator=g)
    comp = torch.randint(3, 200, (4, 4), generator=g)
    cmask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]])
    return {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": comp,
            "completion_mask": cmask, "advantages": torch.tensor([1.0, -1.0, 0.5, -0.5]),
            "num_items_in_batch": cmask.sum()}


def _hand_entropy(model, inputs, order=None) -> torch.Tensor:
    """Mean full-vocabulary entropy over the completion tokens, from the plain logits."""
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    logits = model(input_ids=ids).logits[:, 2:-1].float()  # the positions predicting completions
    p = torch.softmax(logits, -1)
    h = -(p * torch.log(p)).sum(-1)
    m = inputs["completion_mask"].float()
    return (h * m).sum() / m.sum()


def _loss_and_grad(trainer, inputs, coef):
    trainer.ak_entropy_coef = coef
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, inputs)
    loss.backward()
    w = trainer.model.get_input_embeddings().weight
    return loss.item(), w.grad.clone()


@pytest.mark.parametrize("kind", ["grpo", "online-ipo"])
def test_entropy_coef_changes_the_loss_by_minus_C_times_H(tiny_model, tmp_path, kind):
    from alignkit.policy import online_trainers as T
    if kind == "grpo":
        trainer = _trainer(T.AlignkitGRPOTrainer, tiny_model, tmp_path)
        inputs = _batch()
    else:
        trainer = _trainer(T.PairTrainer, tiny_model, tmp_path, kind="ipo", coef=0.1)
        inputs = _batch()
        inputs.update(pair_group=torch.tensor([0, 1, 0, 1]),
                      pair_rewards=torch.tensor([1.0, 0.0, 0.0, 0.5]),
                      ref_token_logps=torch.full((4, 4), -5.0))
    C = 0.05
    loss0, _ = _loss_and_grad(trainer, inputs, 0.0)
    loss1, _ = _loss_and_grad(trainer, inputs, C)
    trainer.model.zero_grad()
    H = _hand_entropy(trainer.model, inputs)
    assert 1.0 < H.item() < math.log(trainer.model.config.vocab_size)
    assert loss1 - loss0 == pytest.approx(-C * H.item(), rel=1e-4, abs=1e-6)
    ms = trainer._metrics["eval"]
    assert ms["entropy_bonus/entropy"][-1] == pytest.approx(H.item(), rel=1e-4)
    assert ms["entropy_bonus"][-1] == pytest.approx(C * H.item(), rel=1e-4)
    # the bonus is computed WITH gradient: on a batch whose policy term has no gradient
    # (zero advantages; for the pair loss each pair two copies of one completion with a
    # tied reward, so h = 0 and the target is 0) the loss's gradient is -C dH of the
    # hand-computed H (up to the ~0.5% of TRL's tiled fused-head kernel against autograd)
    zero = {k: (v[[0, 0, 2, 2]] if torch.is_tensor(v) and v.dim() else v)
            for k, v in inputs.items()}
    zero.update(advantages=torch.zeros(4), pair_group=torch.tensor([0, 0, 1, 1]),
                pair_rewards=torch.zeros(4), num_items_in_batch=zero["completion_mask"].sum())
    _, g0 = _loss_and_grad(trainer, zero, 0.0)
    _, g1 = _loss_and_grad(trainer, zero, C)
    trainer.model.zero_grad()
    (-C * _hand_entropy(trainer.model, zero)).backward()
    hgrad = trainer.model.get_input_embeddings().weight.grad
    assert g0.abs().max() == 0
    assert hgrad.norm() > 0
    assert ((g1 - hgrad).norm() / hgrad.norm()).item() < 0.02


def test_chunk_credit_loss_on_a_fixed_batch_is_the_hand_formula(tiny_model, tmp_path):
    """The grpo trainer with credit="chunk" on a fixed batch whose rollout-time log-probs
    are the current ones minus hand-picked log-ratios: per chunk ρ_c = exp(mean log-ratio),
    −min(ρ_c A, clip(ρ_c, 0.8, 1.2) A) on each of its tokens, dapo: Σ / active tokens."""
    from alignkit.policy import online_trainers as T
    trainer = _trainer(T.AlignkitGRPOTrainer, tiny_model, tmp_path, credit="chunk")
    inputs = _batch()
    inputs["chunk_ids"] = torch.tensor([[0, 0, 1, 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 0]])
    delta = torch.tensor([[0.1, -0.3, 0.5, 0.4], [0.0, 0.3, 0.0, 0.0], [-0.1, -0.2, -0.6, 0.0],
                          [0.05, 0.0, 0.0, 0.0]])
    with torch.no_grad():
        cur, _ = trainer._forward(trainer.model, inputs)
    inputs["old_per_token_logps"] = cur - delta
    loss = trainer._compute_loss(trainer.model, inputs)
    # chunks (row: [(tokens, mean log-ratio)], A): the second chunk of row 0 (e^0.45 > 1.2,
    # A > 0) and the first of row 1 (e^0 inside) / second (e^0.3 > 1.2, A < 0: unclipped
    # wins), row 2's second chunk e^-0.6 < 0.8 with A > 0 (unclipped, min picks it)
    rows = [([(2, -0.1), (2, 0.45)], 1.0), ([(1, 0.0), (1, 0.3)], -1.0),
            ([(2, -0.15), (1, -0.6)], 0.5), ([(1, 0.05)], -0.5)]
    total = 0.0
    for chunks, a in rows:
        for n, lr in chunks:
            rho = math.exp(lr)
            total += n * -min(rho * a, min(max(rho, 0.8), 1.2) * a)
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)  # 4 + 2 + 3 + 1 tokens
    assert trainer._metrics["eval"]["chunk/per_completion"][-1] == pytest.approx((2 + 2 + 2 + 1) / 4)
    assert trainer._metrics["eval"]["chunk/clip_frac"][-1] == pytest.approx(1 / 7)
    # --chunk-clip ipa on the same batch: -w_c A log p, w_c = 1 (A > 0) or [rho_c]_0^1
    trainer.chunk_clip = "ipa"
    loss = trainer._compute_loss(trainer.model, inputs)
    lp = cur.tolist()
    total = 0.0
    for i, (chunks, a) in enumerate(rows):
        t = 0
        for n, lr in chunks:
            w = 1.0 if a > 0 else min(max(math.exp(lr), 0.0), 1.0)
            total += sum(-w * a * lp[i][k] for k in range(t, t + n))
            t += n
    assert loss.item() == pytest.approx(total / 10, rel=1e-5)


# --- the CLI -----------------------------------------------------------------------------------

def _train(cli, env, tiny_model, out, *extra):
    return cli(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
                "--reward", env["reward"], "-o", out, "--max-steps", 2, "--batch-size", 8,
                "--max-new-tokens", 8, *extra])


def test_cli_entropy_coef_logs_the_entropy_and_the_bonus(cli, env, tiny_model, tmp_path):
    r = _train(cli, env, tiny_model, tmp_path / "e", "--entropy-coef", "0.01")
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "e") if "reward" in x]
    assert len(rows) == 2
    for x in rows:
        assert x["entropy_bonus/entropy"] > 0
        assert x["entropy_bonus"] == pytest.approx(0.01 * x["entropy_bonus/entropy"])
    man = json.loads((tmp_path / "e" / "alignkit.json").read_text())
    assert man["hyperparameters"]["entropy_coef"] == 0.01


def test_cli_chunk_credit_by_newline_runs(cli, env, tiny_model, tmp_path):
    r = _train(cli, env, tiny_model, tmp_path / "c", "--credit", "chunk", "--chunk-by", "newline")
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "c") if "reward" in x]
    assert rows and all(x["chunk/per_completion"] >= 1 and math.isfinite(x["loss"]) for x in rows)
    man = json.loads((tmp_path / "c" / "alignkit.json").read_text())
    assert man["hyperparameters"]["credit"] == "chunk"
    assert man["hyperparameters"]["chunk_by"] == "newline"


def test_cli_earl_chunk_ipa_by_sentence_with_the_bonus_on_the_gated_tokens(cli, env,
                                                                             tiny_model, tmp_path):
    r = cli(["train-policy", "--method", "earl", "--model", tiny_model, env["prompts"],
             "--reward", env["reward"], "-o", tmp_path / "e", "--max-steps", 2, "--batch-size", 8,
             "--max-new-tokens", 8, "--credit", "chunk", "--chunk-by", "sentence",
             "--chunk-clip", "ipa",
             "--entropy-quantile", "0.5", "--entropy-coef", "0.01"])
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "e") if "reward" in x]
    for x in rows:  # the gated half holds the highest entropies: above the mean of all
        assert x["chunk/per_completion"] >= 1 and 0.4 <= x["earl/gate_frac"] <= 0.6
        assert x["entropy_bonus/entropy"] >= x["entropy"]


@pytest.mark.parametrize("method,extra,needle", [
    ("grpo", ["--credit", "chunk", "--chunk-by", "regex:["], "--chunk-by bad regex '['"),
    ("grpo", ["--credit", "chunk", "--chunk-by", "words"], "--chunk-by must be newline"),
    ("grpo", ["--chunk-by", "newline"], "--chunk-by needs --credit chunk"),
    ("earl", ["--chunk-clip", "ipa"], "--chunk-clip needs --credit chunk"),
    ("grpo", ["--credit", "chunk", "--chunk-clip", "topr"], "--chunk-clip must be one of"),
    ("grpo", ["--credit", "chunk", "--loss", "cispo"], "not cispo"),
    ("grpo", ["--credit", "chunk", "--importance-sampling", "sequence"], "--importance-sampling"),
    ("gtpo", ["--credit", "chunk"], "--credit does not apply"),
    ("rloo", ["--entropy-coef", "-1"], "--entropy-coef must be >= 0.0"),
])
def test_usage_errors_exit_2_naming_the_flag(cli, env, tiny_model, tmp_path, method, extra, needle):
    r = cli(["train-policy", "--method", method, "--model", tiny_model, env["prompts"],
             "--reward", env["reward"], "-o", tmp_path / "m", "--batch-size", 8, *extra])
    assert r.code == 2, r
    assert needle in r.err
    assert not (tmp_path / "m").exists()


# --- examples/policy-cliff.mk ------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def test_policy_cliff_makefile_parses_and_runs_both_entropy_settings(tmp_path):
    import shutil
    import subprocess
    if shutil.which("make") is None:
        pytest.skip("no make")
    p = subprocess.run(["make", "-n", "-f", "examples/policy-cliff.mk", f"OUT={tmp_path}/c",
                        "ENTS=0 0.02"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    trains = [x for x in p.stdout.splitlines() if "train-policy" in x]
    assert len(trains) == 4  # 2 entropy settings x 2 noise seeds
    for ent in ("0", "0.02"):
        for seed in ("1", "2"):
            assert any(f"POLICY_CLIFF_SEED={seed} " in x and f"--entropy-coef {ent} " in x
                       and f"ent-{ent}/seed-{seed}" in x for x in trains), (ent, seed)
    assert p.stdout.count("alignkit eval --model") == 2


def test_policy_cliff_reward_is_a_small_fixed_seeded_perturbation(monkeypatch):
    import importlib.util
    spec = importlib.util.spec_from_file_location("pcr", ROOT / "examples" / "policy_cliff_reward.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    prompts, comps = ["p", "p", "q"], ["abcd", "xy", [{"role": "assistant", "content": "abcd"}]]
    monkeypatch.setenv("POLICY_CLIFF_NOISE", "0.05")
    monkeypatch.setenv("POLICY_CLIFF_SEED", "1")
    a = mod.noisy(prompts, comps)
    assert a == mod.noisy(prompts, comps)  # a fixed function of the text
    base = [-4 / 40, -2 / 40, -4 / 40]
    assert all(abs(x - b) <= 0.05 for x, b in zip(a, base)) and a != base
    monkeypatch.setenv("POLICY_CLIFF_SEED", "2")
    b = mod.noisy(prompts, comps)
    assert b != a and all(abs(x - y) <= 0.1 for x, y in zip(a, b))
    monkeypatch.setenv("POLICY_CLIFF_NOISE", "0")
    assert mod.noisy(prompts, comps) == pytest.approx(base)


# --- real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_grpo_chunk_credit_and_entropy_bonus_on_smollm2(cli, tmp_path, smollm2):
    """SmolLM2's byte-level BPE: list answers split at their newlines into several chunks."""

    model = smollm2
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"l{i}", "prompt": f"List three {w}, one per line."}
        for i, w in enumerate(["fruits", "colors", "animals", "countries"])])
    r = cli(["train-policy", "--method", "grpo", "--model", model, src, "--reward", "length",
             "-o", tmp_path / "o", "--max-steps", 2, "--batch-size", 8, "--num-generations", 4,
             "--max-new-tokens", 32, "--lora-r", 8, "--lr", "1e-4", "--temperature", "0.8",
             "--credit", "chunk", "--chunk-by", "newline", "--entropy-coef", "0.001"])
    assert r.code == 0, r
    rows = [x for x in metrics(tmp_path / "o") if "reward" in x]
    assert len(rows) == 2
    assert all(x["chunk/per_completion"] >= 2 for x in rows), rows  # several lines each
    assert all(x["entropy_bonus"] == pytest.approx(0.001 * x["entropy_bonus/entropy"]) for x in rows)
