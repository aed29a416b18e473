"""SePPO (`train-policy --method seppo`): the loss and the anchor-based flipper on
hand-made log-probs, the reference pool (seeded uniform draws over earlier snapshots,
cadence, at most K kept), CLI runs on the tiny Llama (folder, metrics, same seed ->
same weights, interrupt + resume), and malformed input."""
from __future__ import annotations

import json
import math
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from conftest import metrics, write_jsonl

WORDS = "good bad better best hello thanks please yes no music space ocean".split()
FAST = ["--max-steps", "4", "--batch-size", "2", "--max-length", "64", "--max-new-tokens", "6",
        "--lr", "1e-3"]


def _records(n: int = 8) -> list[dict]:
    recs = []
    for i in range(n):
        answer = " ".join(WORDS[(i + j) % len(WORDS)] for j in range(4))
        if i % 2:  # pairs: only the chosen side is read
            recs.append({"id": f"p{i}", "prompt": f"say {WORDS[i]}", "chosen": answer,
                         "rejected": "no"})
        else:
            recs.append({"prompt": f"say {WORDS[i]}", "completion": answer})
    return recs



def _tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


# --- (a) the loss, by hand ---------------------------------------------------------------------

def _softplus(x: float) -> float:
    return math.log1p(math.exp(x))


@pytest.mark.parametrize("pol_w,ref_w,pol_r,ref_r,flip,want", [
    # Δw = +1 > 0: I = +1, y_ref the loser: -log σ(0.1 (1 - 0.5)) = softplus(-0.05)
    (-10.0, -11.0, -20.0, -20.5, 1.0, _softplus(-0.05)),
    # Δw = -1 < 0: I = -1, y_ref a winner: -log σ(0.1 (-1 + 0.5)) = softplus(0.05)
    (-12.0, -11.0, -20.0, -20.5, -1.0, _softplus(0.05)),
    # Δw = 0: I = 0, no y_ref term: log 2
    (-11.0, -11.0, -20.0, -23.0, 0.0, math.log(2.0)),
])
def test_loss_matches_the_hand_computation(pol_w, ref_w, pol_r, ref_r, flip, want):
    import torch
    from alignkit.policy.seppo import seppo_from_logps, seppo_loss
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    loss, got_flip = seppo_from_logps(t(pol_w), t(pol_r), t(ref_w), t(ref_r), 0.1)
    assert got_flip.item() == flip
    assert loss.item() == pytest.approx(want, abs=1e-12)
    direct = seppo_loss(t(pol_w - ref_w), t(pol_r - ref_r), t(flip), 0.1)
    assert direct.item() == pytest.approx(want, abs=1e-12)


# --- (b) the flipper ---------------------------------------------------------------------------

@pytest.mark.parametrize("pol_w,flip,ref_role", [(-10.0, 1.0, "loser"), (-12.0, -1.0, "winner")])
def test_flipper_makes_y_ref_the_loser_or_the_winner(pol_w, flip, ref_role):
    """θ fits the anchor better than the reference (log πθ(y_w) = -10 > -11): y_ref is
    the loser, so a gradient step lowers log πθ(y_ref); worse (-12 < -11): a winner,
    raised. The anchor is always raised; the indicator carries no gradient."""
    import torch
    from alignkit.policy.seppo import aaf_flip, seppo_from_logps
    pw = torch.tensor([pol_w], dtype=torch.float64, requires_grad=True)
    pr = torch.tensor([-20.0], dtype=torch.float64, requires_grad=True)
    loss, got = seppo_from_logps(pw, pr, torch.tensor([-11.0], dtype=torch.float64),
                                 torch.tensor([-20.5], dtype=torch.float64), 0.1)
    assert got.item() == flip and not got.requires_grad
    loss.sum().backward()
    assert pw.grad.item() < 0                                  # descent raises y_w
    assert (pr.grad.item() > 0) == (ref_role == "loser")       # loser: lowered
    assert (pr.grad.item() < 0) == (ref_role == "winner")      # winner: raised
    # dL/dΔw = -β σ(-z) exactly: no gradient through the sign
    z = 0.1 * ((pol_w + 11.0) - flip * 0.5)
    assert pw.grad.item() == pytest.approx(-0.1 / (1 + math.exp(z)), abs=1e-12)
    assert aaf_flip(torch.tensor([0.3, -0.2, 0.0])).tolist() == [1.0, -1.0, 0.0]


