"""`alignkit train-policy` on the tiny Llama: every method from the records relabel and
gen-pairs write, the reference log-probs (records, cache, one pass), the output folder,
malformed input, interrupt + resume, and a 2-process `accelerate launch`."""
from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import metrics, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-steps", "2", "--batch-size", "4", "--max-length", "96"]
WORDS = "good bad better best hello thanks please yes no music space ocean travel art".split()


def info(folder) -> dict:
    return json.loads((Path(folder) / "alignkit.json").read_text())


def tensors(path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def run(args) -> int:
    from alignkit import cli as cli_mod
    return cli_mod.main([str(a) for a in args])


def _text(i: int, n: int) -> str:
    rng = random.Random(i * 1000 + n)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _prompt(i: int):
    return f"Write about {_text(i, 2)}" if i % 2 else [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Tell {_text(i, 3)}"}]


def pair_records(n=12, prefix="p"):
    """Pairs as relabel writes them (sppo mode adds p_win)."""
    return [{"id": f"{prefix}{i}-0-1", "prompt": _prompt(i), "chosen": "good " + _text(i, 5),
             "rejected": [{"role": "assistant", "content": "bad " + _text(i + 1, 7)}],
             "score_chosen": 0.9, "score_rejected": 0.2, "margin": 0.7,
             "p_win": {"chosen": 0.7, "rejected": 0.3}, "meta": {"k": i}} for i in range(n)]


def ranking_records(n=8):
    return [{"id": f"r{i}", "prompt": _prompt(i), "completions": [
        {"text": "best " + _text(i, 4), "score": 0.9},
        {"text": "ok " + _text(i, 3), "score": 0.5},
        {"text": "bad " + _text(i, 2), "score": 0.1}][:2 + i % 2]} for i in range(n)]


def samples_records(n=8):
    recs = ranking_records(n)
    for i, r in enumerate(recs):
        r["id"] = f"s{i}"
        if i % 2:
            r["reference"] = "best answer " + _text(i, 3)
        else:
            r["meta"] = {"reference": "best answer " + _text(i, 3), "reference_score": 1.0}
    return recs


def unpaired_records(n=12):
    return [{"id": f"u{i}", "prompt": _prompt(i), "completion": _text(i, 5), "label": i % 3 != 0}
            for i in range(n)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("policydata")
    return {
        "pairs": write_jsonl(d / "pairs.jsonl", pair_records()),
        "ranking": write_jsonl(d / "ranking.jsonl", ranking_records()),
        "samples": write_jsonl(d / "samples.jsonl", samples_records()),
        "unpaired": write_jsonl(d / "unpaired.jsonl", unpaired_records()),
        "sft": write_jsonl(d / "sft.jsonl", [
            {"prompt": r["prompt"], "completion": r["completion"]} for r in unpaired_records()]),
        "dir": d,
    }


METHOD_RUNS = {
    "sft": ("sft", []),
    "dpo": ("pairs", ["--lora-r", "4", "--loss", "sigmoid,sft", "--loss-weights", "1,0.1"]),
    "sppo": ("pairs", ["--lora-r", "4", "--merge-lora"]),
    "copg": ("pairs", []),
    "pro": ("ranking", []),
    "grao": ("samples", []),
    "simpo": ("pairs", []),
    "orpo": ("pairs", []),
    "kto": ("unpaired", []),
}


@pytest.fixture(scope="module")
def trained(data, tiny_model):
    """Every method, one command each, on the records above."""
    out = {}
    for method, (kind, extra) in METHOD_RUNS.items():
        folder = data["dir"] / "models" / method
        code = run(["train-policy", "--method", method, "--model", tiny_model, data[kind],
                    "-o", folder, *FAST, "--lr", "1e-3", *extra])
        assert code == 0, method
        out[method] = folder
    return out


def test_list_methods_names_data_types(cli):
    r = cli(["train-policy", "--list-methods"])
    assert r.code == 0
    rows = {line.split()[0]: line.split()[1] for line in r.out.splitlines()[1:]}
    offline = {"sft": "sft", "dpo": "pairs", "sppo": "pairs", "copg": "pairs", "pro": "ranking",
               "grao": "samples", "simpo": "pairs", "orpo": "pairs", "kto": "unpaired"}
    assert {k: rows.get(k) for k in offline} == offline
    assert set(rows.values()) <= {"pairs", "samples", "ranking", "unpaired", "sft", "prompts"}


def _help_flags(cli, monkeypatch) -> set[str]:
    monkeypatch.setenv("COLUMNS", "250")  # one line per flag
    r = cli(["train-policy", "--help"])
    assert r.code == 0, r
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", r.out))


def test_help_shows_every_scorer_option(cli, monkeypatch):
    """The scorer flags come from the shared ScorerOptions group (as in score/eval)."""
    from alignkit.registry import params_of
    from alignkit.scorers.options import ScorerOptions
    want = {p.flag_name for p in params_of(ScorerOptions)}
    assert {"--hybrid", "--calibrate", "--transform", "--aggregate", "--rubric"} <= want
    assert want <= _help_flags(cli, monkeypatch)


def test_every_method_parameter_is_a_flag_and_every_method_is_listed(cli, monkeypatch):
    from alignkit.policy import POLICY
    flags = _help_flags(cli, monkeypatch)
    for entry in POLICY:
        assert entry.writes == "model" and entry.reads
        for p in entry.params:
            assert p.flag_name in flags, (entry.name, p.flag_name)
            assert p.coerce(p.default) == p.default  # the declared default is valid
    r = cli(["train-policy", "--list-methods"])
    assert r.code == 0
    listed = [line.split()[0] for line in r.out.splitlines()[1:]]
    assert listed == POLICY.names()


def _records_of(kind: str) -> list[dict]:
    return {"pairs": pair_records(2), "ranking": ranking_records(2),
            "samples": samples_records(2), "unpaired": unpaired_records(2),
            "sft": [{"id": "s", "prompt": "p", "completion": "c"}],
            "prompts": [{"id": "q", "prompt": "p"}]}[kind]


def test_a_flag_that_does_not_apply_exits_2_naming_it(cli, tmp_path):
    """Every method refuses a method flag it does not declare (before any model loads)."""
    from alignkit.policy import POLICY
    every = POLICY.params()
    for entry in POLICY:
        other = next(p for n, p in every.items() if n not in {q.name for q in entry.params})
        value = "true" if other.type is bool else (other.choices[0] if other.choices else "1")
        args = [other.flag_name] if other.type is bool else [other.flag_name, value]
        data = write_jsonl(tmp_path / f"{entry.name}.jsonl", _records_of(entry.reads))
        r = cli(["train-policy", "--method", entry.name, "--model", "no-such-model", data,
                 "-o", tmp_path / "out", *args])
        assert r.code == 2, (entry.name, r)
        assert f"{other.flag_name} does not apply to policy method {entry.name!r}" in r.err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("extra,needle", [
    (["--aggregate", "min"], "--aggregate is for online methods"),
    (["--reward-weights", "1", "--hybrid"], "--reward-weights, --hybrid are for online methods"),
])
def test_scorer_flags_are_for_online_methods(cli, tmp_path, extra, needle):
    data = write_jsonl(tmp_path / "d.jsonl", pair_records(2))
    r = cli(["train-policy", "--method", "dpo", "--model", "no-such-model", data,
             "-o", tmp_path / "out", *extra])
    assert r.code == 2, r
    assert needle in r.err and "dpo trains offline" in r.err


def test_every_method_trains_and_writes_a_folder(trained, data):
    from alignkit.io import file_sha256
    for method, folder in trained.items():
        kind = METHOD_RUNS[method][0]
        man = info(folder)
        assert man["method"] == method
        assert man["data"]["sha256"] == file_sha256(data[kind]) == man["inputs"]["data"]
        assert man["hyperparameters"]["max_steps"] == 2 and man["hyperparameters"]["lr"] == 1e-3
        assert man["seed"] == 0 and man["base"]["spec"].endswith("m")
        assert math.isfinite(man["final_metrics"]["loss"])
        steps = [row["step"] for row in metrics(folder) if "loss" in row]
        assert steps == [1, 2], method
        assert not Path(f"{folder}.partial").exists()
        assert (folder / "tokenizer.json").exists()
    dpo = info(trained["dpo"])
    assert dpo["hyperparameters"]["loss"] == ["sigmoid", "sft"]
    assert dpo["hyperparameters"]["loss_weights"] == [1.0, 0.1]
    for key in ("rewards/margins", "rewards/accuracies", "rewards/chosen"):
        assert key in dpo["final_metrics"]
    # --max-steps 2 x batch 4: the pass covers the 8 pairs the run trains on, not all 12
    assert dpo["reference"]["kind"] == "base (adapter disabled)"
    assert dpo["reference"]["computed"] == 8 and dpo["reference"]["not_needed"] == 4
    for method in ("sppo", "copg"):  # a second method on the same data: no reference pass
        ref = info(trained[method])["reference"]
        assert ref["from_cache"] == 8 and ref["computed"] == 0
        assert ref["cache"] == dpo["reference"]["cache"]
    assert info(trained["pro"])["hyperparameters"]["sft_weight"] == 0.05
    assert info(trained["grao"])["hyperparameters"]["grao_lambda"] == 0.6
    assert info(trained["kto"])["data"]["rows"] == 12


def test_folders_load_in_plain_transformers_and_peft(trained, tiny_model):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(trained["copg"])
    ids = torch.tensor([tok("hello world").input_ids])
    full = AutoModelForCausalLM.from_pretrained(trained["copg"])  # full weights
    assert full(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert (trained["dpo"] / "adapter_config.json").exists()      # a LoRA adapter
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    adapted = PeftModel.from_pretrained(base, trained["dpo"])
    assert adapted(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert not (trained["sppo"] / "adapter_config.json").exists()  # --merge-lora
    merged = AutoModelForCausalLM.from_pretrained(trained["sppo"])
    assert merged(ids).logits.shape == (1, ids.shape[1], len(tok))
    base_w = tensors(Path(tiny_model) / "model.safetensors")
    merged_w = tensors(trained["sppo"] / "model.safetensors")
    key = next(k for k in merged_w if "q_proj" in k)
    assert not torch.equal(merged_w[key], base_w[key])            # the adapter is merged in


def test_cache_skips_the_reference_pass_and_same_seed_gives_same_weights(cli, tiny_model, tmp_path):
    from alignkit.policy.refcache import STATS
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(16, prefix="c"))
    args = ["--model", tiny_model, data, *FAST, "--lr", "1e-3"]
    before = STATS["ref_batches"]
    r = cli(["train-policy", "--method", "dpo", *args, "-o", tmp_path / "a"])
    assert r.code == 0, r.err
    assert STATS["ref_batches"] - before == 2  # the 2 batches of --max-steps 2, once
    assert info(tmp_path / "a")["reference"]["computed"] == 8
    mid = STATS["ref_batches"]
    r = cli(["train-policy", "--method", "dpo", *args, "-o", tmp_path / "b"])
    assert r.code == 0 and STATS["ref_batches"] == mid  # rerun: no reference forward
    ref = info(tmp_path / "b")["reference"]
    assert ref["from_cache"] == 8 and ref["computed"] == 0
    a, b = tensors(tmp_path / "a" / "model.safetensors"), tensors(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    r = cli(["train-policy", "--method", "dpo", *args, "-o", tmp_path / "d", "--no-ref-cache"])
    assert r.code == 0 and STATS["ref_batches"] == mid + 2
    d = tensors(tmp_path / "d" / "model.safetensors")
    assert all((a[k] == d[k]).all() for k in a)


def _gen_pairs_logps(tiny_model, records):
    """Reference log-probs the way gen-pairs scores completions (`completion_logps`)."""
    from alignkit.generation import completion_logps, render_prompt
    from alignkit.models import load_causal_lm
    from alignkit.policy.data import completion_text
    model, tok = load_causal_lm(tiny_model)
    prompts = [render_prompt(tok, r["prompt"]) for r in records]
    c = completion_logps(model, tok, prompts, [completion_text(r["chosen"]) for r in records])
    r_ = completion_logps(model, tok, prompts, [completion_text(r["rejected"]) for r in records])
    return c, r_


def test_record_ref_logps_are_the_trainers_ref_logps(cli, trained, tiny_model, tmp_path):
    """gen-pairs' logp (summed completion log-probs incl. eos under the chat-templated
    prompt) is what the trainer computes: the cache holds the same numbers, and records
    carrying them give zero rewards at step 1 (policy == reference)."""
    from alignkit.models import load_tokenizer, model_sha256
    from alignkit.policy.data import Tokenization, completion_text, seq_key
    recs = pair_records()  # the records `trained` ran dpo on (its pass filled the cache)
    c, r_ = _gen_pairs_logps(tiny_model, recs)
    cache = json.loads(Path(info(trained["dpo"])["reference"]["cache"]).read_text())["logps"]
    tk = Tokenization(load_tokenizer(tiny_model), 96)
    assert len(cache) == 16  # the 8 pairs of its 2 steps
    seen = 0
    for rec, vc, vr in zip(recs, c, r_):
        p = tk.prompt(rec["prompt"])
        kc = seq_key(p, tk.completion(completion_text(rec["chosen"])))
        kr = seq_key(p, tk.completion(completion_text(rec["rejected"])))
        if kc in cache:
            assert cache[kc] == pytest.approx(vc, abs=1e-3)
            assert cache[kr] == pytest.approx(vr, abs=1e-3)
            seen += 1
    assert seen == 8
    sha = model_sha256(tiny_model)
    for i, (rec, vc, vr) in enumerate(zip(recs, c, r_)):
        rec["ref_logp_chosen"], rec["ref_logp_rejected"] = vc, vr
        rec["gen"] = {"model": "x", "model_sha256": sha if i < 6 else "another-model"}
    with_refs = write_jsonl(tmp_path / "refs.jsonl", recs)
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, with_refs, "-o",
             tmp_path / "b", *FAST, "--no-ref-cache"])
    assert r.code == 0, r.err
    ref = info(tmp_path / "b")["reference"]
    assert ref["from_records"] == 6  # the other sampler's 6: recomputed where trained on
    assert ref["computed"] + ref.get("not_needed", 0) == 6 and ref["computed"] >= 2
    assert ref["record_check"]["ok"] and ref["record_check"]["worst_gap_ratio"] < 0.01
    first = metrics(tmp_path / "b")[0]
    assert abs(first["rewards/chosen"]) < 1e-4 and abs(first["rewards/rejected"]) < 1e-4
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # records whose logp lacks the eos term (a sample cut by max_new_tokens) are caught
    for rec in recs:
        rec["ref_logp_chosen"] += 6.0
        rec.pop("gen")
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, bad, "-o", tmp_path / "c",
             *FAST, "--no-ref-cache"])
    assert r.code == 0 and "do not match the reference model" in r.err
    ref = info(tmp_path / "c")["reference"]
    assert ref["from_records"] == 0 and ref["computed"] == 8 and not ref["record_check"]["ok"]


def test_cut_samples_train_without_eos_and_keep_their_record_logps(cli, tiny_model, tmp_path):
    """A sample cut by max_new_tokens (finished_* false) is scored without an eos, as
    gen-pairs scored it: its record logp passes the check and is used, and the rows of
    the cut side do not end with eos."""
    from alignkit.generation import completion_logps, render_prompt
    from alignkit.models import load_causal_lm
    from alignkit.policy.data import Tokenization, load, pair_rows
    from alignkit.policy.data import completion_text
    recs = pair_records(8, prefix="cut")
    model, tok = load_causal_lm(tiny_model)
    prompts = [render_prompt(tok, r["prompt"]) for r in recs]
    cut_chosen = [i % 2 == 0 for i in range(8)]
    c = completion_logps(model, tok, prompts, [completion_text(r["chosen"]) for r in recs],
                         add_eos=[not x for x in cut_chosen])
    r_ = completion_logps(model, tok, prompts, [completion_text(r["rejected"]) for r in recs],
                          add_eos=False)
    for rec, vc, vr, cut in zip(recs, c, r_, cut_chosen):
        rec.update(ref_logp_chosen=vc, ref_logp_rejected=vr, finished_chosen=not cut,
                   finished_rejected=False)
    path = write_jsonl(tmp_path / "cut.jsonl", recs)
    rows = pair_rows(load(str(path), "pairs"), Tokenization(tok, 96)).rows
    eos = tok.eos_token_id
    assert [row["chosen_ids"][-1] == eos for row in rows] == [not x for x in cut_chosen]
    assert all(row["rejected_ids"][-1] != eos for row in rows)
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, path, "-o", tmp_path / "m",
             *FAST, "--no-ref-cache"])
    assert r.code == 0, r.err
    ref = info(tmp_path / "m")["reference"]
    assert ref["record_check"]["ok"] and ref["record_check"]["worst_gap_ratio"] < 0.01
    assert ref["from_records"] == 8 and ref["computed"] == 0
    first = metrics(tmp_path / "m")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
    # a finished flag that is not a boolean is an input error naming the field
    recs[3]["finished_chosen"] = "no"
    bad = write_jsonl(tmp_path / "bad.jsonl", recs)
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, bad, "-o", tmp_path / "x",
             *FAST])
    assert r.code == 3 and "bad.jsonl:4" in r.err and "finished_chosen" in r.err
    assert not (tmp_path / "x").exists()


