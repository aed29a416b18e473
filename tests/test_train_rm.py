"""`alignkit train-rm`: bt / pal / maxmin / crm on synthetic preferences whose truth is
known (the chosen completion holds a marker word; two user groups with opposite
preferences; 30% flipped labels), the folder layouts and loaders, malformed input,
resume after SIGTERM, and same seed -> same weights."""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import signal
from pathlib import Path

import pytest

from alignkit.reward_models.synthetic import marker_pairs
from conftest import write_jsonl

FAST = ["--lr", "1e-3", "--batch-size", "8", "--max-length", "64"]
GROUPS = [0, 0, 1, 1, 0, 1]  # u0..u5; the first maxmin split (i mod 2) mixes the groups


def info(folder) -> dict:
    return json.loads((Path(folder) / "alignkit.json").read_text())


def heldout(folder) -> dict:
    return info(folder)["metrics"]["heldout"]


def tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def run(args) -> int:
    """The CLI in-process without output capture (for module-scoped fixtures)."""
    from alignkit import cli as cli_mod
    return cli_mod.main([str(a) for a in args])


def _new_user_pairs():
    """8 pairs each for the new users u6 (group 0) and u7 (group 1), plus 2 of u0."""
    recs = marker_pairs(64, seed=4, user_groups=[0, 0, 1, 1, 0, 1, 0, 1], id_prefix="n")
    new = [r for r in recs if r["meta"]["user"] in ("u6", "u7")]
    return new + [r for r in recs if r["meta"]["user"] == "u0"][:2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("rmdata")
    return {
        "easy": write_jsonl(d / "easy.jsonl", marker_pairs(96, seed=0,
                                                           subsets=["chat", "chat", "code"])),
        "groups": write_jsonl(d / "groups.jsonl", marker_pairs(144, seed=1, user_groups=GROUPS)),
        "new_users": write_jsonl(d / "new.jsonl", _new_user_pairs()),
        "noisy": write_jsonl(d / "noisy.jsonl", marker_pairs(160, seed=2, noise=0.3)),
        "clean": write_jsonl(d / "clean.jsonl", marker_pairs(48, seed=3, id_prefix="c")),
        "dir": d,
    }


@pytest.fixture(scope="module")
def group_models(data, tiny_model):
    """bt, pal and maxmin trained once on the two-group data (seeded)."""
    out = data["dir"] / "models"
    common = ["--model", tiny_model, data["groups"], "--eval-split", "0.25", *FAST]
    assert run(["train-rm", "--method", "bt", "-o", out / "bt", *common, "--epochs", "2"]) == 0
    assert run(["train-rm", "--method", "pal", "-o", out / "pal", *common, "--epochs", "2",
                "--pal-dim", "128"]) == 0
    assert run(["train-rm", "--method", "maxmin", "-o", out / "maxmin", *common,
                "--em-iters", "3"]) == 0
    return {m: out / m for m in ("bt", "pal", "maxmin")}


# --- bt ---------------------------------------------------------------------------------

def test_bt_tiny_learns_marker_and_scores_like_rm_scorer(cli, data, tiny_model, tmp_path):
    out = tmp_path / "rm"
    r = cli(["train-rm", "--method", "bt", "--model", tiny_model, data["easy"], "-o", out,
             "--eval-split", "0.25", *FAST])
    assert r.code == 0, r
    assert r.out == ""  # stdout carries records only
    m = heldout(out)
    assert m["accuracy"] >= 0.9 and m["n"] == 24 and m["mean_margin"] > 0
    assert set(m["per_subset"]) == {"chat", "code"}
    assert sum(v["n"] for v in m["per_subset"].values()) == 24
    assert f"held-out: accuracy {m['accuracy']:.4f} (n=24)" in r.err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForSequenceClassification"]
    assert len(cfg["id2label"]) == 1
    meta = info(out)
    assert meta["rm_method"] == "bt" and meta["counts"] == {"pairs": 96, "train": 72, "heldout": 24}
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) >= 9 and "loss" in json.loads(lines[0])
    assert not (tmp_path / "rm.partial").exists()

    # The folder is what `score --scorer rm:OUT` uses: scoring the held-out pairs with
    # it gives the accuracy train-rm reported.
    from alignkit.reward_models import load_reward_model
    from alignkit.reward_models.common import split_pairs
    recs = [json.loads(l) for l in Path(data["easy"]).read_text().splitlines()]
    held = write_jsonl(tmp_path / "held.jsonl", [recs[i] for i in split_pairs(recs, 0.25, 0)[1]])
    s = cli(["score", "--scorer", f"rm:{out}", held])
    assert s.code == 0, s
    scored = s.records
    assert len(scored) == 24
    assert sum(p["score_chosen"] > p["score_rejected"] for p in scored) / 24 == m["accuracy"]
    again = load_reward_model(out).score([p["prompt"] for p in scored],
                                         [p["chosen"] for p in scored])
    assert again == pytest.approx([p["score_chosen"] for p in scored], abs=1e-5)