# --- (c) the reference pool --------------------------------------------------------------------

def _simulate(every: int, keep: int, seed: int, updates: int):
    """Updates 0..updates-1 on a one-tensor 'model' whose weight is the update count."""
    import torch
    from alignkit.policy.seppo import Snapshots
    snaps = Snapshots(every, keep)
    current = {"w": torch.zeros(1)}
    drawn, kept = [], []
    for u in range(updates):
        d, state = snaps.reference(u, lambda: current, seed)
        drawn.append((u, d, state["w"].item()))
        kept.append(list(snaps.updates()))
        current = {"w": torch.full((1,), float(u + 1))}   # the optimizer step
    return drawn, kept


def test_reference_is_an_earlier_snapshot_never_the_current_weights():
    drawn, kept = _simulate(every=3, keep=2, seed=0, updates=40)
    assert drawn[0] == (0, 0, 0.0)                        # θ_0: all there is at update 0
    for u, d, value in drawn[1:]:
        assert d < u and d % 3 == 0                       # an earlier snapshot, on the cadence
        assert value == float(d) != float(u)              # its weights, not the current ones
    assert all(len(k) <= 2 for k in kept)                 # at most K kept
    assert kept[0] == [0] and kept[3] == [0, 3] and kept[6] == [3, 6] and kept[7] == [3, 6]
    # the pool of update u: the K most recent snapshots taken before u
    assert {d for u, d, _ in drawn if 7 <= u <= 9} <= {3, 6}


def test_reference_draws_are_seeded_and_uniform():
    from alignkit.policy.seppo import draw_reference
    a, _ = _simulate(every=1, keep=7, seed=5, updates=30)
    b, _ = _simulate(every=1, keep=7, seed=5, updates=30)
    c, _ = _simulate(every=1, keep=7, seed=6, updates=30)
    assert a == b and a != c
    pool = [0, 30, 60, 90, 120, 150, 180]
    counts = Counter(draw_reference(pool, 0, u) for u in range(7000))
    assert set(counts) == set(pool)
    assert all(abs(n - 1000) < 130 for n in counts.values()), counts   # ~4 sd
    assert draw_reference([60, 0, 30], 1, 9) == draw_reference([0, 30, 60], 1, 9)


def test_snapshots_round_trip_through_a_checkpoint_file(tmp_path):
    import torch
    from alignkit.policy.seppo import Snapshots
    s = Snapshots(2, 3)
    for u in range(0, 10, 2):
        s.take(u, lambda: {"a.weight": torch.full((2, 2), float(u)), "b": torch.ones(3) * u})
    s.save(str(tmp_path / "s.safetensors"))
    t = Snapshots(2, 3)
    t.load(str(tmp_path / "s.safetensors"))
    assert t.updates() == s.updates() == [4, 6, 8]
    for u in t.updates():
        assert torch.equal(t.states[u]["a.weight"], s.states[u]["a.weight"])


def test_the_entry_declares_its_parameters_and_reading(cli, monkeypatch):
    from alignkit.policy import POLICY
    e = POLICY.get("seppo")
    assert e.reads == "sft" and e.default_beta == 0.1 and not e.online and e.trl == ""
    assert e.defaults()["seppo_snapshot_every"] == 30 and e.defaults()["seppo_max_snapshots"] == 7
    assert "UNVERIFIED" in e.summary and "sign" in e.summary
    monkeypatch.setenv("COLUMNS", "250")
    r = cli(["train-policy", "--help"])
    assert r.code == 0 and "--seppo-snapshot-every" in r.out and "--seppo-max-snapshots" in r.out
    assert "UNVERIFIED" in r.out
    r = cli(["train-policy", "--list-methods"])
    assert any(line.split()[:2] == ["seppo", "sft"] for line in r.out.splitlines())


# --- (d) the command ------------------------------------------------------------------------