def test_ref_model_folder_is_the_reference(cli, tiny_model, tiny_model_b, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(8, prefix="f"))
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, data, "-o", tmp_path / "a",
             *FAST, "--ref-model", tiny_model_b, "--lora-r", "4"])
    assert r.code == 0, r.err
    ref = info(tmp_path / "a")["reference"]
    assert ref["kind"] == "folder" and ref["spec"] == str(tiny_model_b) and ref["computed"] == 8
    first = metrics(tmp_path / "a")[0]
    assert abs(first["rewards/margins"]) > 1e-3  # policy (seed 0) != reference (seed 1)


MALFORMED = [
    # (method, records, extra flags, exit code, text in stderr)
    ("sppo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], [], 3,
     "d.jsonl:1: p_win: missing"),
    ("copg", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y", "score_chosen": 1.0},
              ], [], 3, "d.jsonl:1: score_rejected: missing"),
    ("sppo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y", "score_chosen": 1,
               "score_rejected": 0},
              {"id": "b", "prompt": "p", "chosen": "x", "rejected": "y", "p_win": 1.5}], [], 3,
     "d.jsonl:2: p_win: must be a probability"),
    ("grao", [{"id": "a", "prompt": "p", "completions": [{"text": "x", "score": 1}]}], [], 3,
     "d.jsonl:1: reference: missing"),
    ("pro", [{"id": "a", "prompt": "p", "completions": [{"text": "x", "score": 1}, {"text": "y"}]}],
     [], 3, "d.jsonl:1: completions[1].score: missing required field"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x"}], [], 3, "d.jsonl:1: rejected: missing"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": [{"role": "user", "content": "x"},
                                                   {"role": "assistant", "content": "y"}],
              "rejected": "z"}], [], 3, "d.jsonl:1: chosen: a completion holds assistant messages only"),
    ("kto", [{"id": "a", "prompt": "p", "completion": "x", "label": "yes"}], [], 3,
     "d.jsonl:1: label: expected boolean"),
    ("nope", [{"id": "a", "prompt": "p"}], [], 2, "unknown policy method 'nope' (--method)"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], ["--loss", "bogus"], 2,
     "--loss 'bogus' is not a dpo loss"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}],
     ["--loss", "sigmoid,ipo", "--loss-weights", "1"], 2, "--loss-weights has 1 values for 2"),
    ("sppo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}],
     ["--loss", "sppo,ipo"], 2, "is not a sppo loss"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}],
     ["--label-smoothing", "0.2", "--loss", "sigmoid,hinge"], 2, "combine only with sft"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}],
     ["--label-smoothing", "0.6"], 2, "--label-smoothing must be in [0, 0.5)"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], ["--sft-weight", "1"],
     2, "--sft-weight does not apply to policy method 'dpo'"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], ["--reward", "rules"],
     2, "--reward is for online methods"),
    ("orpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], ["--ref-model", "x"],
     2, "orpo uses no reference model"),
    ("dpo", [{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}], ["--opt", "nosuch=1"],
     2, "--opt nosuch: DPOConfig has no such setting"),
    ("dpo", [{"id": "a", "prompt": "p " * 300, "chosen": "x", "rejected": "y"}], [], 2,
     "no pair fits --max-length 96"),
]