def test_bt_same_seed_same_weights(cli, data, tiny_model, tmp_path):
    args = ["train-rm", "--model", tiny_model, data["easy"], "--max-steps", "3", *FAST]
    assert cli([*args, "-o", tmp_path / "a"]).code == 0
    assert cli([*args, "-o", tmp_path / "b"]).code == 0
    assert cli([*args, "-o", tmp_path / "c", "--seed", "1"]).code == 0
    a, b, c = (tensors(tmp_path / x / "model.safetensors") for x in "abc")
    assert a.keys() == b.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)
    assert heldout(tmp_path / "a") == heldout(tmp_path / "b")


@pytest.mark.parametrize("method,weights", [("pal", "pal.safetensors"),
                                            ("crm", "peer/model.safetensors")])
def test_custom_trainers_same_seed_same_weights(cli, data, tiny_model, tmp_path, method, weights):
    args = ["train-rm", "--method", method, "--model", tiny_model, data["groups"],
            "--max-steps", "2", "--pal-dim", "32", *FAST]
    assert cli([*args, "-o", tmp_path / "a"]).code == 0
    assert cli([*args, "-o", tmp_path / "b"]).code == 0
    a, b = tensors(tmp_path / "a" / weights), tensors(tmp_path / "b" / weights)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert heldout(tmp_path / "a") == heldout(tmp_path / "b")


def test_bt_margin_center_and_lora_adapter(cli, data, tiny_model, tmp_path):
    recs = marker_pairs(32, seed=5)
    for i, r in enumerate(recs):
        if i % 2:
            r["margin"] = 1.0
    pairs = write_jsonl(tmp_path / "m.jsonl", recs)
    out = tmp_path / "lora"
    r = cli(["train-rm", "--model", tiny_model, "-", "-o", out, "--center-rewards", "0.01",
             "--lora-r", "4", "--max-steps", "4", *FAST], stdin=pairs.read_text())
    assert r.code == 0, r
    assert info(out)["inputs"] == {"<stdin>": hashlib.sha256(
        pairs.read_bytes()).hexdigest()}
    assert (out / "adapter_config.json").exists() and not (out / "config.json").exists()
    assert info(out)["rm_options"]["center_rewards"] == 0.01
    # The adapter (with its trained score head) loads through the rm loader.
    from alignkit.reward_models import load_reward_model
    s1 = load_reward_model(out).score(["Tell me about art."], ["Use bullet points, good."])
    s2 = load_reward_model(out).score(["Tell me about art."], ["Use bullet points, good."])
    assert len(s1) == 1 and s1 == s2
    # --merge-lora writes full weights instead.
    merged = tmp_path / "merged"
    assert cli(["train-rm", "--model", tiny_model, pairs, "-o", merged, "--lora-r", "4",
                "--merge-lora", "--max-steps", "2", *FAST]).code == 0
    assert (merged / "config.json").exists() and not (merged / "adapter_config.json").exists()


def _with_margins(recs):
    """The same pairs with a `margin` field (as relabel writes one on every pair)."""
    return [{**r, "margin": 0.5 + (i % 4)} for i, r in enumerate(recs)]


@pytest.mark.parametrize("method,weights", [("bt", "model.safetensors"),
                                            ("crm", "model.safetensors")])
def test_margin_is_used_only_with_the_margin_flag(cli, tiny_model, tmp_path, method, weights):
    """Plain Bradley-Terry by default: a pair file carrying `margin` trains exactly like
    the same file without it (same seed -> same weights); --margin trains
    −log σ(r_c − r_r − m), so the weights differ. alignkit.json says which."""
    recs = marker_pairs(32, seed=5)
    plain = write_jsonl(tmp_path / "plain.jsonl", recs)
    with_m = write_jsonl(tmp_path / "margin.jsonl", _with_margins(recs))
    args = ["train-rm", "--method", method, "--model", tiny_model, "--max-steps", "2", *FAST]
    assert cli([*args, plain, "-o", tmp_path / "a"]).code == 0
    r = cli([*args, with_m, "-o", tmp_path / "b"])
    assert r.code == 0, r
    assert "29 pair(s) carry a margin field; it is not used" in r.err  # 3 held out
    r = cli([*args, with_m, "-o", tmp_path / "c", "--margin"])
    assert r.code == 0, r
    a, b, c = (tensors(tmp_path / x / weights) for x in "abc")
    assert a.keys() == b.keys() == c.keys()
    assert all((a[k] == b[k]).all() for k in a)
    assert any(not (a[k] == c[k]).all() for k in a)
    assert [info(tmp_path / x)["margin_used"] for x in "abc"] == [False, False, True]
    assert [info(tmp_path / x)["rm_options"]["margin"] for x in "abc"] == [False, False, True]
    first = [json.loads((tmp_path / x / "metrics.jsonl").read_text().splitlines()[0])["loss"]
             for x in "abc"]
    assert first[0] == first[1] != first[2]
    # --margin on pairs without the field: plain BT, said so
    r = cli([*args, plain, "-o", tmp_path / "d", "--margin"])
    assert r.code == 0 and "--margin: no pair has a margin field" in r.err
    d = tensors(tmp_path / "d" / weights)
    assert all((a[k] == d[k]).all() for k in a) and info(tmp_path / "d")["margin_used"] is False


