"""alignkit pair files in plain TRL: the same tokens, and the records' reference
log-probs used by a TRL DPOTrainer without a reference pass."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.trl_interop import record_ref_dpo_trainer, to_trl


def test_to_trl_renders_what_alignkit_trains_on():
    rec = {"id": "a", "prompt": "Say hi.", "chosen": "hi", "rejected": [
        {"role": "assistant", "content": "no"}], "ref_logp_chosen": -1.5,
        "ref_rejected_logps": -2.5, "gen": {"system": "Be brief."}}
    out = to_trl(rec)
    assert out["prompt"] == [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Say hi."}]
    assert out["chosen"] == [{"role": "assistant", "content": "hi"}]
    assert out["rejected"] == [{"role": "assistant", "content": "no"}]
    assert out["ref_chosen_logps"] == -1.5 and out["ref_rejected_logps"] == -2.5
    raw = to_trl({"prompt": "Q:", "chosen": " a", "rejected": " b", "gen": {"raw": True}})
    assert raw == {"prompt": "Q:", "chosen": " a", "rejected": " b"}
    msgs = [{"role": "user", "content": "x"}]
    assert to_trl({"prompt": msgs, "chosen": "y", "rejected": "z"})["prompt"] == msgs


def _trl_ids(tok, rec):
    """TRL's conversational tokenization, written out independently: the prompt with the
    generation prompt, the completion as the rest of the whole conversation."""
    p = tok.apply_chat_template(rec["prompt"], add_generation_prompt=True, tokenize=False)
    out = []
    for side in ("chosen", "rejected"):
        full = tok.apply_chat_template(rec["prompt"] + rec[side], tokenize=False)
        assert full.startswith(p)
        pi, fi = tok(p, add_special_tokens=False)["input_ids"], tok(full, add_special_tokens=False)["input_ids"]
        assert fi[:len(pi)] == pi
        out.append((pi, fi[len(pi):]))
    return out


def test_trl_dpo_trainer_uses_the_records_reference_logps(tiny_model, tmp_path, monkeypatch):
    from datasets import load_dataset
    from trl import DPOConfig

    from alignkit.generation import token_logps
    from alignkit.models import load_causal_lm

    model, tok = load_causal_lm(tiny_model, "float32")
    records = [{"id": "p0", "prompt": "Say hello.", "chosen": "hello there", "rejected": "no",
                "ref_logp_chosen": -7.0, "ref_logp_rejected": -3.0, "gen": {}},
               {"id": "p1", "prompt": "Name a fruit.", "chosen": "apple", "rejected": "a rock",
                "ref_logp_chosen": -2.0, "ref_logp_rejected": -6.5, "gen": {}}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(to_trl(r)) + "\n" for r in records))
    ds = load_dataset("json", data_files=str(path), split="train")

    # the policy's log-probs at step 1, on TRL's tokens, computed without TRL
    pol = []
    for r in records:
        (pc, c), (pr, rj) = _trl_ids(tok, to_trl(r))
        lc, lr = (sum(x) for x in token_logps(model, [(pc, c), (pr, rj)], batch_size=1))
        pol.append((lc, lr))
    beta = 0.1
    want = sum(-math.log(1 / (1 + math.exp(-beta * ((lc - r["ref_logp_chosen"]) -
                                                   (lr - r["ref_logp_rejected"])))))
               for (lc, lr), r in zip(pol, records)) / len(records)

    assert abs(want - math.log(2)) > 0.05  # a recomputed reference would give log 2
    Trainer = record_ref_dpo_trainer()

    def no_reference_pass(*a, **k):
        raise AssertionError("a reference pass ran")
    monkeypatch.setattr(Trainer, "compute_ref_log_probs", no_reference_pass)
    args = DPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, max_steps=1,
                     learning_rate=1e-6, logging_steps=1, report_to=[], beta=beta, save_strategy="no",
                     precompute_ref_log_probs=True, use_cpu=True, seed=0, dataloader_drop_last=False)
    trainer = Trainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    trainer.train()
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    assert loss == pytest.approx(want, abs=1e-4)
    # the same data without the record values: TRL's own reference pass runs
    bare = ds.remove_columns(["ref_chosen_logps", "ref_rejected_logps"])
    with pytest.raises(AssertionError, match="a reference pass ran"):
        Trainer(model=model, args=args, train_dataset=bare, processing_class=tok)