@pytest.mark.parametrize("method,records,extra,code,message", MALFORMED)
def test_malformed_input_and_usage_errors(cli, tiny_model, tmp_path, method, records, extra,
                                          code, message):
    data = write_jsonl(tmp_path / "d.jsonl", records)
    r = cli(["train-policy", "--method", method, "--model", tiny_model, data, "-o",
             tmp_path / "out", *FAST, *extra])
    assert r.code == code, r.err
    assert message in r.err
    assert not (tmp_path / "out").exists()


def test_invalid_json_and_missing_flags(cli, tiny_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}\n{"id": \n')
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, data, "-o", tmp_path / "o"])
    assert r.code == 3 and "d.jsonl:2: invalid JSON" in r.err
    assert cli(["train-policy", "--model", tiny_model, data, "-o", tmp_path / "o"]).code == 2
    assert cli(["train-policy", "--method", "dpo", data, "-o", tmp_path / "o"]).code == 2
    (tmp_path / "o").mkdir()
    good = write_jsonl(tmp_path / "g.jsonl", pair_records(2))
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, good, "-o", tmp_path / "o"])
    assert r.code == 2 and "already exists" in r.err


def test_sigterm_checkpoints_then_resume_finishes(cli, tiny_model, tmp_path, monkeypatch):
    from transformers import Trainer
    original = Trainer.training_step

    def step(self, *a, **kw):
        if self.state.global_step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, *a, **kw)

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(12, prefix="s"))
    out = tmp_path / "m"
    args = ["train-policy", "--method", "dpo", "--model", tiny_model, data, "-o", out,
            "--max-steps", "3", "--batch-size", "4", "--max-length", "96"]
    with monkeypatch.context() as m:
        m.setattr(Trainer, "training_step", step)
        r = cli(args)
    assert r.code == 130, r
    assert not out.exists()
    assert sorted(p.name for p in (tmp_path / "m.partial").glob("checkpoint-*")) == ["checkpoint-2"]
    r = cli([*args, "--resume"])
    assert r.code == 0, r.err
    assert [row["step"] for row in metrics(out) if "loss" in row] == [1, 2, 3]
    assert info(out)["reference"]["from_cache"] == 12  # the resumed run reuses the pass
    assert not (tmp_path / "m.partial").exists()