def test_tokenized_rows_carry_the_margin_only_when_asked(tiny_model):
    from alignkit.models import load_tokenizer
    from alignkit.reward_models.common import tokenize_pairs
    tok = load_tokenizer(tiny_model)
    recs = _with_margins(marker_pairs(3, seed=0))
    del recs[1]["margin"]
    assert all("margin" not in row for row in tokenize_pairs(tok, recs, 64))
    rows = tokenize_pairs(tok, recs, 64, margin=True)
    assert [row["margin"] for row in rows] == [0.5, 0.0, 2.5]


def test_maxmin_e_step_and_m_step_use_the_margin_alike(cli, data, tiny_model, tmp_path,
                                                       monkeypatch):
    """Without --margin neither step sees the pairs' margin; with it both do: the
    M-step's rows carry it and the E-step's log-likelihood is Σ log σ(d − m)."""
    from alignkit.reward_models import maxmin
    # the E-step's log-likelihood against a hand computation
    recs = [{"meta": {"user": "u0"}}, {"meta": {"user": "u0"}}, {"meta": {"user": "u1"}}]
    diffs = [[3.0, -1.0, 2.0], [1.0, 1.0, -1.0]]  # r_k(c) - r_k(r), models k = 0, 1
    ls = lambda x: -math.log1p(math.exp(-x))  # noqa: E731
    plain = maxmin.user_logliks(recs, diffs)
    assert plain == {
        "u0": [pytest.approx(ls(3.0) + ls(-1.0)), pytest.approx(ls(1.0) + ls(1.0))],
        "u1": [pytest.approx(ls(2.0)), pytest.approx(ls(-1.0))]}
    with_m = maxmin.user_logliks(recs, diffs, [3.0, 0.0, 0.5])
    assert with_m == {
        "u0": [pytest.approx(ls(0.0) + ls(-1.0)), pytest.approx(ls(-2.0) + ls(1.0))],
        "u1": [pytest.approx(ls(1.5)), pytest.approx(ls(-1.5))]}
    assert maxmin.e_step(plain) == {"u0": 1, "u1": 0}  # the margin moves u0
    assert maxmin.e_step(with_m) == {"u0": 0, "u1": 0}

    # through the command: what each step receives
    recs = _with_margins([json.loads(l) for l in Path(data["groups"]).read_text().splitlines()])
    pairs = write_jsonl(tmp_path / "g.jsonl", recs[:48])
    seen = {"offsets": [], "rows": []}
    real_ll, real_ds = maxmin.user_logliks, maxmin.dataset

    def spy_ll(records, margins, offsets=None):
        seen["offsets"].append(offsets if offsets is None else list(offsets))
        seen["expected"] = [r["margin"] for r in records]
        return real_ll(records, margins, offsets)

    def spy_ds(rows):
        seen["rows"].append(rows)
        return real_ds(rows)

    args = ["train-rm", "--method", "maxmin", "--model", tiny_model, pairs, "--em-iters", "1",
            "--max-steps", "1", *FAST]

    def run(*more):
        seen.update(offsets=[], rows=[])
        with monkeypatch.context() as m:  # the cli fixture undoes its own monkeypatch
            m.setattr(maxmin, "user_logliks", spy_ll)
            m.setattr(maxmin, "dataset", spy_ds)
            r = cli([*args, *more])
        assert r.code == 0, r

    run("-o", tmp_path / "plain")
    assert seen["offsets"] == [None] and len(seen["rows"]) == 2
    assert all("margin" not in row for rows in seen["rows"] for row in rows)
    assert info(tmp_path / "plain")["margin_used"] is False
    run("-o", tmp_path / "margin", "--margin")
    assert seen["offsets"] == [seen["expected"]] and len(seen["expected"]) > 0
    assert seen["rows"] and all("margin" in row for rows in seen["rows"] for row in rows)
    assert info(tmp_path / "margin")["margin_used"] is True


def test_maxmin_default_em_rounds_are_the_papers(cli, data, tiny_model, tmp_path, monkeypatch):
    """MaxMin-RLHF runs 10 EM iterations: the default of --em-iters, in --help too."""
    from alignkit.reward_models import RM_METHODS, maxmin
    assert RM_METHODS.get("maxmin").param("em_iters").default == 10
    seen = {}
    monkeypatch.setattr(maxmin, "train", lambda pairs, m, out, opts, cfg: seen.update(
        em_iters=cfg.em_iters) or {"heldout": None})
    r = cli(["train-rm", "--method", "maxmin", "--model", tiny_model, data["groups"], "-o",
             tmp_path / "x"])
    assert r.code == 0, r
    assert seen["em_iters"] == 10
    monkeypatch.setenv("COLUMNS", "400")
    text = cli(["train-rm", "--help"]).out
    assert re.search(r"--em-iters .*\(maxmin; default 10\)", text)
    assert "10 by default, as in the" in text and "MaxMin-RLHF paper" in text
    assert "default 10" in maxmin.__doc__ and "--margin" in text


