"""alignkit eval: metrics on hand-made samples (exact values), model-vs-itself sanity
(KL 0, win rate one half), the report folder, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import write_jsonl


def _samples():
    # two prompts with checks; first completion of each is what IFEval-style accuracy uses
    return [
        {"id": "a", "prompt": "Say hi in lowercase.",
         "meta": {"checks": [{"type": "all_lowercase"}, {"type": "max_words", "n": 3}]},
         "completions": [{"text": "hi there"}, {"text": "HELLO THERE FRIEND, HOW ARE YOU"}]},
        {"id": "b", "prompt": "Use no commas.",
         "meta": {"checks": [{"type": "no_commas"}]},
         "completions": [{"text": "yes, sure"}, {"text": "no commas here"}]},
    ]


def test_eval_samples_exact_metrics(cli, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _samples())
    r = cli(["eval", path, "--scorer", "rules", "--n-boot", "200"])
    assert r.code == 0, r
    m = json.loads(r.out)["models"]["samples"]
    rules = m["rules"]
    # first completions: "hi there" passes both; "yes, sure" fails no_commas
    assert rules["prompt_level"] == 0.5
    assert rules["instruction_level"] == pytest.approx(2 / 3)
    assert rules["per_check"]["no_commas"] == {"pass_rate": 0.0, "n": 1}
    # mean score per prompt over its completions: a: (1 + 0)/2, b: (0 + 1)/2
    assert m["score"]["mean"] == pytest.approx(0.5)
    assert m["distinct_1"] > 0


def test_eval_report_files(cli, tmp_path):
    path = write_jsonl(tmp_path / "s.jsonl", _samples())
    rep = tmp_path / "rep"
    r = cli(["eval", path, "--scorer", "rules", "--report", rep, "--n-boot", "100"])
    assert r.code == 0, r
    text = (rep / "report.md").read_text()
    assert "prompt-level" in text and "no_commas" in text
    assert (rep / "scores.png").stat().st_size > 1000
    assert (rep / "checks.png").stat().st_size > 1000
    assert json.loads((rep / "metrics.json").read_text())["models"]["samples"]["n_prompts"] == 2


def test_eval_model_against_itself(cli, tmp_path, tiny_model):
    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"id": f"p{i}", "prompt": f"Tell me about topic {i}.",
         "meta": {"checks": [{"type": "max_words", "n": 5}]}} for i in range(3)])
    r = cli(["eval", "--model", tiny_model, "--baseline", tiny_model, prompts,
             "--max-new-tokens", "8", "--n-boot", "100", "--dtype", "float32"])
    assert r.code == 0, r
    m = json.loads(r.out)
    c = m["comparisons"]["model"]
    # same model, greedy: identical completions -> all ties, zero KL
    assert c["win_rate"]["win_rate"] == 0.5 and c["win_rate"]["ties"] == 3
    assert c["kl"]["k1_mean"] == pytest.approx(0.0, abs=1e-5)
    assert c["kl"]["k3_mean"] == pytest.approx(0.0, abs=1e-5)
    assert 0 < c["topk_mass"] <= 1.0
    assert c["prompt_level_diff"]["diff"] == 0.0


def test_eval_kl_between_two_models_matches_the_exact_value(cli, tmp_path, tiny_model, tiny_model_b):
    """One-token completions: the sequence KL is the KL of the first-token distributions,
    computed here independently from the two models' logits. The exact estimator gives
    it to float precision on every sample, and k1/k3 (on temperature-1 samples, not the
    greedy evaluation samples) agree within their standard errors."""
    import torch

    from alignkit.models import load_causal_lm
    from alignkit.text import encode_prompt, render_prompt
    texts = [f"Tell me about topic {i}." for i in range(4)]
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": t}
                                                 for i, t in enumerate(texts)])
    r = cli(["eval", "--model", tiny_model, "--baseline", tiny_model_b, prompts, "--scorer",
             "length", "--max-new-tokens", "1", "--kl-samples", "64", "--n-boot", "10",
             "--dtype", "float32"])
    assert r.code == 0, r
    kl = json.loads(r.out)["comparisons"]["model"]["kl"]
    m, tok = load_causal_lm(str(tiny_model), "float32")
    b, _ = load_causal_lm(str(tiny_model_b), "float32")
    true = []
    with torch.inference_mode():
        for t in texts:
            ids = torch.tensor([encode_prompt(tok, render_prompt(tok, t))])
            lp = torch.log_softmax(m(input_ids=ids).logits[0, -1].double(), -1)
            lq = torch.log_softmax(b(input_ids=ids).logits[0, -1].double(), -1)
            true.append(float((lp.exp() * (lp - lq)).sum()))
    want = sum(true) / len(true)
    assert want > 0.01  # the two models differ
    assert kl["n"] == 4 * 64 and kl["samples_per_prompt"] == 64
    assert kl["exact_mean"] == pytest.approx(want, rel=1e-4)
    for k in ("k1", "k3"):
        assert abs(kl[f"{k}_mean"] - want) < 4 * kl[f"{k}_se"] + 1e-3, (k, kl, want)
    assert "temperature 1" in kl["what"]


def test_sequence_kl_matches_each_sequence_scored_alone(tiny_model, tiny_model_b):
    """The batched, left-padded KL pass (completion positions only) gives, per item and in
    the items' order, the per-token log-probs under both models and the summed exact KL
    of one unpadded forward per sequence; an empty completion gets empty lists and 0;
    the top-k indicators equal stats.topk_entropy_mass over all completion positions."""
    import torch

    from alignkit import stats
    from alignkit.evaluation import sequence_kl
    from alignkit.models import load_causal_lm
    m, _ = load_causal_lm(str(tiny_model), "float32")
    b, _ = load_causal_lm(str(tiny_model_b), "float32")
    g = torch.Generator().manual_seed(0)
    items = [(torch.randint(3, 200, (p,), generator=g).tolist(),
              torch.randint(3, 200, (c,), generator=g).tolist())
             for p, c in [(7, 5), (3, 11), (12, 1), (5, 0), (9, 8), (4, 3)]]
    lp_m, lp_b, exact, topk = sequence_kl(m, b, items, pad=0)
    logqs = []
    with torch.inference_mode():
        for i, (p, c) in enumerate(items):
            if not c:
                assert lp_m[i] == [] and lp_b[i] == [] and exact[i] == 0.0
                continue
            ids = torch.tensor([p + c])
            lq = torch.log_softmax(m(input_ids=ids).logits[0].double(), -1)[len(p) - 1:-1]
            lr = torch.log_softmax(b(input_ids=ids).logits[0].double(), -1)[len(p) - 1:-1]
            tgt = torch.tensor(c)[:, None]
            assert lp_m[i] == pytest.approx(lq.gather(1, tgt)[:, 0].tolist(), abs=1e-4)
            assert lp_b[i] == pytest.approx(lr.gather(1, tgt)[:, 0].tolist(), abs=1e-4)
            assert exact[i] == pytest.approx(float((lq.exp() * (lq - lr)).sum()), abs=1e-4)
            logqs.append(lq)
    h, mass = stats.topk_entropy_mass(torch.cat(logqs), k=10)
    assert topk == pytest.approx((h, mass), abs=1e-4)
    assert sequence_kl(m, b, items, pad=0, topk=False)[3] is None


def test_eval_bad_input(cli, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x", "completions": []}\n')
    r = cli(["eval", bad])
    assert r.code == 3 and "bad.jsonl:1: completions" in r.err
    assert cli(["eval", bad, "--baseline", "x"]).code == 2
    assert cli(["eval", bad, "--scorer", "rules", "--weights", "1,2"]).code == 2


def test_eval_report_never_clobbers_and_bad_outputs_fail_first(cli, tmp_path, monkeypatch):
    """An existing non-empty --report folder needs --force; a file there is never replaced;
    a bad --samples-out or --report path fails before any evaluation runs."""
    import alignkit.evaluation as ev
    path = write_jsonl(tmp_path / "s.jsonl", _samples())
    data = tmp_path / "data.jsonl"
    data.write_text("precious\n")
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    r = cli(["eval", path, "--report", data, "--n-boot", "10"])
    assert r.code == 2 and "not a folder" in r.err and data.read_text() == "precious\n"
    r = cli(["eval", path, "--report", model_dir, "--n-boot", "10"])
    assert r.code == 2 and "--force" in r.err and (model_dir / "config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no .old, no temp
    r = cli(["eval", path, "--report", model_dir, "--force", "--n-boot", "10"])
    assert r.code == 0 and (model_dir / "report.md").exists()

    def boom(*a, **k):
        raise AssertionError("evaluation ran before the output paths were checked")
    monkeypatch.setattr(ev, "evaluate", boom)
    for args in (["--samples-out", tmp_path / "missing" / "s.jsonl"],
                 ["--samples-out", tmp_path],
                 ["--report", tmp_path / "data.jsonl" / "sub"]):
        r = cli(["eval", path, *args, "--n-boot", "10"])
        assert r.code == 2, (args, r)


def test_ifeval_strict_and_loose_accuracies_on_known_outcomes(cli, tmp_path):
    """Loose accuracy tries the response without its first/last line and without '*'
    (IFEval / lm-evaluation-harness); four hand-made prompts with known outcomes."""
    recs = [
        # strict fails (capital in the preamble line), loose passes (first line dropped)
        {"id": "a", "prompt": "lowercase please", "meta": {"checks": [{"type": "all_lowercase"}]},
         "completions": [{"text": "Sure! Here it is:\nhello there friend"}]},
        # strict fails (trailing sign-off), loose passes (last line dropped)
        {"id": "b", "prompt": "end with done.", "meta": {"checks": [{"type": "ends_with", "phrase": "done."}]},
         "completions": [{"text": "all good, done.\nHope this helps!"}]},
        # passes both
        {"id": "c", "prompt": "no commas", "meta": {"checks": [{"type": "no_commas"}, {"type": "max_words", "n": 5}]},
         "completions": [{"text": "no commas here"}]},
        # fails both: one check of two fails in every variant
        {"id": "d", "prompt": "short, no commas", "meta": {"checks": [{"type": "no_commas"}, {"type": "max_words", "n": 2}]},
         "completions": [{"text": "one, two, three, four"}]},
    ]
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    r = cli(["eval", path, "--scorer", "rules", "--n-boot", "200"])
    assert r.code == 0, r
    rules = json.loads(r.out)["models"]["samples"]["rules"]
    assert rules["prompt_level"] == pytest.approx(1 / 4)          # c
    assert rules["prompt_level_loose"] == pytest.approx(3 / 4)    # a, b, c
    assert rules["instruction_level"] == pytest.approx(2 / 6)     # c: 2 of 2; a, b, d: 0
    assert rules["instruction_level_loose"] == pytest.approx(4 / 6)  # + a, b
    for key in ("prompt_level_ci", "prompt_level_loose_ci", "instruction_level_ci",
                "instruction_level_loose_ci"):
        ci = rules[key]
        assert ci["lo"] <= ci["mean"] <= ci["hi"], key