@pytest.mark.distributed
def test_accelerate_launch_two_cpu_processes(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(16, prefix="a"))
    out = tmp_path / "ddp"
    env = {**os.environ, "ALIGNKIT_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    cmd = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu",
           "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "alignkit", "train-policy", "--method", "dpo",
           "--model", str(tiny_model), str(data), "-o", str(out), "--max-steps", "2",
           "--batch-size", "2", "--max-length", "96", "--lora-r", "4"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    man = info(out)
    assert man["processes"] == 2
    assert man["reference"]["computed"] == 8  # 2 ranks x 2 steps x 2 pairs
    rows = [row for row in metrics(out) if "loss" in row]
    assert [row["step"] for row in rows] == [1, 2]
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)  # exact ref at step 0
    assert rows[0]["num_tokens"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "home", "pairs.jsonl"]
    assert p.stderr.count("wrote ") == 1  # one process writes the one folder


def test_chunk_plan_groups_short_rows_apart():
    from alignkit.policy.dpo_trainer import chunk_plan
    assert chunk_plan([162, 140, 140, 105, 49, 44, 46, 50]) == [[5, 6, 4, 7], [3, 1, 2, 0]]
    assert chunk_plan([60, 64, 58, 61]) == [[2, 0, 3, 1]]  # nothing to gain: one call
    assert chunk_plan([7]) == [[0]]