def test_bt_minilm_reaches_90_percent(cli, tmp_path):
    """The issue's check: bt on the embedded minilm-l6 encoder, >= 90% held-out."""
    import time
    pairs = write_jsonl(tmp_path / "p.jsonl", marker_pairs(120, seed=7))
    t0 = time.time()
    r = cli(["train-rm", "--model", "minilm-l6", pairs, "-o", tmp_path / "rm",
             "--eval-split", "0.25", "--max-steps", "10", "--batch-size", "8", "--lr", "1e-4"])
    assert r.code == 0, r
    assert heldout(tmp_path / "rm")["accuracy"] >= 0.9
    assert time.time() - t0 < 120
    cfg = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert cfg["architectures"] == ["BertForSequenceClassification"]


# --- pal and maxmin -------------------------------------------------------------------------

def test_pal_and_maxmin_beat_bt_per_user(group_models):
    bt, pal, mm = (heldout(group_models[m]) for m in ("bt", "pal", "maxmin"))
    print("per-user accuracy: bt", bt["mean_user_accuracy"], "pal", pal["mean_user_accuracy"],
          "maxmin", mm["mean_user_accuracy"])
    assert set(pal["per_user"]) == set(mm["per_user"]) == {f"u{i}" for i in range(6)}
    # One BT model cannot serve two opposite groups: near chance on average.
    assert bt["mean_user_accuracy"] <= 0.7
    assert pal["mean_user_accuracy"] >= bt["mean_user_accuracy"] + 0.25
    assert mm["mean_user_accuracy"] >= bt["mean_user_accuracy"] + 0.25
    assert min(v["accuracy"] for v in mm["per_user"].values()) >= 0.8


def test_pal_folder_and_loader(group_models, data):
    from alignkit.errors import UsageError
    from alignkit.reward_models import load_reward_model, rm_method
    folder = group_models["pal"]
    assert rm_method(folder) == "pal"
    assert not (folder / "config.json").exists()  # a plain rm: loader must refuse it
    assert (folder / "backbone" / "config.json").exists() and (folder / "pal.safetensors").exists()
    assert json.loads((folder / "users.json").read_text()) == [f"u{i}" for i in range(6)]
    meta = info(folder)
    assert meta["k"] == 2 and meta["dim"] == 128 and meta["pooling"] == "last"
    prompt, good, bad = "Tell me about art.", "Use bullet points about it, good, Write a title.", \
        "Use bullet points about it, bad, Write a title."
    g0 = load_reward_model(folder, user="u0").score([prompt, prompt], [good, bad])
    g1 = load_reward_model(folder, user="u2").score([prompt, prompt], [good, bad])
    assert g0[0] > g0[1] and g1[0] < g1[1]  # opposite groups, opposite preferences
    # Per-item users override the default; no user -> the population mean mixture.
    rm = load_reward_model(folder)
    per = rm.score([prompt, prompt], [good, good], users=["u0", "u2"])
    assert per == pytest.approx([g0[0], g1[0]], abs=1e-4)
    assert len(rm.score([prompt], [good])) == 1
    with pytest.raises(UsageError, match="u99"):
        load_reward_model(folder, user="u99")


def test_pal_adapt_users_fits_only_new_users(cli, group_models, data, tmp_path):
    base = group_models["pal"]
    out = tmp_path / "adapted"
    r = cli(["train-rm", "--method", "pal", "--adapt-users", "--model", base,
             data["new_users"], "-o", out, "--eval-split", "0.25", "--epochs", "4",
             "--batch-size", "4", "--max-length", "64"])
    assert r.code == 0, r
    users = json.loads((out / "users.json").read_text())
    assert users[:6] == [f"u{i}" for i in range(6)] and users[6:] == ["u6", "u7"]
    assert "skipped" in r.err  # pairs of known users are not used
    old, new = tensors(base / "pal.safetensors"), tensors(out / "pal.safetensors")
    for k in old:
        if k == "user_logits":
            assert (new[k][:6] == old[k]).all() and new[k].shape == (8, 2)
        else:
            assert (new[k] == old[k]).all(), k  # projectors and scale frozen
    b_old = tensors(base / "backbone" / "model.safetensors")
    b_new = tensors(out / "backbone" / "model.safetensors")
    assert all((b_old[k] == b_new[k]).all() for k in b_old)
    m = heldout(out)
    assert set(m["per_user"]) == {"u6", "u7"} and m["n"] == 4
    assert m["accuracy"] == 1.0
    assert info(out)["new_users"] == ["u6", "u7"]


