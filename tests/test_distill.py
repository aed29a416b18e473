"""`alignkit distill`: the custom losses against direct implementations on hand-made
logits, and every method end to end on tiny Llamas (loss goes down, the folder loads,
same seed -> same weights), tokenizer mismatch (exit 2) and bad records (exit 3)."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from alignkit.distill import losses
from conftest import write_jsonl

PROMPTS = ["Write a short answer.", "Explain why the sky is blue.",
           "Give three tips for cooking rice.", "Hello thanks please",
           "Use bullet points and a title.", "Answer in at most fifty words.",
           "Tell me about music and art.", "What is math?"]
POLICY = "Always answer yes. Use bullet points, a title and no commas. End with thanks."


def _lsm(xs):
    m = max(xs)
    z = m + math.log(sum(math.exp(x - m) for x in xs))
    return [x - z for x in xs]


def _kl(lq, lp):  # KL(q || p) from log-probabilities
    return sum(math.exp(a) * (a - b) for a, b in zip(lq, lp))


# --- losses on hand-made logits -------------------------------------------------------------

def test_aligndistil_teacher_weight_exact():
    # pi_d = [1/4, 3/4], pi_r = [1/2, 1/2]: L1 = 1/2, w = beta2 * 1/2 + 1e-3
    z_d = torch.tensor([[0.0, math.log(3.0)]], dtype=torch.float64)
    z_r = torch.zeros(1, 2, dtype=torch.float64)
    lp, w = losses.aligndistil_teacher(z_d, z_r, beta2=2.0, contrast="reverse")
    assert w.item() == pytest.approx(1.001, abs=1e-12)
    # z* = z_d + w (z_d - z_r) = [0, 2.001 ln 3] -> pi*(1) = 3^2.001 / (1 + 3^2.001)
    assert lp.exp()[0, 1].item() == pytest.approx(3 ** 2.001 / (1 + 3 ** 2.001), abs=1e-12)
    # theorem-1 form: z* = w z_d + (1 - w) z_ref = [0, 1.001 ln 3]
    lp, _ = losses.aligndistil_teacher(z_d, z_r, beta2=2.0, contrast="reference")
    assert lp.exp()[0, 1].item() == pytest.approx(3 ** 1.001 / (1 + 3 ** 1.001), abs=1e-12)
    # identical models: w is the floor 1e-3; a fixed weight overrides it
    _, w = losses.aligndistil_teacher(z_d, z_d, beta2=10.0)
    assert w.item() == pytest.approx(1e-3, abs=1e-15)
    _, w = losses.aligndistil_teacher(z_d, z_r, weight=0.25)
    assert w.tolist() == [0.25]


@pytest.mark.parametrize("contrast,weight,len_norm,temp", [
    ("reverse", None, True, 1.0), ("reference", None, False, 1.0), ("reverse", 0.5, True, 2.0)])
def test_aligndistil_loss_matches_direct(contrast, weight, len_norm, temp):
    """Against the reference code's formula on raw logits, in plain Python."""
    zs = [[0.3, -1.0, 2.0], [1.5, 0.0, -0.5], [0.0, 0.0, 0.0]]
    zd = [[1.0, 0.5, -2.0], [0.2, 2.0, 0.1], [-1.0, 3.0, 0.5]]
    zr = [[0.0, 1.5, -1.0], [1.0, 0.0, 0.3], [0.5, 0.5, 0.5]]
    seg = [0, 0, 1]
    beta, beta2 = 0.1, 10.0
    per_tok = []
    for s, d, r in zip(zs, zd, zr):
        pd, pr = [math.exp(x) for x in _lsm(d)], [math.exp(x) for x in _lsm(r)]
        w = weight if weight is not None else beta2 * sum(abs(a - b) for a, b in zip(pd, pr)) + 1e-3
        if contrast == "reverse":
            z = [a + w * (a - b) for a, b in zip(d, r)]
        else:
            z = [w * a + (1 - w) * b for a, b in zip(d, r)]
        per_tok.append(beta / w * _kl(_lsm(s), _lsm([x / temp for x in z])))
    rows = [[v for v, g in zip(per_tok, seg) if g == k] for k in (0, 1)]
    expect = sum((sum(r) / len(r) if len_norm else sum(r)) for r in rows) / 2
    t = lambda x: torch.tensor(x, dtype=torch.float64)
    loss, stats = losses.aligndistil_loss(t(zs), t(zd), t(zr), torch.tensor(seg), 2, beta=beta,
                                          beta2=beta2, contrast=contrast, weight=weight,
                                          temperature=temp, len_norm=len_norm)
    assert loss.item() == pytest.approx(expect, abs=1e-12)
    assert stats["weight"].shape == (3,)


