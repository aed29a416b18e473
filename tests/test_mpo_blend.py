"""MPO (evolving judge rubric, alignkit/policy/mpo.py) and BARFI (learned reward blend,
alignkit/policy/reward_blend.py): the callback on a stubbed meta-judge, the history
file, the pure blend update on hand-made vectors, and short CLI runs on the tiny Llama."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import write_jsonl

PROMPTS = ["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"]


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main(["--quiet", *[str(a) for a in args]])


def lines(path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    d = tmp_path_factory.mktemp("mpo")
    recs = [{"id": f"q{i}", "prompt": p} for i, p in enumerate(PROMPTS)]
    (d / "rubric.txt").write_text("Is it polite?\n")
    (d / "rew.py").write_text(
        "def short(prompts, completions, **kw):\n"
        "    return [-len(c) / 40.0 for c in completions]\n"
        "def long(prompts, completions, **kw):\n"
        "    return [len(c) / 40.0 for c in completions]\n")
    return {"dir": d, "prompts": write_jsonl(d / "prompts.jsonl", recs),
            "rubric": d / "rubric.txt", "short": f"python:{d / 'rew.py'}:short",
            "long": f"python:{d / 'rew.py'}:long"}


# --- MPO: the callback on a stubbed meta-judge --------------------------------------------------

def stub_judge(rubric):
    """A JudgeScorer without a model: set_rubric, default_rubric and last_scored are all
    the callback uses."""
    from alignkit.scorers.judge import JudgeScorer
    j = JudgeScorer.__new__(JudgeScorer)
    j.default_rubric = [{"text": t, "kind": "principle"} for t in rubric]
    j.last_scored = [
        {"prompt": "p1", "completion": "short answer", "score": 0.2, "default_rubric": True},
        {"prompt": "p2", "completion": "long long long long", "score": 0.9, "default_rubric": True},
        {"prompt": "p3", "completion": "own rubric", "score": 0.5, "default_rubric": False}]
    return j


class StubMeta:
    """A meta-judge whose answers are fixed; records the instructions it was given."""

    def __init__(self, answers):
        self.answers, self.seen = list(answers), []

    def __call__(self, text, seed):
        self.seen.append(text)
        return self.answers.pop(0), True


def state(step):
    return SimpleNamespace(global_step=step)


def drive(cb, steps):
    cb.on_train_begin(None, state(0), None)
    for s in range(1, steps + 1):
        cb.on_step_end(None, state(s), None)


def test_callback_rewrites_the_rubric_at_k_and_2k(tmp_path):
    from alignkit.policy.mpo import MPOCallback
    judge = stub_judge(["Is it polite?"])
    meta = StubMeta(["1. Principle: Is it concise?\n2. Hard rule: No repeated words.",
                     "1. Is it short?\n2. Is it on topic?\n3. Is it polite?"])
    cb = MPOCallback(judge, meta, tmp_path, every=2, samples=8, seed=0)
    drive(cb, 5)  # updates after steps 2 and 4
    assert len(meta.seen) == 2
    hist = lines(tmp_path / "rubrics.jsonl")
    assert [(h["version"], h["step"]) for h in hist] == [(0, 0), (1, 2), (2, 4)]
    assert hist[0]["rubric"] == [{"text": "Is it polite?", "kind": "principle"}]
    assert hist[1]["rubric"] == [{"text": "Is it concise?", "kind": "principle"},
                                 {"text": "No repeated words.", "kind": "hard"}]
    assert [r["text"] for r in hist[2]["rubric"]] == ["Is it short?", "Is it on topic?",
                                                     "Is it polite?"]
    assert judge.default_rubric == hist[2]["rubric"]   # the scorer reads the newest
    # the instruction: the rubric then in force, the rows graded with it, best score first
    first, second = meta.seen
    assert "1. Principle: Is it polite?" in first
    assert first.index("long long long long") < first.index("short answer")
    assert "own rubric" not in first                   # a record's own meta.rubric: not shown
    assert "2. Hard rule: No repeated words." in second
    assert "mean judge score 0.550" in hist[1]["reason"]  # (0.9 + 0.2) / 2


def test_junk_meta_answer_keeps_the_old_rubric(tmp_path):
    from alignkit.policy.mpo import MPOCallback
    judge = stub_judge(["Is it polite?"])
    before = list(judge.default_rubric)
    meta = StubMeta(["I cannot help with that.", "1. a\n- 7"])  # no list / no 2-letter item
    cb = MPOCallback(judge, meta, tmp_path, every=1, seed=0)
    drive(cb, 2)
    assert len(meta.seen) == 2 and judge.default_rubric == before
    assert [h["version"] for h in lines(tmp_path / "rubrics.jsonl")] == [0]


def test_resume_keeps_versions_up_to_the_checkpoint(tmp_path):
    from alignkit.policy.mpo import MPOCallback
    judge = stub_judge(["A?"])
    cb = MPOCallback(judge, StubMeta(["1. Is B?", "1. Is C?"]), tmp_path, every=2, seed=0)
    drive(cb, 4)
    judge2 = stub_judge(["A?"])
    cb2 = MPOCallback(judge2, StubMeta([]), tmp_path, every=2, seed=0)
    cb2.on_train_begin(None, state(3), None)           # resumed from checkpoint-3
    assert [h["step"] for h in lines(tmp_path / "rubrics.jsonl")] == [0, 2]
    assert judge2.default_rubric == [{"text": "Is B?", "kind": "principle"}]


def test_pick_rows_is_seeded_and_skips_own_rubrics():
    from alignkit.policy.mpo import pick_rows
    rows = [{"score": i / 10, "default_rubric": i != 3} for i in range(10)]
    a, b = pick_rows(rows, 4, 7), pick_rows(rows, 4, 7)
    assert a == b and len(a) == 4 and all(r["default_rubric"] for r in a)
    assert pick_rows(rows, 4, 8) != a or pick_rows(rows, 4, 9) != a
    assert len(pick_rows(rows, 50, 0)) == 9


def test_mpo_cli_writes_the_history(env, tiny_model):
    out = env["dir"] / "mpo-out"
    assert run(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
                "--reward", f"judge:{tiny_model}", "--rubric", env["rubric"],
                "--meta-judge", tiny_model, "--meta-every", 1, "--max-steps", 2,
                "--batch-size", 4, "--max-new-tokens", 8, "-o", out]) == 0
    hist = lines(out / "rubrics.jsonl")
    assert len(hist) >= 2 and hist[0] == {"version": 0, "step": 0, "reason":
                                          "initial rubric (--rubric)",
                                          "rubric": [{"text": "Is it polite?",
                                                      "kind": "principle"}]}
    assert [h["version"] for h in hist] == list(range(len(hist)))
    assert [h["step"] for h in hist[1:]] == sorted({h["step"] for h in hist[1:]})
    assert all(1 <= h["step"] <= 2 and h["rubric"] for h in hist[1:])
    versions = [m["mpo/rubric_version"] for m in lines(out / "metrics.jsonl")
                if "mpo/rubric_version" in m]
    assert versions and versions[-1] == hist[-1]["version"]


def test_mpo_cli_same_seed_same_history(env, tiny_model):
    hists = []
    for name in ("mpo-s1", "mpo-s2"):
        out = env["dir"] / name
        assert run(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
                    "--reward", f"judge:{tiny_model}", "--rubric", env["rubric"],
                    "--meta-judge", tiny_model, "--meta-every", 1, "--max-steps", 1,
                    "--batch-size", 4, "--max-new-tokens", 8, "-o", out]) == 0
        hists.append((out / "rubrics.jsonl").read_text())
    assert hists[0] == hists[1] and len(hists[0].splitlines()) == 2


@pytest.mark.parametrize("extra,needle", [
    (["--reward", "length", "--meta-judge", "M"], "needs a judge reward"),
    (["--reward", "judge:M", "--meta-judge", "M"], "give --rubric FILE"),
    (["--reward", "length", "--meta-every", 3], "--meta-every needs --meta-judge"),
])
def test_mpo_usage_errors(env, tiny_model, cli, extra, needle):
    extra = [str(tiny_model) if x == "M" else x for x in extra]
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
             "-o", env["dir"] / "bad", "--max-steps", 1, *extra])
    assert r.code == 2 and needle in r.err, r


def test_judge_scores_with_the_rubric_set_by_mpo(tiny_model, tmp_path):
    from alignkit.scorers import build_scorer
    from alignkit.scorers.base import Item
    (tmp_path / "r.txt").write_text("Is it polite?\n")
    scorer = build_scorer([f"judge:{tiny_model}"], rubric=str(tmp_path / "r.txt"))
    judge = scorer.scorers[0]
    items = [Item("Say hi", "hi", {}), Item("Say hi", "hello", {"rubric": ["Own?"]})]
    judge.score(items)
    assert [r["text"] for r in items[0].extra["judge"]] == ["Is it polite?"]
    assert [r["score"] for r in judge.last_scored] == [pytest.approx(items[0].extra["judge"][0]
                                                                     ["p_yes"]), pytest.approx(
        items[1].extra["judge"][0]["p_yes"])]
    assert [r["default_rubric"] for r in judge.last_scored] == [True, False]
    judge.set_rubric([{"text": "Is it short?", "kind": "hard"}, "Is it kind?"])
    items = [Item("Say hi", "hi", {}), Item("Say hi", "hello", {"rubric": ["Own?"]})]
    judge.score(items)
    assert [(r["text"], r["kind"]) for r in items[0].extra["judge"]] == [
        ("Is it short?", "hard"), ("Is it kind?", "principle")]
    assert [r["text"] for r in items[1].extra["judge"]] == ["Own?"]   # its own rubric stays
    from alignkit.errors import UsageError
    with pytest.raises(UsageError, match="rubric"):
        judge.set_rubric([{"text": ""}])


# --- BARFI: the pure update ------------------------------------------------------------------

def test_blend_update_on_hand_made_vectors():
    from alignkit.policy.reward_blend import blend_update
    # cos(g_P, a1) = 1, cos(g_P, a2) = 0, cos(g_P, a3) = -1/sqrt(2)
    phi = blend_update([1.0, 1.0, 1.0], [2.0, 0.0, 0.0],
                       [[3.0, 0.0, 0.0], [0.0, 3.0, 4.0], [-1.0, 1.0, 0.0]], lr=0.5)
    assert phi == pytest.approx([1.5, 1.0, 1.0 - 0.5 / math.sqrt(2)])
    assert blend_update([0.1], [1.0, 0.0], [[-1.0, 0.0]], lr=0.5) == [0.0]   # projected to >= 0
    assert blend_update([0.7], [0.0, 0.0], [[1.0, 2.0]], lr=0.5) == [0.7]    # zero norm: no step
    assert blend_update([0.7], [1.0, 2.0], [[0.0, 0.0]], lr=0.5) == [0.7]
    with pytest.raises(ValueError):
        blend_update([1.0], [1.0, 2.0], [[1.0]], lr=0.1)


def test_blend_learns_the_aligned_auxiliary_on_a_bandit():
    """A 4-armed softmax bandit: J_k(θ) = Σ_a π_a R_k(a), exact gradients
    g_k = π ⊙ (R_k − π·R_k). The primary wants arm 0; aux A agrees (arm 0 best), aux B
    pays for arm 3. Inner steps on the blend, the outer update after each."""
    import torch
    from alignkit.policy.reward_blend import blend_update
    R_P = torch.tensor([1.0, 0.0, 0.0, 0.0])
    R_A = torch.tensor([0.8, 0.3, 0.0, 0.0])
    R_B = torch.tensor([0.0, 0.0, 0.0, 1.0])
    theta = torch.zeros(4)
    phi = [1.0, 1.0]
    grad = lambda pi, R: pi * (R - (pi * R).sum())  # noqa: E731
    for _ in range(5):
        pi = torch.softmax(theta, 0)
        g_p, g_a, g_b = grad(pi, R_P), grad(pi, R_A), grad(pi, R_B)
        theta = theta + 1.0 * (g_p + phi[0] * g_a + phi[1] * g_b)
        phi = blend_update(phi, g_p.tolist(), [g_a.tolist(), g_b.tolist()], lr=0.3)
    assert phi[0] > 1.0 > phi[1] and phi[0] > phi[1]
    # first update by hand: π uniform, g_P = (0.75, -.25, -.25, -.25)/4,
    # g_A ∝ (0.525, 0.025, -0.275, -0.275), g_B ∝ (-.25, -.25, -.25, .75)
    gp, ga, gb = [0.75, -0.25, -0.25, -0.25], [0.525, 0.025, -0.275, -0.275], [-.25, -.25, -.25, .75]
    cos = lambda u, v: sum(a * b for a, b in zip(u, v)) / math.sqrt(  # noqa: E731
        sum(a * a for a in u) * sum(b * b for b in v))
    one = blend_update([1.0, 1.0], [x / 4 for x in gp], [[x / 4 for x in ga], [x / 4 for x in gb]],
                       lr=0.3)
    assert one == pytest.approx([1.0 + 0.3 * cos(gp, ga), 1.0 + 0.3 * cos(gp, gb)])
    assert cos(gp, gb) == pytest.approx(-1 / 3)


def test_component_advantages_by_hand():
    import torch
    from alignkit.policy.reward_blend import component_advantages
    nan = float("nan")
    r = torch.tensor([[1.0, 0.0], [3.0, nan], [5.0, 2.0], [5.0, 4.0]])
    a = component_advantages(r, 2, "none")
    assert a.tolist() == [[-1.0, 0.0], [1.0, 0.0], [0.0, -1.0], [0.0, 1.0]]
    g = component_advantages(r, 2, "group")
    s = math.sqrt(2)  # the std of (1, 3) and of (2, 4), Bessel-corrected
    assert g[:, 0].tolist() == pytest.approx([-1 / (s + 1e-4), 1 / (s + 1e-4), 0.0, 0.0])
    assert g[:, 1].tolist() == pytest.approx([0.0, 0.0, -1 / (s + 1e-4), 1 / (s + 1e-4)])


def test_primary_index_and_checks():
    from alignkit.errors import UsageError
    from alignkit.policy import get
    from alignkit.policy.reward_blend import check, primary_index, static_weights
    specs = ["rules", "length"]
    assert primary_index("learn:length", specs) == 1 and primary_index("1,0.5", specs) is None
    assert static_weights("learn:length") is None and static_weights("1,2") == "1,2"
    with pytest.raises(UsageError, match="--reward-weights learn:nope"):
        primary_index("learn:nope", specs)
    with pytest.raises(UsageError, match="auxiliary"):
        primary_index("learn:rules", ["rules"])
    with pytest.raises(UsageError, match="not p3o"):
        check(get("p3o"), {}, "learn:rules", specs, None)
    with pytest.raises(UsageError, match="--blend-lr needs --reward-weights learn"):
        check(get("grpo"), {"blend_lr": 0.5}, None, specs, None)


# --- BARFI: the CLI ----------------------------------------------------------------------------

@pytest.mark.parametrize("method,extra", [
    ("grpo", []), ("gtpo", ["--lora-r", 4, "--entropy-threshold", 100])])
def test_blend_cli_logs_the_weight_trajectory(env, tiny_model, method, extra):
    out = env["dir"] / f"blend-{method}"
    assert run(["train-policy", "--method", method, "--model", tiny_model, env["prompts"],
                "--reward", env["short"], "--reward", env["long"], "--reward-weights",
                f"learn:{env['short']}", "--blend-lr", 0.1, "--max-steps", 3, "--batch-size", 4,
                "--max-new-tokens", 8, "--temperature", 1.5, "-o", out, *extra]) == 0
    ms = [m for m in lines(out / "metrics.jsonl") if f"reward_weight/{env['long']}" in m]
    assert len(ms) == 3
    assert all(m[f"reward_weight/{env['short']}"] == 1.0 for m in ms)
    # long = -short: A_long = -A_short, so cos = -1 wherever a group's lengths differ
    # (else 0): the weight falls by 0.1 per update, never rises
    w = [m[f"reward_weight/{env['long']}"] for m in ms]
    cos = [m[f"blend/cos/{env['long']}"] for m in ms]
    assert all(c == pytest.approx(-1.0, abs=1e-4) or c == 0.0 for c in cos)
    expect, phi = [], 1.0
    for c in cos:
        phi = max(0.0, phi + 0.1 * c)
        expect.append(phi)
    assert w == pytest.approx(expect, abs=1e-4) and w[-1] < 1.0


@pytest.mark.parametrize("extra,needle", [
    (["--reward", "length", "--reward", "rules", "--reward-weights", "learn:NOTAREWARD"],
     "--reward-weights learn:NOTAREWARD"),
    (["--reward", "length", "--blend-every", 2], "--blend-every needs --reward-weights learn"),
])
def test_blend_usage_errors(env, tiny_model, cli, extra, needle):
    r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
             "-o", env["dir"] / "bad", "--max-steps", 1, *extra])
    assert r.code == 2 and needle in r.err, r


@pytest.mark.slow
def test_smollm2_meta_judge_rewrites_the_rubric(env, tiny_model, smollm2):
    """SmolLM2 as judge and meta-judge (the same folder: loaded once) over a tiny policy:
    its answer to the refinement prompt parses into a new rubric."""

    judge = smollm2
    out = env["dir"] / "mpo-smol"
    assert run(["train-policy", "--method", "grpo", "--model", tiny_model, env["prompts"],
                "--reward", f"judge:{judge}", "--rubric", env["rubric"], "--meta-judge", judge,
                "--meta-every", 1, "--meta-samples", 4, "--max-steps", 1, "--batch-size", 4,
                "--max-new-tokens", 16, "-o", out]) == 0
    hist = lines(out / "rubrics.jsonl")
    assert [h["version"] for h in hist] == [0, 1] and hist[1]["step"] == 1
    assert hist[1]["rubric"] and hist[1]["rubric"] != hist[0]["rubric"]