def test_maxmin_assignment_and_aggregates(group_models):
    from alignkit.errors import UsageError
    from alignkit.reward_models import load_reward_model
    folder = group_models["maxmin"]
    assign = json.loads((folder / "assignment.json").read_text())
    # EM separates the two groups although the first split mixed them.
    assert {assign[f"u{i}"] for i in (0, 1, 4)} != {assign[f"u{i}"] for i in (2, 3, 5)}
    assert len({assign[f"u{i}"] for i in (0, 1, 4)}) == 1
    assert len({assign[f"u{i}"] for i in (2, 3, 5)}) == 1
    meta = info(folder)
    assert meta["rm_method"] == "maxmin" and meta["assignment"] == assign
    assert meta["em_history"][0]["users_moved"] >= 1
    assert not (folder / "config.json").exists()
    for k in (0, 1):
        assert json.loads((folder / f"model-{k}" / "config.json").read_text())["architectures"] == [
            "LlamaForSequenceClassification"]
    events = [json.loads(l) for l in (folder / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "e_step" for e in events)
    assert any(e.get("model") == 1 and "loss" in e for e in events)
    prompt, good, bad = "Tell me about art.", "Give three tips about it, good, Write a title.", \
        "Give three tips about it, bad, Write a title."
    per = [load_reward_model(folder / f"model-{k}").score([prompt, prompt], [good, bad])
           for k in (0, 1)]
    mn = load_reward_model(folder, aggregate="min").score([prompt, prompt], [good, bad])
    mean = load_reward_model(folder, aggregate="mean").score([prompt, prompt], [good, bad])
    assert mn == pytest.approx([min(per[0][i], per[1][i]) for i in (0, 1)], abs=1e-5)
    assert mean == pytest.approx([(per[0][i] + per[1][i]) / 2 for i in (0, 1)], abs=1e-5)
    u2 = load_reward_model(folder, aggregate="user", user="u2").score([prompt], [good])
    assert u2 == pytest.approx([per[assign["u2"]][0]], abs=1e-5)
    with pytest.raises(UsageError, match="needs a user"):
        load_reward_model(folder, aggregate="user").score([prompt], [good])
    with pytest.raises(UsageError, match="aggregate"):
        load_reward_model(folder, aggregate="max")
    assert "accuracy_min" in heldout(folder) and "accuracy_mean" in heldout(folder)


# --- crm ----------------------------------------------------------------------------------

def test_crm_on_noisy_labels_reports_clean_accuracy(cli, data, tiny_model, tmp_path):
    out = tmp_path / "crm"
    r = cli(["train-rm", "--method", "crm", "--model", tiny_model, data["noisy"], "--eval-pairs",
             data["clean"], "-o", out, "--noise-rate", "0.3", "--epochs", "2", *FAST])
    assert r.code == 0, r
    meta = info(out)
    m = meta["metrics"]["heldout"]
    assert m["n"] == 48 and m["accuracy"] >= 0.9  # on the clean held-out file
    assert meta["metrics"]["heldout_peer"]["n"] == 48
    assert meta["inputs"].keys() == {str(data["noisy"]), str(data["clean"])}
    assert "held-out (model A): accuracy" in r.err and "held-out (model B): accuracy" in r.err
    sel = meta["selected"]
    assert sel["peer"] in ("A", "B") and f"crm: writing model {sel['peer']}" in r.err
    accs = (sel["accuracy_a"], sel["accuracy_b"])
    assert m["accuracy"] == max(accs) and meta["metrics"]["heldout_peer"]["accuracy"] == min(accs)
    # A plain rm folder at the top (what rm:OUT loads), the peer beside it.
    assert json.loads((out / "config.json").read_text())["architectures"] == [
        "LlamaForSequenceClassification"]
    assert (out / "peer" / "model.safetensors").exists()
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    etas = [row["eta"] for row in rows if "eta" in row]
    assert etas[0] == 0.0 and max(etas) == pytest.approx(0.3)  # co-teaching schedule
    assert all("selection_agreement" in row for row in rows if "eta" in row)


def test_crm_coteaching_exchange_on_hand_made_losses():
    """Each peer trains on the small-loss picks of the OTHER peer: A's update gets
    gradient only through B's picks, B's only through A's."""
    import torch
    from alignkit.reward_models.crm import coteach_loss, small_loss
    la = torch.tensor([0.1, 5.0, 0.2, 4.0, 0.3], requires_grad=True)
    lb = torch.tensor([3.0, 0.1, 6.0, 0.2, 0.15], requires_grad=True)
    assert small_loss(la, 2).tolist() == [0, 2] and small_loss(lb, 2).tolist() == [1, 4]
    assert small_loss(torch.tensor([1.0, 0.5, 0.5]), 2).tolist() == [1, 2]  # ties by index
    loss, pick_a, pick_b = coteach_loss(la, lb, 2)
    assert (pick_a.tolist(), pick_b.tolist()) == ([0, 2], [1, 4])
    # B learns A's picks {0, 2}; A learns B's picks {1, 4}
    assert loss.item() == pytest.approx((3.0 + 6.0) / 2 + (5.0 + 0.3) / 2)
    loss.backward()
    assert la.grad.tolist() == pytest.approx([0, 0.5, 0, 0, 0.5])
    assert lb.grad.tolist() == pytest.approx([0.5, 0, 0.5, 0, 0])


def test_crm_training_step_loss_is_the_exchanged_one(tiny_model, tmp_path):
    """One CRM training step's loss from the two peers' rewards, computed here in plain
    Python: mean ℓ_B over A's small-loss picks + mean ℓ_A over B's (the swap differs)."""
    from transformers import TrainingArguments

    from alignkit.models import load_seq_cls
    from alignkit.reward_models import RM_METHODS, RMConfig, crm
    from alignkit.reward_models.common import (ids_rewards, preference_collator,
                                               seed_everything, tokenize_pairs)
    peers = []
    for j in range(2):
        seed_everything(0)  # the same head; B's is then negated: r_B = −r_A
        m, tok = load_seq_cls(str(tiny_model), "float32")
        peers.append(m)
    import torch
    with torch.no_grad():  # spread the rewards; B ranks the pairs the other way round
        peers[0].score.weight.mul_(200.0)
        peers[1].score.weight.mul_(-200.0)
    rows = tokenize_pairs(tok, marker_pairs(6, seed=3), 64)
    cfg = RMConfig("crm", noise_rate=0.5).resolve(RM_METHODS.get("crm"))
    args = TrainingArguments(output_dir=str(tmp_path / "w"), report_to=[], use_cpu=True)
    trainer = crm.make_trainer(peers[0], peers[1], args, rows, tok.pad_token_id, cfg, 0)
    trainer.state.global_step, trainer.state.max_steps = 8, 8  # eta = 0.5: keep 3 of 6
    batch = preference_collator(tok.pad_token_id)(rows)
    loss = trainer.compute_loss(trainer.model, batch).item()

    def bt(m):
        c = ids_rewards(m, [r["chosen_ids"] for r in rows], tok.pad_token_id)
        r = ids_rewards(m, [r["rejected_ids"] for r in rows], tok.pad_token_id)
        return [math.log1p(math.exp(-(x - y))) for x, y in zip(c, r)]

    la, lb = bt(peers[0]), bt(peers[1])
    picks = lambda ls: sorted(range(6), key=lambda i: (ls[i], i))[:3]  # noqa: E731
    assert picks(la) != picks(lb)
    mean = lambda ls, idx: sum(ls[i] for i in idx) / len(idx)  # noqa: E731
    exchanged = mean(lb, picks(la)) + mean(la, picks(lb))
    own = mean(la, picks(la)) + mean(lb, picks(lb))
    assert abs(exchanged - own) > 0.01  # the check can tell the two apart
    assert loss == pytest.approx(exchanged, rel=1e-4, abs=1e-5)


def test_crm_better_peer_rule():
    from alignkit.reward_models.crm import better_peer
    assert better_peer([{"accuracy": 0.8}, {"accuracy": 0.9}]) == 1
    assert better_peer([{"accuracy": 0.9}, {"accuracy": 0.8}]) == 0
    assert better_peer([{"accuracy": 0.9}, {"accuracy": 0.9}]) == 0  # ties: A
    assert better_peer([None, None]) == 0


def test_crm_writes_the_peer_with_the_better_heldout_accuracy(cli, data, tiny_model, tmp_path,
                                                               monkeypatch):
    """Same seed, same training: when B scores higher it is the top folder and A is in
    peer/; on a tie A is on top. alignkit.json names the peer and both accuracies."""
    from alignkit.reward_models import crm
    real = crm.evaluate
    accuracies = []

    def fake(score, records, with_users=False):
        m = real(score, records, with_users)
        m["accuracy"] = accuracies[len(fake.calls)]
        fake.calls.append(1)
        return m

    args = ["train-rm", "--method", "crm", "--model", tiny_model, data["easy"], "--max-steps",
            "2", "--eval-split", "0.25", *FAST]
    runs = {}
    for name, accs in (("b_better", [0.5, 0.75]), ("tie", [0.75, 0.75])):
        fake.calls, accuracies[:] = [], accs
        with monkeypatch.context() as mp:  # the cli fixture undoes its own monkeypatch
            mp.setattr(crm, "evaluate", fake)
            r = cli([*args, "-o", tmp_path / name])
        assert r.code == 0, r
        assert len(fake.calls) == 2
        runs[name] = (tensors(tmp_path / name / "model.safetensors"),
                      tensors(tmp_path / name / "peer" / "model.safetensors"))
    (b_top, b_peer), (t_top, t_peer) = runs["b_better"], runs["tie"]
    assert any(not (t_top[k] == t_peer[k]).all() for k in t_top)  # the peers differ
    assert all((b_top[k] == t_peer[k]).all() for k in b_top)  # B on top when B is better
    assert all((b_peer[k] == t_top[k]).all() for k in b_top)  # A on top on a tie
    meta = info(tmp_path / "b_better")
    assert meta["selected"]["peer"] == "B"
    assert (meta["selected"]["accuracy_a"], meta["selected"]["accuracy_b"]) == (0.5, 0.75)
    assert meta["metrics"]["heldout"]["accuracy"] == 0.75
    assert meta["metrics"]["heldout_peer"]["accuracy"] == 0.5
    assert info(tmp_path / "tie")["selected"]["peer"] == "A"
    assert "better held-out accuracy" in crm.__doc__


def test_crm_schedule_and_curriculum_order():
    from alignkit.reward_models.crm import easy_to_hard, peer_schedule
    assert peer_schedule(0, 100, 0.4) == 0.0
    assert peer_schedule(10, 100, 0.4) == pytest.approx(0.16)
    assert peer_schedule(25, 100, 0.4) == pytest.approx(0.4)
    assert peer_schedule(90, 100, 0.4) == pytest.approx(0.4)
    assert easy_to_hard([0.5, 2.0, -1.0, 2.0]) == [1, 3, 0, 2]


# --- resume, malformed input, usage -----------------------------------------------------------

@pytest.mark.parametrize("method", ["bt", "crm", "pal"])
def test_sigterm_checkpoints_then_resume_finishes(cli, data, tiny_model, tmp_path, monkeypatch,
                                                  method):
    from transformers import Trainer
    original = Trainer.training_step

    def step(self, *a, **kw):
        if self.state.global_step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)

    out = tmp_path / "rm"
    pairs = data["groups"] if method == "pal" else data["easy"]
    args = ["train-rm", "--method", method, "--model", tiny_model, pairs, "-o", out,
            "--max-steps", "5", "--pal-dim", "32", *FAST]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", step)
        r = cli(args)
    assert r.code == 130, r
    assert not out.exists()
    ckpts = sorted(p.name for p in (tmp_path / "rm.partial").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-3"]
    assert cli(args).code == 2  # an unfinished run needs --resume or --force
    r = cli([*args, "--resume"])
    assert r.code == 0, r
    assert "resuming from" in r.err
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 2, 3] and steps[-1] == 5
    assert not (tmp_path / "rm.partial").exists()


