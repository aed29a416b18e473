"""Every TRL / Hugging Face record format in, valid and broken: null optional fields,
implicit prompts, `messages` records, tool messages, content parts, Parquet files and
`datasets` folders; and reference log-probs written under TRL's names too."""
from __future__ import annotations

import json

import pytest

from alignkit.errors import DataError
from alignkit.io import load_records
from alignkit.records import validate
from conftest import write_jsonl


def test_null_optional_fields_mean_absent_and_null_required_ones_are_errors():
    rec = validate({"id": "a", "prompt": "p", "chosen": "x", "rejected": "y", "margin": None,
                    "meta": None, "ref_logp_chosen": None}, "pair")
    assert rec == {"id": "a", "prompt": "p", "chosen": "x", "rejected": "y"}
    s = validate({"id": "a", "prompt": "p", "completions": [{"text": "x", "logp": None,
                                                            "score": None}]}, "samples")
    assert s["completions"] == [{"text": "x"}]
    with pytest.raises(DataError, match="expected string or array, got null") as e:
        validate({"id": "a", "prompt": "p", "chosen": None, "rejected": "y"}, "pair")
    assert e.value.field == "chosen"


def test_implicit_prompt_conversations_split_at_the_shared_prefix():
    sys_user = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
    rec = validate({"chosen": sys_user + [{"role": "assistant", "content": "Hello."}],
                    "rejected": sys_user + [{"role": "assistant", "content": "Go away."}]}, "pair")
    assert rec["prompt"] == sys_user
    assert rec["chosen"] == [{"role": "assistant", "content": "Hello."}]
    assert rec["rejected"] == [{"role": "assistant", "content": "Go away."}]
    assert rec["id"].startswith("p-")


def test_implicit_prompt_strings_follow_trls_rule():
    rec = validate({"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}, "pair")
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == ("Q: 2+2? A:", " 4", " 5")
    rec = validate({"chosen": "The sky is blue", "rejected": "The sky is green"}, "pair")
    # TRL: the space before the differing answer goes with the answers
    assert (rec["prompt"], rec["chosen"], rec["rejected"]) == ("The sky is", " blue", " green")
    with pytest.raises(DataError, match="no shared prompt"):
        validate({"chosen": "yes", "rejected": "no"}, "pair")


def test_messages_records_are_prompt_completion_split_at_the_last_assistant_turn():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    rec = validate({"messages": msgs}, "completion")
    assert rec["prompt"] == msgs[:3] and rec["completion"] == msgs[3:]
    for bad, msg in [([{"role": "user", "content": "a"}], "no assistant message"),
                     ([{"role": "assistant", "content": "a"}], "before the last assistant"),
                     ([], "non-empty")]:
        with pytest.raises(DataError, match=msg):
            validate({"messages": bad}, "completion")


def test_tool_messages_and_content_parts_are_kept_images_refused():
    prompt = [{"role": "user", "content": [{"type": "text", "text": "What is "},
                                           {"type": "text", "text": "the weather?"}]}]
    completion = [{"role": "assistant", "content": None,
                   "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
                  {"role": "tool", "content": "sunny"},
                  {"role": "assistant", "content": "It is sunny."}]
    rec = validate({"prompt": prompt, "completion": completion}, "completion")
    assert rec["prompt"][0]["content"] == "What is the weather?"
    assert rec["completion"][0]["content"] == "" and rec["completion"][0]["tool_calls"]
    from alignkit.text import completion_text
    assert completion_text(rec["completion"]) == "\n\nIt is sunny."
    with pytest.raises(DataError, match="'image' is not supported") as e:
        validate({"prompt": [{"role": "user", "content": [{"type": "image", "url": "x.png"}]}],
                  "completion": "a"}, "completion")
    assert e.value.field == "prompt[0].content[0]"


def test_trl_reference_names_are_read_and_written(cli, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": "a", "prompt": "p", "chosen": "x",
                                              "rejected": "y", "ref_chosen_logps": -3.0,
                                              "ref_rejected_logps": -4.0}])
    rec = load_records(str(src), "pair")[0]
    assert rec["ref_logp_chosen"] == -3.0 and rec["ref_logp_rejected"] == -4.0
    r = cli(["score", "--scorer", "length", src])
    assert r.code == 0, r
    out = r.records[0]
    assert out["ref_chosen_logps"] == out["ref_logp_chosen"] == -3.0
    assert out["ref_rejected_logps"] == out["ref_logp_rejected"] == -4.0


@pytest.fixture()
def hf_files(tmp_path):
    from datasets import Dataset
    rows = [{"id": f"r{i}", "prompt": f"Say {i}.", "chosen": "yes", "rejected": "no",
             "margin": None if i % 2 else 1.0} for i in range(5)]
    ds = Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "pairs.parquet"))
    ds.save_to_disk(str(tmp_path / "pairs_ds"))
    bad = Dataset.from_list([*rows[:2], {**rows[2], "chosen": None}, *rows[3:]])
    bad.to_parquet(str(tmp_path / "bad.parquet"))
    return tmp_path


def test_parquet_and_datasets_folders_are_read_like_jsonl(hf_files, cli):
    want = load_records(str(write_jsonl(hf_files / "p.jsonl", [
        {"id": f"r{i}", "prompt": f"Say {i}.", "chosen": "yes", "rejected": "no",
         **({} if i % 2 else {"margin": 1.0})} for i in range(5)])), "pair")
    for path in ("pairs.parquet", "pairs_ds"):
        assert load_records(str(hf_files / path), "pair") == want, path
        r = cli(["score", "--scorer", "length", hf_files / path])
        assert r.code == 0, r
        assert [x["id"] for x in r.records] == [f"r{i}" for i in range(5)]


def test_broken_parquet_rows_and_files_exit_3_with_the_row(hf_files, cli):
    r = cli(["score", "--scorer", "length", hf_files / "bad.parquet"])
    assert r.code == 3 and f"{hf_files / 'bad.parquet'}:3: chosen:" in r.err, r
    raw = (hf_files / "pairs.parquet").read_bytes()
    (hf_files / "cut.parquet").write_bytes(raw[: len(raw) // 2])
    r = cli(["score", "--scorer", "length", hf_files / "cut.parquet"])
    assert r.code == 3 and "cut.parquet" in r.err and "Traceback" not in r.err, r
    (hf_files / "pairs_ds" / "state.json").write_text("{}")
    r = cli(["score", "--scorer", "length", hf_files / "pairs_ds"])
    assert r.code == 3 and "not a datasets folder" in r.err, r


def test_a_trl_conversational_pair_file_trains_in_alignkit(cli, tmp_path, tiny_model):
    """Implicit-prompt conversations (TRL's format) go straight into train-policy."""
    recs = [{"chosen": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "A good one."}],
             "rejected": [{"role": "user", "content": f"Q{i}?"}, {"role": "assistant", "content": "no"}]}
            for i in range(4)]
    src = write_jsonl(tmp_path / "trl.jsonl", recs)
    r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, src, "-o", tmp_path / "m",
             "--max-steps", "1", "--batch-size", "2", "--no-ref-cache"])
    assert r.code == 0, r
    assert json.loads((tmp_path / "m" / "alignkit.json").read_text())["data"]["records"] == 4