def test_length_chunked_forward_matches_one_call(tiny_model):
    """Same per-token outputs and gradients as one padded call (fp32), rows in order."""
    import torch
    from trl.trainer.utils import add_fused_lm_head

    from alignkit.models import load_causal_lm
    from alignkit.policy.dpo_trainer import LengthChunked
    model, _ = load_causal_lm(tiny_model)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    lengths = [70, 12, 66, 9]
    torch.manual_seed(0)
    ids = torch.randint(3, 500, (4, 70))
    mask = torch.zeros(4, 70, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :4] = -100
    outs, grads = [], []
    for fwd in (model, LengthChunked(model)):
        model.zero_grad()
        out = fwd(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True, use_cache=False)
        (out.log_probs.sum(dim=1) * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
        outs.append(out)
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert outs[1].log_probs.shape == outs[0].log_probs.shape == (4, 69)
    assert torch.allclose(outs[0].log_probs, outs[1].log_probs, atol=1e-5)
    assert torch.equal(outs[0].log_probs == 0, outs[1].log_probs == 0)
    assert torch.allclose(outs[0].entropy, outs[1].entropy, atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.slow
def test_smollm2_dpo_lora_bf16_demo_path(cli, tmp_path, smollm2):
    """The demo's path: SmolLM2, LoRA r=16, bfloat16. Step 1 is exactly ln 2 (the
    reference pass used the training batches), the rerun reads the cache and gives the
    same adapter, and the adapter loads in peft."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(8, prefix="s"))
    args = ["train-policy", "--method", "dpo", "--model", smollm2, data, "--lora-r", "16",
            "--dtype", "bfloat16", "--max-steps", "2", "--batch-size", "4", "--max-length", "128"]
    assert cli([*args, "-o", tmp_path / "a"]).code == 0
    assert cli([*args, "-o", tmp_path / "b"]).code == 0
    first = metrics(tmp_path / "a")[0]
    assert abs(first["loss"] - math.log(2)) < 1e-6 and first["rewards/margins"] == 0.0
    assert info(tmp_path / "a")["reference"]["computed"] == 8
    assert info(tmp_path / "b")["reference"]["from_cache"] == 8
    a = tensors(tmp_path / "a" / "adapter_model.safetensors")
    b = tensors(tmp_path / "b" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), tmp_path / "a")
    assert model.peft_config["default"].r == 16


@pytest.mark.parametrize("loss, ok", [("hinge", False), ("ipo", False), ("sigmoid_norm", False),
                                      ("nca_pair", False), ("bco_pair", False), ("apo_zero", False),
                                      ("apo_down", False), ("discopop", False), ("sppo_hard", False),
                                      ("sigmoid", True), ("robust", True), ("hinge,robust", True)])
def test_label_smoothing_is_refused_where_it_has_no_effect(loss, ok):
    from alignkit.errors import UsageError
    from alignkit.policy import POLICY
    from alignkit.policy.pairs import parse_losses
    dpo = POLICY.get("dpo")
    if ok:
        parse_losses(dpo, loss, None, 0.1)
        return
    with pytest.raises(UsageError, match="--label-smoothing has no effect"):
        parse_losses(dpo, loss, None, 0.1)
    parse_losses(dpo, loss, None, 0.0)  # without smoothing the loss is fine


def test_simpo_default_gamma_is_the_papers_ratio():
    from alignkit.policy import POLICY
    e = POLICY.get("simpo")
    assert e.param("simpo_gamma").default / e.default_beta == pytest.approx(0.5)