def test_maxmin_resume_skips_finished_em_steps(cli, data, tiny_model, tmp_path, monkeypatch):
    from alignkit.reward_models import maxmin
    calls = []
    original = maxmin.e_step

    def interrupted(ll):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # Ctrl-C during the first E-step
        return original(ll)

    out = tmp_path / "mm"
    args = ["train-rm", "--method", "maxmin", "--model", tiny_model, data["groups"], "-o", out,
            "--em-iters", "1", "--max-steps", "2", *FAST]
    with monkeypatch.context() as m:
        m.setattr(maxmin, "e_step", interrupted)
        assert cli(args).code == 130
    state = json.loads((tmp_path / "mm.partial" / "em" / "state.json").read_text())
    assert state["iteration"] == 0 and state["done"] == [0, 1]
    r = cli([*args, "--resume"])
    assert r.code == 0, r
    assert "training model" not in r.err  # both M-steps of round 0 were finished
    assert info(out)["em_history"][0]["em_iter"] == 0


def test_missing_chosen_is_exit_3_and_leaves_nothing(cli, tiny_model, tmp_path):
    recs = marker_pairs(4, seed=0)
    del recs[2]["chosen"]
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    out = tmp_path / "rm"
    r = cli(["train-rm", "--model", tiny_model, bad, "-o", out])
    assert r.code == 3
    assert f"{bad}:3: chosen: missing required field" in r.err
    assert not out.exists() and not (tmp_path / "rm.partial").exists()