def test_cli_writes_a_folder_with_the_flip_share_and_is_deterministic(cli, tiny_model, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        r = cli(["train-policy", "--method", "seppo", "--model", tiny_model, data, "-o", out,
                 *FAST, "--seppo-snapshot-every", "1", "--seppo-max-snapshots", "2"])
        assert r.code == 0, r
        outs.append(out)
    a, b = outs
    assert _tensors(a / "model.safetensors").keys() == _tensors(b / "model.safetensors").keys()
    for k, v in _tensors(a / "model.safetensors").items():
        assert torch.equal(v, _tensors(b / "model.safetensors")[k]), k
    rows = [row for row in metrics(a) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 0.0 <= row["seppo/flip_share"] <= 1.0
        assert math.isfinite(row["seppo/delta_anchor"]) and math.isfinite(row["seppo/delta_ref"])
    # update 0: the reference is θ_0 = the policy, Δ ≡ 0, I = 0, loss log 2
    assert rows[0]["seppo/tie_share"] == 1.0 and rows[0]["seppo/delta_anchor"] == 0.0
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for row in rows[1:]:  # afterwards always an earlier snapshot
        assert row["seppo/ref_age"] >= 1 and row["seppo/tie_share"] == 0.0
        assert row["seppo/snapshots"] <= 2
    man = json.loads((a / "alignkit.json").read_text())
    assert man["method"] == "seppo" and man["hyperparameters"]["beta"] == 0.1
    assert man["hyperparameters"]["seppo_snapshot_every"] == 1
    assert man["reference"]["pool"] == [2, 3] and man["reference"]["weights"] == "full"
    assert man["data"]["records"] == 8 and "seppo/flip_share" in man["final_metrics"]
    tok = AutoTokenizer.from_pretrained(a)
    model = AutoModelForCausalLM.from_pretrained(a)
    ids = torch.tensor([tok("hello world").input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_lora_interrupt_and_resume_restore_the_snapshots(cli, tiny_model, tmp_path, monkeypatch):
    """An interrupted LoRA run checkpoints its snapshots; the resumed run ends with the
    adapter weights of an uninterrupted one."""
    import torch
    from transformers import Trainer
    data = write_jsonl(tmp_path / "data.jsonl", _records())
    base = ["train-policy", "--method", "seppo", "--model", tiny_model, data, *FAST,
            "--lora-r", "4", "--seppo-snapshot-every", "1", "--seppo-max-snapshots", "2"]
    r = cli([*base, "-o", tmp_path / "full"])
    assert r.code == 0, r
    original = Trainer.training_step

    def step(self, *a, **kw):
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)

    out = tmp_path / "cut"
    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", step)
        r = cli([*base, "-o", out])
    assert r.code == 130, r
    ckpt = tmp_path / "cut.partial" / "checkpoint-2"
    snaps = _tensors(ckpt / "seppo_snapshots.safetensors")
    assert {k.split("/")[0] for k in snaps} == {"0", "1"}
    assert all("lora_" in k for k in snaps)              # only the adapter weights
    r = cli([*base, "-o", out, "--resume"])
    assert r.code == 0, r
    assert (out / "adapter_config.json").exists()
    want = _tensors(tmp_path / "full" / "adapter_model.safetensors")
    got = _tensors(out / "adapter_model.safetensors")
    assert want.keys() == got.keys()
    for k in want:
        assert torch.allclose(want[k], got[k], atol=1e-6), k
    full_rows = [r for r in metrics(tmp_path / "full") if "loss" in r]
    cut_rows = [r for r in metrics(out) if "loss" in r]
    assert [r["seppo/ref_update"] for r in cut_rows[-2:]] == \
        [r["seppo/ref_update"] for r in full_rows[-2:]]


# --- (e) bad input ------------------------------------------------------------------------------

def test_a_prompt_without_an_answer_exits_3_at_its_line(cli, tiny_model, tmp_path):
    recs = _records(3)
    recs[1] = {"id": "q", "prompt": "no answer here"}
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = cli(["train-policy", "--method", "seppo", "--model", tiny_model, bad, "-o",
             tmp_path / "o", *FAST])
    assert r.code == 3, r
    assert "bad.jsonl:2" in r.err and "prompt record" in r.err
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_ref_model_and_reward_flags_are_refused(cli, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", _records(2))
    r = cli(["train-policy", "--method", "seppo", "--model", tiny_model, data, "-o",
             tmp_path / "o", "--ref-model", tiny_model])
    assert r.code == 2 and "own earlier checkpoints" in r.err, r
    r = cli(["train-policy", "--method", "seppo", "--model", tiny_model, data, "-o",
             tmp_path / "o", "--reward", "length"])
    assert r.code == 2 and "online methods" in r.err, r