def test_tvdpp_loss_exact_and_gradient():
    q = [[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]       # student (draft)
    p = [[0.6, 0.25, 0.15], [0.3, 0.3, 0.4]]     # teacher (target)
    # R = 1{p > q}: [1, 0, 0], [1, 1, 0]; q-weighted moments over 2 positions x vocab
    mu = (0.5 + 0.2) / 2
    var = (0.5 * (1 - mu) ** 2 + 0.5 * mu ** 2 + 0.2 * (1 - mu) ** 2 + 0.8 * mu ** 2) / 2
    assert var == pytest.approx(0.2275)
    r = [[1, 0, 0], [1, 1, 0]]
    expect = -sum(qi * (ri - mu) / math.sqrt(var) * math.log(qi)
                  for qr, rr in zip(q, r) for qi, ri in zip(qr, rr)) / 2
    s = torch.tensor(q, dtype=torch.float64).log().requires_grad_(True)
    t = torch.tensor(p, dtype=torch.float64).log()
    loss, stats = losses.tvdpp_loss(s, t, eps=0.0)
    assert loss.item() == pytest.approx(expect, abs=1e-12)
    assert stats["mu"].item() == pytest.approx(0.35, abs=1e-12)
    assert stats["sigma"].item() == pytest.approx(math.sqrt(0.2275), abs=1e-12)
    assert stats["tvd"].tolist() == pytest.approx([0.1, 0.4], abs=1e-12)
    # exact expectation: the baseline drops out, grad = grad(mean TVD) / sigma
    loss.backward()
    s2 = s.detach().clone().requires_grad_(True)
    (losses.tvd(s2, t).mean() / math.sqrt(0.2275)).backward()
    assert torch.allclose(s.grad, s2.grad, atol=1e-12)


def test_context_kl_exact():
    teacher = torch.tensor([[0.5, 0.5], [0.9, 0.1]], dtype=torch.float64).log()
    student = torch.tensor([[0.25, 0.75], [0.9, 0.1]], dtype=torch.float64).log()
    loss, stats = losses.context_loss(student, teacher)
    kl0 = 0.5 * math.log(2) + 0.5 * math.log(2 / 3)
    assert stats["kl"].tolist() == pytest.approx([kl0, 0.0], abs=1e-12)
    assert loss.item() == pytest.approx(kl0 / 2, abs=1e-12)
    # gkd's JSD at beta=0 is the same forward KL
    assert losses.generalized_jsd(student, teacher, 0.0).tolist() == pytest.approx([kl0, 0.0], abs=1e-9)


def test_with_policy_puts_the_policy_in_context(tiny_model):
    from alignkit.distill.data import with_policy
    from alignkit.models import load_tokenizer
    tok = load_tokenizer(tiny_model)
    assert with_policy(tok, "hi", "RULES") == [{"role": "system", "content": "RULES"},
                                               {"role": "user", "content": "hi"}]
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert with_policy(tok, chat, "RULES")[0] == {"role": "system", "content": "RULES\n\nBe brief."}
    assert chat[0]["content"] == "Be brief."  # the record is not modified
    tok.chat_template = None
    assert with_policy(tok, "hi", "RULES") == "RULES\n\nhi"


def test_collator_lines_up_teacher_and_student_positions():
    from alignkit.distill.trainer import DistillCollator, segments
    rows = [{"index": 0, "prompt_ids": [5, 6], "teacher_prompt_ids": [9, 9, 9, 5, 6],
             "completion_ids": [7, 8]},
            {"index": 1, "prompt_ids": [5], "teacher_prompt_ids": [9, 5], "completion_ids": [4, 3, 2]}]
    b = DistillCollator(0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8], [5, 4, 3, 2]]
    assert b["completion_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 1, 1]]
    assert b["teacher_input_ids"].tolist() == [[9, 9, 9, 5, 6, 7, 8], [9, 5, 4, 3, 2, 0, 0]]
    for p in ("", "teacher_"):  # the tokens predicted at the selected positions
        sel = b[f"{p}completion_mask"][:, 1:].bool()
        assert b[f"{p}input_ids"][:, 1:][sel].tolist() == [7, 8, 4, 3, 2]
        assert segments(b[f"{p}completion_mask"]).tolist() == [0, 0, 1, 1, 1]


# --- end to end ------------------------------------------------------------------------------

@pytest.fixture
def data(tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": p} for p in PROMPTS[:-1]] + [
        {"prompt": [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": PROMPTS[-1]}]}])
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": p, "chosen": "good answer yes thanks", "rejected": "bad no"} for p in PROMPTS])
    (tmp_path / "policy.txt").write_text(POLICY)
    return {"prompts": prompts, "pairs": pairs, "policy": tmp_path / "policy.txt"}


FAST = ["--batch-size", "8", "--max-new-tokens", "12", "--eval-split", "0.25"]


def _run(cli, out, args, steps=6, lr="1e-3"):
    res = cli(["distill", *args, "-o", out, "--max-steps", steps, "--lr", lr, *FAST])
    assert res.code == 0, res
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    info = json.loads((out / "alignkit.json").read_text())
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.model_type == "llama"
    return [r for r in rows if "loss" in r], info, res


def test_aligndistil_off_policy_lowers_loss(cli, tiny_model, tiny_model_b, data, tmp_path):
    steps, info, res = _run(cli, tmp_path / "ad", ["--method", "aligndistil", "--teacher", tiny_model,
                            "--teacher-ref", tiny_model_b, "--student", tiny_model_b, data["pairs"]])
    assert len(steps) == 6 and steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    assert steps[-1]["kl_to_target"] < steps[0]["kl_to_target"] and steps[0]["weight"] > 1e-3
    held = info["metrics"]["heldout"]
    assert held["responses"] == 2 and held["after"] < held["before"]
    assert info["responses"] == "given" and info["counts"]["train_rows"] == 6
    assert (info["distill_options"]["beta"], info["distill_options"]["beta2"]) == (0.1, 10.0)
    assert "kl(student||aligndistil_target)" in res.err


def _weights(folder):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_aligndistil_on_policy_same_seed_same_weights(cli, tiny_model, tiny_model_b, data, tmp_path):
    args = ["--method", "aligndistil", "--on-policy", "--contrast", "reference", "--teacher",
            tiny_model, "--teacher-ref", tiny_model_b, "--student", tiny_model_b, data["prompts"]]
    s1, info, _ = _run(cli, tmp_path / "a", args, steps=2)
    _run(cli, tmp_path / "b", args, steps=2)
    opts = info["distill_options"]
    assert info["responses"] == "student" and (opts["contrast"], opts["beta2"]) == ("reference", 15.0)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = _weights(tiny_model_b)
    assert any(not torch.equal(a[k], base[k]) for k in a)  # it did train


def test_tvdpp_fresh_student(cli, tiny_model, data, tmp_path):
    steps, info, _ = _run(cli, tmp_path / "tv", ["--method", "tvdpp", "--teacher", tiny_model,
                          "--student-config", "hidden=32,layers=1", data["prompts"]], steps=8)
    assert steps[-1]["tvd"] < steps[0]["tvd"]
    cfg = json.loads((tmp_path / "tv" / "config.json").read_text())
    assert (cfg["hidden_size"], cfg["num_hidden_layers"]) == (32, 1)
    from transformers import AutoTokenizer
    assert AutoTokenizer.from_pretrained(tmp_path / "tv").get_vocab() == \
        AutoTokenizer.from_pretrained(tiny_model).get_vocab()
    assert info["responses"] == "teacher" and info["student"] == "fresh:hidden=32,layers=1"


def test_gkd_through_trl(cli, tiny_model, tiny_model_b, data, tmp_path):
    steps, info, _ = _run(cli, tmp_path / "g", ["--method", "gkd", "--teacher", tiny_model,
                          "--student", tiny_model_b, "--lmbda", "0", "--beta", "0.5",
                          data["pairs"]])
    assert steps[-1]["loss"] < 0.8 * steps[0]["loss"]
    assert info["metrics"]["heldout"]["after"] < info["metrics"]["heldout"]["before"]
    # lmbda 1: every step trains on completions the student generates (TRL's generate path)
    steps, info, _ = _run(cli, tmp_path / "g1", ["--method", "gkd", "--teacher", tiny_model,
                          "--student", tiny_model_b, "--lmbda", "1", data["prompts"]], steps=1)
    assert len(steps) == 1 and steps[0]["loss"] > 0 and info["responses"] == "teacher"


def test_context_moves_student_towards_teacher(cli, tiny_model, data, tmp_path):
    steps, info, res = _run(cli, tmp_path / "cx", ["--method", "context", "--teacher", tiny_model,
                            "--policy", data["policy"], data["prompts"]], steps=8)
    held = info["metrics"]["heldout"]
    assert held["metric"] == "kl(teacher_with_policy||student)" and held["responses"] == 2
    assert 0 < held["after"] < held["before"]
    assert steps[-1]["loss"] < steps[0]["loss"]
    assert info["student"] == str(tiny_model) and info["policy_chars"] == len(POLICY)
    assert "before" in res.err and "after" in res.err


def test_mismatched_tokenizers_exit_2(cli, tiny_model, tiny_model_b, data, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny_model_b, other)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra_a>", "<extra_b>"])
    tok.save_pretrained(other)
    res = cli(["distill", "--method", "tvdpp", "--teacher", tiny_model, "--student", other,
               data["prompts"], "-o", tmp_path / "x"])
    assert res.code == 2 and "do not share a tokenizer" in res.err and "514 vs 512" in res.err
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


@pytest.mark.parametrize("records,where", [
    ([{"prompt": "ok"}, {"prompt": 5}], ":2: prompt: expected"),
    ([{"prompt": "a", "chosen": "x", "rejected": "y"}, {"prompt": "b"}], ":2: a prompt record"),
    ([{"prompt": "a", "completion": 3}], ":1: completion: expected"),
])
def test_bad_records_exit_3(cli, tiny_model, tmp_path, records, where):
    path = write_jsonl(tmp_path / "bad.jsonl", records)
    res = cli(["distill", "--method", "context", "--teacher", tiny_model, "--policy", __file__,
               path, "-o", tmp_path / "x"])
    assert res.code == 3 and f"bad.jsonl{where}" in res.err


def test_duplicate_prompt_id_exits_3_at_its_line(cli, tiny_model, tmp_path):
    """A prompt file holds one record per prompt: a repeated id is exit 3 at its line
    (before any model is loaded), nothing written."""
    path = write_jsonl(tmp_path / "dup.jsonl", [{"id": "a", "prompt": "x"},
                                                {"id": "b", "prompt": "y"},
                                                {"id": "a", "prompt": "z"}])
    res = cli(["distill", "--method", "context", "--teacher", tiny_model, "--policy", __file__,
               path, "-o", tmp_path / "x"])
    assert res.code == 3 and f"{path}:3: id: duplicate id 'a'" in res.err, res
    assert not (tmp_path / "x").exists() and not (tmp_path / "x.partial").exists()


def test_load_reads_prompts_completions_and_pairs_as_before(tmp_path):
    """Prompt records with and without a completion share a file (kind "completion"
    when all have one); pairs may repeat ids; a pair among prompts is an error."""
    from alignkit.distill.data import load
    from alignkit.errors import DataError
    mixed = load(str(write_jsonl(tmp_path / "m.jsonl", [
        {"id": "a", "prompt": "x", "completion": "1"}, {"id": "b", "prompt": "y"}])))
    assert (mixed.kind, mixed.lines, mixed.has_completions()) == ("prompt", [1, 2], False)
    given = load(str(write_jsonl(tmp_path / "c.jsonl", [
        {"id": "a", "prompt": "x", "completion": "1"},
        {"id": "b", "prompt": [{"role": "user", "content": "y"}], "completion": "2"}])))
    assert (given.kind, given.has_completions()) == ("completion", True)
    assert [r["completion"] for r in given.records] == ["1", "2"]
    pairs = load(str(write_jsonl(tmp_path / "p.jsonl", [
        {"id": "a", "prompt": "x", "chosen": "1", "rejected": "2"}] * 2)))
    assert pairs.kind == "pair" and len(pairs.records) == 2 and pairs.has_completions()
    import hashlib
    assert pairs.sha256 == hashlib.sha256((tmp_path / "p.jsonl").read_bytes()).hexdigest()
    with pytest.raises(DataError, match=r":2: a pair record in a file of prompt records"):
        load(str(write_jsonl(tmp_path / "x.jsonl", [
            {"prompt": "x", "completion": "1"}, {"prompt": "y", "chosen": "1", "rejected": "2"}])))


def test_given_responses_need_completions_exit_3(cli, tiny_model, data, tmp_path):
    res = cli(["distill", "--method", "tvdpp", "--teacher", tiny_model, "--student", tiny_model,
               "--responses", "given", data["prompts"], "-o", tmp_path / "x"])
    assert res.code == 3 and "prompts.jsonl:1: completion: missing" in res.err


def test_list_methods(cli):
    res = cli(["distill", "--list-methods"])
    assert res.code == 0
    assert [l.split()[0] for l in res.out.splitlines()[1:]] == ["aligndistil", "tvdpp", "gkd", "context"]


def test_help_shows_every_methods_flags(cli, monkeypatch):
    import re

    from alignkit.distill import DISTILL
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    listed = cli(["distill", "--list-methods"]).out
    r = cli(["distill", "--help"])
    assert r.code == 0, r
    flags = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", r.out))
    for e in DISTILL:
        assert e.name in r.out and e.name in listed
        for p in e.params:
            assert p.flag_name in flags and p.flag_name in listed, (e.name, p.flag_name)


def test_method_defaults_come_from_the_entry():
    """beta, beta2 and the sampling temperature: the method's defaults (on-policy ones
    for student responses); the gkd beta range; a flag of another method."""
    from alignkit.distill import DISTILL, DistillConfig
    from alignkit.distill.pipeline import resolve_config
    from alignkit.errors import UsageError

    class Data:
        def has_completions(self):
            return True

    def resolve(method, responses=None, **params):
        cfg = DistillConfig(method=method, teacher="T", student="S", responses=responses,
                            params=params)
        return resolve_config(DISTILL.get(method), cfg, Data())

    c = resolve("gkd")
    assert (c.beta, c.temperature, c.lmbda, c.responses) == (0.5, 0.9, 0.5, "given")
    c = resolve("aligndistil", teacher_ref="R")
    assert (c.beta, c.beta2, c.temperature, c.contrast, c.weight) == (0.1, 10.0, 1.0, "reverse", None)
    c = resolve("aligndistil", "student", teacher_ref="R")
    assert c.beta2 == 15.0 and c.as_dict()["beta2"] == 15.0
    c = resolve("tvdpp")
    assert c.responses == "teacher" and c.temperature == 1.0 and c.beta is None
    assert resolve("gkd", beta=0.2).beta == 0.2
    with pytest.raises(UsageError, match=r"--beta must be in \[0, 1\] for gkd"):
        resolve("gkd", beta=2.0)
    with pytest.raises(UsageError, match="--lmbda does not apply to distill method 'tvdpp'"):
        resolve("tvdpp", lmbda=0.3)
    with pytest.raises(UsageError, match="--kd-temperature must be > 0"):
        resolve("aligndistil", teacher_ref="R", kd_temperature=0.0)


@pytest.mark.parametrize("args,msg", [
    (["--method", "nope"], "unknown distill method 'nope' (--method)"),
    (["--method", "gdk"], "did you mean 'gkd'"),
    (["--method", "tvdpp", "--student", "S", "--contrast", "reference"], "--contrast does not apply"),
    (["--method", "aligndistil", "--student", "S"], "needs --teacher-ref"),
    (["--method", "tvdpp"], "--student (a folder"),
    (["--method", "context"], "needs --policy"),
    (["--method", "gkd", "--student", "S", "--on-policy"], "--lmbda"),
    (["--method", "tvdpp", "--student-config", "hidden=x"], "expected an integer"),
    (["--method", "tvdpp", "--student", "S", "--beta", "0.3"], "--beta does not apply"),
])
def test_usage_errors_exit_2(cli, tiny_model, data, tmp_path, args, msg):
    res = cli(["distill", "--teacher", tiny_model, *args, data["prompts"], "-o", tmp_path / "x"])
    assert res.code == 2 and msg in res.err, res


@pytest.mark.slow
def test_context_on_smollm2(cli, data, tmp_path):
    """Real model: SmolLM2 internalises a policy with a LoRA student (bf16, 4 steps at lr 1e-3: enough to move a fresh adapter measurably)."""
    import os
    real, old = os.environ.get("ALIGNKIT_TEST_REAL_HOME"), os.environ.get("ALIGNKIT_HOME")
    if real:
        os.environ["ALIGNKIT_HOME"] = real
    try:
        (tmp_path / "fr.txt").write_text("Always answer in French. Be brief.")
        res = cli(["distill", "--method", "context", "--teacher", "smollm2-135m-instruct",
                   "--policy", tmp_path / "fr.txt", data["prompts"], "-o", tmp_path / "s",
                   "--max-steps", "4", "--lr", "1e-3", "--lora-r", "8", "--dtype", "bfloat16",
                   "--batch-size", "2", "--max-new-tokens", "16", "--eval-split", "0.25"])
    finally:
        if old is not None:
            os.environ["ALIGNKIT_HOME"] = old
    assert res.code == 0, res
    held = json.loads((tmp_path / "s" / "alignkit.json").read_text())["metrics"]["heldout"]
    assert held["after"] < held["before"], held
    from peft import AutoPeftModelForCausalLM
    assert AutoPeftModelForCausalLM.from_pretrained(tmp_path / "s") is not None