@pytest.mark.parametrize("method", ["pal", "maxmin"])
def test_user_methods_need_meta_user(cli, tiny_model, tmp_path, method):
    recs = marker_pairs(6, seed=0, user_groups=[0, 1])
    del recs[4]["meta"]["user"]
    bad = write_jsonl(tmp_path / "nouser.jsonl", recs)
    r = cli(["train-rm", "--method", method, "--model", tiny_model, bad, "-o", tmp_path / "rm"])
    assert r.code == 3
    assert f"{bad}:5: meta.user: missing: --method {method} needs a user id on every pair" in r.err
    recs[4]["meta"]["user"] = ["x"]
    bad = write_jsonl(tmp_path / "badtype.jsonl", recs)
    r = cli(["train-rm", "--method", method, "--model", tiny_model, bad, "-o", tmp_path / "rm"])
    assert r.code == 3 and "meta.user: must be a string or an integer" in r.err


def test_usage_errors(cli, data, tiny_model, tmp_path):
    base = ["--model", tiny_model, data["easy"], "-o", tmp_path / "rm"]
    assert cli(["train-rm", "--method", "nope", *base]).code == 2
    assert cli(["train-rm", "--method", "bt", "--adapt-users", *base]).code == 2
    assert cli(["train-rm", "--eval-split", "1.5", *base]).code == 2
    assert cli(["train-rm", "--method", "crm", "--noise-rate", "1.0", *base]).code == 2
    assert cli(["train-rm", "--method", "maxmin", "--k", "0", *base]).code == 2
    assert cli(["train-rm", "--lr", "abc", *base]).code == 2
    r = cli(["train-rm", "--model", tmp_path / "nowhere", data["easy"], "-o", tmp_path / "rm"])
    assert r.code == 2 and "nowhere" in r.err
    assert not (tmp_path / "rm.partial").exists()  # checked before the work folder is made
    (tmp_path / "exists").mkdir()
    r = cli(["train-rm", "--model", tiny_model, data["easy"], "-o", tmp_path / "exists"])
    assert r.code == 2 and "--force" in r.err
    r = cli(["train-rm", "--method", "pal", "--adapt-users", "--model", tiny_model,
             data["groups"], "-o", tmp_path / "x"])
    assert r.code == 2 and "not a pal reward-model folder" in r.err
    stranger = write_jsonl(tmp_path / "u9.jsonl", marker_pairs(2, user_groups=[0] * 10)[:1])
    stranger.write_text(stranger.read_text().replace('"u0"', '"u9"'))
    r = cli(["train-rm", "--method", "pal", "--model", tiny_model, data["groups"],
             "--eval-pairs", stranger, "-o", tmp_path / "x"])
    assert r.code == 2 and "--eval-pairs: user(s) u9 have no pairs in" in r.err
    assert not (tmp_path / "x.partial").exists()


def _flags(text):
    import re
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def test_list_methods_and_help_show_every_method_and_its_flags(cli, monkeypatch):
    from alignkit.reward_models import RM_METHODS
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    listed = cli(["train-rm", "--list-methods"])
    assert listed.code == 0, listed
    assert [l.split()[0] for l in listed.out.splitlines()[1:]] == RM_METHODS.names()
    assert RM_METHODS.names() == ["bt", "pal", "maxmin", "crm", "value", "prm"]
    r = cli(["train-rm", "--help"])
    assert r.code == 0, r
    flags = _flags(r.out)
    for e in RM_METHODS:
        assert e.name in r.out
        for p in e.params:
            assert p.flag_name in flags, (e.name, p.flag_name)
            assert p.flag_name in listed.out  # listed after its method
    assert {"--eval-split", "--eval-pairs", "--adapt-users", "--list-methods"} <= flags


def test_unknown_method_suggests_a_close_name(cli, tmp_path):
    r = cli(["train-rm", "--method", "crn", "--model", "tiny-llama", "p.jsonl", "-o",
             tmp_path / "x"])
    assert r.code == 2 and "did you mean 'crm'" in r.err
    assert cli(["train-rm", "--method", "bt", "p.jsonl", "-o", tmp_path / "x"]).code == 2


def test_method_defaults_and_flags_come_from_the_entry(cli, data, tiny_model, tmp_path,
                                                       monkeypatch):
    """The learning rate defaults to the entry's; the method gets its declared
    parameters with their defaults; another method's flag is ignored with a warning."""
    from alignkit.reward_models import RM_METHODS, crm
    seen = {}

    def fake_train(pairs, model_spec, out, opts, cfg):
        seen.update(lr=opts.lr, params=dict(cfg.params), options=cfg.as_dict())
        return {"heldout": None}

    monkeypatch.setattr(crm, "train", fake_train)
    r = cli(["train-rm", "--method", "crm", "--model", tiny_model, data["easy"], "-o",
             tmp_path / "x", "--pal-dim", "32", "--no-curriculum"])
    assert r.code == 0, r
    assert seen["lr"] == RM_METHODS.get("crm").default_lr == 1e-4
    assert seen["params"] == {"noise_rate": 0.2, "curriculum": False, "margin": False,
                              "center_rewards": 0.0}
    assert seen["options"]["pal_dim"] == 512 and seen["options"]["method"] == "crm"
    assert "--pal-dim: not a parameter of --method crm; ignored" in r.err
    able = [e.name for e in RM_METHODS if e.adapt_users]
    assert able == ["pal"]
    r = cli(["train-rm", "--method", "maxmin", "--adapt-users", "--model", tiny_model,
             data["easy"], "-o", tmp_path / "y"])
    assert r.code == 2 and "--adapt-users works with --method pal only" in r.err


# --- real model ------------------------------------------------------------------------------

@pytest.mark.slow
def test_bt_smollm2_lora_gets_a_score_head(cli, smollm2, tmp_path):
    """A causal LM backbone gets a one-output score head; with LoRA the adapter folder
    carries the trained head and loads through the rm loader."""
    pairs = write_jsonl(tmp_path / "p.jsonl", marker_pairs(64, seed=8))
    out = tmp_path / "rm"
    r = cli(["train-rm", "--model", smollm2, pairs, "-o", out, "--eval-split", "0.25",
             "--lora-r", "8", "--lr", "1e-3", "--max-steps", "12", "--batch-size", "4",
             "--max-length", "128"])
    assert r.code == 0, r
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in (adapter["modules_to_save"] or [])
    assert heldout(out)["accuracy"] >= 0.9
    from alignkit.reward_models import load_reward_model
    good, bad = load_reward_model(out).score(["Tell me about art."] * 2,
                                             ["Write a title about it, good, Use bullet points.",
                                              "Write a title about it, bad, Use bullet points."])
    assert good > bad


def test_score_rm_scorer_reads_pal_and_maxmin_folders(cli, group_models, tmp_path):
    """`score --scorer rm:DIR` on pal/maxmin folders: the record's meta.user picks the
    user's reward, matching the loader."""
    from alignkit.reward_models import load_reward_model
    prompt, good = "Tell me about art.", "Use bullet points about it, good, Write a title."
    recs = [{"id": f"r{u}", "prompt": prompt, "meta": {"user": u},
             "completions": [{"text": good}]} for u in ("u0", "u2")]
    path = write_jsonl(tmp_path / "s.jsonl", recs)
    for method in ("pal", "maxmin"):
        folder = group_models[method]
        r = cli(["score", "--scorer", f"rm:{folder}", path, "--aggregate", "user"])
        assert r.code == 0, r
        got = [rec["completions"][0]["score"] for rec in r.records]
        want = [load_reward_model(folder, user=u, aggregate="user").score([prompt], [good])[0]
                for u in ("u0", "u2")]
        assert got == pytest.approx(want, abs=1e-4)
