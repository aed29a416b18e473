"""Tests for alignkit.checks and the demo prompt data set in examples/data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from alignkit.checks import (
    CHECKS, check_score, count_sentences, count_words, describe_check, describe_checks,
    run_checks, split_paragraphs, validate_check, validate_checks,
)
from alignkit.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "examples" / "data"


def passed(text, spec, prompt_text="", meta=None):
    res = run_checks(text, [spec], prompt_text=prompt_text, meta=meta)
    assert len(res) == 1 and res[0]["type"] == spec["type"]
    return res[0]["passed"]


# ---------------------------------------------------------------- text helpers

def test_count_words():
    assert count_words("") == 0
    assert count_words("Hello, world!") == 2
    assert count_words("don't stop") == 2
    assert count_words("well-known fact") == 3
    assert count_words("  one\ttwo\nthree  ") == 3
    assert count_words("3.14 is pi") == 4


def test_count_sentences():
    assert count_sentences("") == 0
    assert count_sentences("One sentence") == 1
    assert count_sentences("One. Two! Three?") == 3
    assert count_sentences("Pi is 3.14 today.") == 1
    assert count_sentences('He said "stop." Then left.') == 2
    assert count_sentences("Wait... what?") == 2
    assert count_sentences("A title\n\nA body.") == 2
    assert count_sentences("...") == 0


def test_split_paragraphs():
    assert split_paragraphs("") == []
    assert split_paragraphs("a\nb") == ["a\nb"]
    assert split_paragraphs("a\n\nb\n \t\nc") == ["a", "b", "c"]
    assert split_paragraphs("a\n\nb\n***\nc") == ["a\n\nb", "c"]
    assert split_paragraphs("\n\na\n\n\n\n") == ["a"]


# ---------------------------------------------------------------- each check type

def test_min_words():
    spec = {"type": "min_words", "n": 3}
    assert passed("one two three", spec) is True
    assert passed("one two", spec) is False
    assert passed("one two three four", spec) is True
    assert passed("", {"type": "min_words", "n": 0}) is True


def test_max_words():
    spec = {"type": "max_words", "n": 3}
    assert passed("one two three", spec) is True
    assert passed("one two three four", spec) is False
    assert passed("", spec) is True


def test_min_sentences():
    spec = {"type": "min_sentences", "n": 2}
    assert passed("First. Second.", spec) is True
    assert passed("Only one sentence here.", spec) is False
    assert passed("One. Two. Three.", spec) is True


def test_max_sentences():
    spec = {"type": "max_sentences", "n": 2}
    assert passed("First. Second.", spec) is True
    assert passed("One. Two. Three.", spec) is False
    assert passed("Just one.", spec) is True


def test_min_paragraphs():
    spec = {"type": "min_paragraphs", "n": 2}
    assert passed("Para one.\n\nPara two.", spec) is True
    assert passed("Para one.\nStill one.", spec) is False
    assert passed("Para one.\n***\nPara two.", spec) is True
    assert passed("Para one.\n\n\n\n", spec) is False


def test_max_paragraphs():
    spec = {"type": "max_paragraphs", "n": 2}
    assert passed("Para one.\n\nPara two.", spec) is True
    assert passed("A.\n\nB.\n\nC.", spec) is False
    assert passed("A.\n\nB.\n***\nC.", spec) is True  # *** markers take precedence


def test_include_keywords():
    spec = {"type": "include_keywords", "keywords": ["soil", "Water"]}
    assert passed("Good SOIL needs water.", spec) is True
    assert passed("Good soil needs rain.", spec) is False
    assert passed("Soils and watering.", spec) is False  # whole words only
    assert passed("Use ice cream daily and soil water", {"type": "include_keywords",
                                                         "keywords": ["ice  cream"]}) is True


def test_exclude_keywords():
    spec = {"type": "exclude_keywords", "keywords": ["very", "thing"]}
    assert passed("Everything is fine.", spec) is True  # "thing" inside a word
    assert passed("It is Very fine.", spec) is False
    assert passed("One thing.", spec) is False


def test_keyword_frequency():
    least = {"type": "keyword_frequency", "keyword": "sun", "n": 2}
    assert passed("Sun, sun and more sun.", least) is True
    assert passed("Sun and sunny skies.", least) is False
    exact = {"type": "keyword_frequency", "keyword": "sun", "n": 2, "relation": "exactly"}
    assert passed("sun SUN", exact) is True
    assert passed("sun sun sun", exact) is False
    most = {"type": "keyword_frequency", "keyword": "sun", "n": 1, "relation": "at most"}
    assert passed("the sun", most) is True
    assert passed("sun sun", most) is False
    assert passed("no star here", most) is True


def test_all_lowercase():
    spec = {"type": "all_lowercase"}
    assert passed("all lower case, 123!", spec) is True
    assert passed("Not all lower", spec) is False
    assert passed("123 !", spec) is False  # no letters at all


def test_all_uppercase():
    spec = {"type": "all_uppercase"}
    assert passed("ALL UPPER, 123!", spec) is True
    assert passed("ALL UPPEr", spec) is False
    assert passed("", spec) is False


def test_capital_word_frequency():
    spec = {"type": "capital_word_frequency", "n": 2}
    assert passed("NASA and the ESA fly.", spec) is True
    assert passed("NASA flies. I think A lot.", spec) is False  # single letters do not count
    most = {"type": "capital_word_frequency", "n": 1, "relation": "at most"}
    assert passed("Only ONE here.", most) is True
    assert passed("TWO WORDS here.", most) is False
    exact = {"type": "capital_word_frequency", "n": 0, "relation": "exactly"}
    assert passed("P.S. I am here.", exact) is True


def test_no_commas():
    spec = {"type": "no_commas"}
    assert passed("No commas here.", spec) is True
    assert passed("One, two.", spec) is False
    assert passed("全角，逗号", spec) is False


def test_starts_with():
    spec = {"type": "starts_with", "phrase": "Sure thing"}
    assert passed("  \n sure THING, here it is.", spec) is True
    assert passed("Well, sure thing.", spec) is False
    assert passed("Sure", spec) is False


def test_ends_with():
    spec = {"type": "ends_with", "phrase": "Have a nice day."}
    assert passed("Bye now. HAVE A NICE DAY.  \n\n", spec) is True
    assert passed("Have a nice day. Bye.", spec) is False
    assert passed("Have a nice day", spec) is False


def test_valid_json():
    spec = {"type": "valid_json"}
    assert passed('{"a": 1}', spec) is True
    assert passed("[1, 2, 3]", spec) is True
    assert passed("Here you go:\n```json\n{\"a\": 1}\n```", spec) is True
    assert passed("```\n{\"a\": 1}\n```", spec) is True
    assert passed("{a: 1}", spec) is False
    assert passed("", spec) is False
    keys = {"type": "valid_json", "keys": ["title", "text"]}
    assert passed('{"title": "x", "text": "y", "z": 1}', keys) is True
    assert passed('{"title": "x"}', keys) is False
    assert passed('["title", "text"]', keys) is False


def test_bullet_count():
    spec = {"type": "bullet_count", "n": 2}
    assert passed("Intro\n* one\n- two\nend", spec) is True
    assert passed("* one\n* two\n* three", spec) is False
    assert passed("*not a bullet*\n-5 degrees\n* one", spec) is False
    least = {"type": "bullet_count", "n": 2, "relation": "at least"}
    assert passed("* one\n* two\n  * three", least) is True
    assert passed("* one", least) is False


def test_numbered_sections():
    spec = {"type": "numbered_sections", "n": 2}
    assert passed("Section 1\nIntro.\n\nSECTION 2: more.", spec) is True
    assert passed("## Section 1\nText.\n**Section 2**\nText.\nSection 3\nx", spec) is True
    assert passed("Section 1\nIntro. See section 2 below.", spec) is False
    exact = {"type": "numbered_sections", "n": 2, "relation": "exactly"}
    assert passed("Section 1\na\nSection 2\nb\nSection 3\nc", exact) is False
    custom = {"type": "numbered_sections", "n": 2, "splitter": "Part"}
    assert passed("PART 1\na\nPart 2\nb", custom) is True
    assert passed("Section 1\na\nSection 2\nb", custom) is False


def test_placeholders():
    spec = {"type": "placeholders", "n": 2}
    assert passed("Dear [name], meet me at [address].", spec) is True
    assert passed("Dear [name], meet me at [].", spec) is False
    assert passed("No placeholders.", {"type": "placeholders", "n": 1}) is False


def test_title():
    spec = {"type": "title"}
    assert passed("<<My Poem>>\nRoses are red.", spec) is True
    assert passed("<<  >>\nRoses are red.", spec) is False
    assert passed("<My Poem>\nRoses.", spec) is False


def test_postscript():
    spec = {"type": "postscript"}
    assert passed("Hello.\n\nP.S. See you soon.", spec) is True
    assert passed("Hello.\n\np. s. see you soon.", spec) is True
    assert passed("Hello.\n\n**P.S.** See you.", spec) is True
    assert passed("Hello. PS see you soon.", spec) is False
    assert passed("Hello.", spec) is False
    pps = {"type": "postscript", "marker": "P.P.S"}
    assert passed("Hi.\nP.P.S more", pps) is True
    assert passed("Hi.\nP.S. more", pps) is False


def test_highlighted_sections():
    spec = {"type": "highlighted_sections", "n": 2}
    assert passed("This is *one* and *two parts*.", spec) is True
    assert passed("This is **bold** and *one*.", spec) is False
    assert passed("* bullet\n* another bullet", spec) is False
    assert passed("2 * 3 * 4 and *x*", spec) is False
    assert passed("* item with *a* and *b*", spec) is True


def test_repeat_prompt():
    spec = {"type": "repeat_prompt"}
    assert passed("Explain tides. Tides are...", spec, prompt_text="Explain tides.") is True
    assert passed("Tides are...", spec, prompt_text="Explain tides.") is False
    assert passed("Explain tides.", spec, prompt_text="") is False
    given = {"type": "repeat_prompt", "prompt": "Explain tides."}
    assert passed(" explain TIDES. They are...", given, prompt_text="other") is True
    assert passed("Explain. Tides.", given) is False
    chat = [{"role": "system", "content": "Be nice."},
            {"role": "user", "content": "Explain tides."}]
    assert passed("Explain tides. Ok.", spec, prompt_text=chat) is True


def test_two_responses():
    spec = {"type": "two_responses"}
    assert passed("Answer A.\n******\nAnswer B.", spec) is True
    assert passed("Answer A.\n******\nanswer  a.", spec) is False  # not different
    assert passed("Answer A.", spec) is False
    assert passed("A\n******\nB\n******\nC", spec) is False
    assert passed("A\n******\n   ", spec) is False


def test_exact():
    spec = {"type": "exact", "answer": "Paris"}
    assert passed("  paris \n", spec) is True
    assert passed("Let me think.\nThe capital is:\nPARIS", spec) is True
    assert passed("The capital is Paris.", spec) is False
    ref = {"type": "exact"}
    assert passed("Reasoning...\nnew   york", ref, meta={"reference": "New York"}) is True
    assert passed("42", ref, meta={"reference": 42}) is True
    assert passed("b", ref, meta={"reference": ["a", "b"]}) is True
    assert passed("c", ref, meta={"reference": ["a", "b"]}) is False
    with pytest.raises(DataError) as e:
        run_checks("x", [ref], meta={})
    assert e.value.field == "meta.checks[0].answer"


def test_numeric():
    spec = {"type": "numeric", "value": 42}
    assert passed("First 7, then the answer is 42.", spec) is True
    assert passed("The answer is 42, not 41.", spec) is False
    assert passed("No number.", spec) is False
    assert passed("Total: 1,234.5", {"type": "numeric", "value": 1234.5}) is True
    assert passed("x = -3", {"type": "numeric", "value": -3}) is True
    assert passed("about 3.1416", {"type": "numeric", "value": 3.14159, "tol": 0.001}) is True
    assert passed("about 3.1416", {"type": "numeric", "value": 3.14159}) is False
    ref = {"type": "numeric"}
    assert passed("So 12.", ref, meta={"reference": "12"}) is True
    assert passed("So 1,200.", ref, meta={"reference": "1,200"}) is True
    assert passed("So 13.", ref, meta={"reference": 12}) is False
    with pytest.raises(DataError) as e:
        run_checks("x", [ref], meta={"reference": "twelve"})
    assert e.value.field == "meta.reference"
    with pytest.raises(DataError) as e:
        run_checks("x", [ref])
    assert e.value.field == "meta.checks[0].value"


def test_regex():
    spec = {"type": "regex", "pattern": r"^answer: \d+$", "flags": "im"}
    assert passed("Work.\nANSWER: 12\n", spec) is True
    assert passed("Work.\nanswer: twelve", spec) is False
    assert passed("Answer: 12", {"type": "regex", "pattern": "answer"}) is False
    assert passed("Answer: 12", {"type": "regex", "pattern": "answer", "flags": "i"}) is True
    assert passed("x", {"type": "regex", "pattern": "x", "flags": ""}) is True


# ---------------------------------------------------------------- run_checks / score

def test_run_checks_and_score():
    checks = [{"type": "max_words", "n": 3}, {"type": "all_lowercase"},
              {"type": "include_keywords", "keywords": ["cat"]}]
    res = run_checks("the cat sat", checks)
    assert res == [{"type": "max_words", "passed": True},
                   {"type": "all_lowercase", "passed": True},
                   {"type": "include_keywords", "passed": True}]
    assert check_score(res) == 1.0
    res = run_checks("The dog sat down", checks)
    assert [r["passed"] for r in res] == [False, False, False]
    assert check_score(res) == 0.0
    res = run_checks("the cat sat down", checks)
    assert check_score(res) == pytest.approx(2 / 3)
    assert check_score([]) is None
    assert run_checks("x", []) == []


def test_run_checks_reads_meta_checks_and_chat_text():
    meta = {"checks": [{"type": "max_words", "n": 2}]}
    assert run_checks("two words", None, meta=meta) == [{"type": "max_words", "passed": True}]
    chat = [{"role": "user", "content": "Hi there friend"},
            {"role": "assistant", "content": "hello you"}]
    assert run_checks(chat, None, meta=meta) == [{"type": "max_words", "passed": True}]


def test_run_checks_reports_field_of_bad_check():
    with pytest.raises(DataError) as e:
        run_checks("x", [{"type": "max_words", "n": 3}, {"type": "max_words", "n": "3"}])
    assert e.value.field == "meta.checks[1].n"
    assert e.value.exit_code == 3


# ---------------------------------------------------------------- validation

def test_validate_check_fills_defaults_and_copies():
    spec = {"type": "bullet_count", "n": 3}
    out = validate_check(spec)
    assert out == {"type": "bullet_count", "n": 3, "relation": "exactly"}
    assert spec == {"type": "bullet_count", "n": 3}
    assert validate_check({"type": "postscript"}) == {"type": "postscript", "marker": "P.S."}
    assert validate_check({"type": "numeric", "value": 2}) == {"type": "numeric", "value": 2.0,
                                                               "tol": 1e-6}
    assert validate_check({"type": "valid_json"}) == {"type": "valid_json", "keys": []}
    assert validate_check({"type": "numbered_sections", "n": 2}) == {
        "type": "numbered_sections", "n": 2, "splitter": "Section", "relation": "at least"}
    assert validate_check({"type": "exact"}) == {"type": "exact"}
    assert validate_check({"type": "exact", "answer": None}) == {"type": "exact"}


@pytest.mark.parametrize("spec, field, fragment", [
    ("max_words", "check", "must be an object"),
    ({"n": 3}, "check.type", "missing check type"),
    ({"type": "nope"}, "check.type", "unknown check type 'nope'"),
    ({"type": 3}, "check.type", "unknown check type 3"),
    ({"type": "max_words"}, "check.n", "missing required parameter 'n'"),
    ({"type": "max_words", "n": "5"}, "check.n", "must be an integer"),
    ({"type": "max_words", "n": 5.0}, "check.n", "must be an integer"),
    ({"type": "max_words", "n": True}, "check.n", "must be an integer"),
    ({"type": "max_words", "n": -1}, "check.n", "must be >= 0"),
    ({"type": "max_words", "n": 5, "num": 3}, "check.num", "unknown parameter 'num'"),
    ({"type": "include_keywords", "keywords": "soil"}, "check.keywords", "list of strings"),
    ({"type": "include_keywords", "keywords": ["soil", 3]}, "check.keywords[1]", "non-empty"),
    ({"type": "include_keywords", "keywords": ["soil", " "]}, "check.keywords[1]", "non-empty"),
    ({"type": "keyword_frequency", "keyword": "x", "n": 1, "relation": "more than"},
     "check.relation", "must be one of 'at least', 'at most', 'exactly'"),
    ({"type": "starts_with", "phrase": ""}, "check.phrase", "non-empty string"),
    ({"type": "starts_with", "phrase": 5}, "check.phrase", "must be a string"),
    ({"type": "numeric", "value": "42"}, "check.value", "must be a number"),
    ({"type": "numeric", "value": 1, "tol": -1}, "check.tol", "must be >= 0"),
    ({"type": "numeric", "value": float("nan")}, "check.value", "finite"),
    ({"type": "regex", "pattern": "("}, "check.pattern", "invalid regular expression"),
    ({"type": "regex", "pattern": "a", "flags": "ix"}, "check.flags", "unknown regex flag"),
    ({"type": "all_lowercase", "n": 1}, "check.n", "parameters: none"),
])
def test_validate_check_errors(spec, field, fragment):
    with pytest.raises(DataError) as e:
        validate_check(spec)
    assert e.value.field == field
    assert fragment in e.value.problem


def test_validate_checks_fields_and_location():
    with pytest.raises(DataError) as e:
        validate_checks([{"type": "title"}, {"type": "max_words", "n": "x"}])
    assert e.value.field == "meta.checks[1].n"
    located = e.value.at("prompts.jsonl", 7)
    assert str(located) == "prompts.jsonl:7: meta.checks[1].n: must be an integer, got 'x'"
    with pytest.raises(DataError) as e:
        validate_checks({"type": "title"})
    assert e.value.field == "meta.checks"


# ---------------------------------------------------------------- registry and describe

def test_registry_names():
    assert sorted(CHECKS) == sorted([
        "min_words", "max_words", "min_sentences", "max_sentences", "min_paragraphs",
        "max_paragraphs", "include_keywords", "exclude_keywords", "keyword_frequency",
        "all_lowercase", "all_uppercase", "capital_word_frequency", "no_commas",
        "starts_with", "ends_with", "valid_json", "bullet_count", "numbered_sections",
        "placeholders", "title", "postscript", "highlighted_sections", "repeat_prompt",
        "two_responses", "exact", "numeric", "regex"])
    for name, ct in CHECKS.items():
        assert ct.name == name
        assert ct.description
        for p in ct.params:
            assert p.type in ("int", "float", "str", "list[str]")
            if p.required:
                assert p.default is None


def test_describe_check():
    assert describe_check({"type": "max_words", "n": 50}) == "Answer in at most 50 words."
    assert describe_check({"type": "min_words", "n": 1}) == "Answer with at least 1 word."
    assert describe_check({"type": "include_keywords", "keywords": ["soil"]}) == \
        'Include the word "soil" in your answer.'
    assert describe_check({"type": "include_keywords", "keywords": ["a", "b", "c"]}) == \
        'Include the words "a", "b" and "c" in your answer.'
    assert describe_check({"type": "keyword_frequency", "keyword": "sun", "n": 3,
                           "relation": "at most"}) == 'Use the word "sun" at most 3 times.'
    assert describe_check({"type": "max_paragraphs", "n": 1}) == \
        "Write a single paragraph, with no blank lines."
    assert describe_check({"type": "starts_with", "phrase": " Sure "}) == \
        'Begin your answer with the exact phrase "Sure".'
    assert describe_check({"type": "repeat_prompt", "prompt": "Explain tides."}) == \
        'First repeat the request "Explain tides." word for word without change, ' \
        'then give your answer.'
    assert describe_checks([{"type": "no_commas"}, {"type": "title"}]) == (
        "Do not use any commas in your answer. Give your answer a title wrapped in double "
        "angular brackets, such as <<my title>>.")
    for name, ct in CHECKS.items():
        spec = {"type": name}
        for p in ct.params:
            if p.required:
                spec[p.name] = {"int": 2, "float": 1.0, "str": "x",
                                "list[str]": ["a"]}[p.type]
        text = describe_check(spec)
        assert text[0].isupper() and text.endswith("."), (name, text)
    with pytest.raises(DataError):
        describe_check({"type": "max_words"})


# ---------------------------------------------------------------- demo data set

def _load(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def test_demo_prompt_files():
    train = _load(DATA / "train.jsonl")
    evals = _load(DATA / "eval.jsonl")
    assert len(train) >= 600
    assert len(evals) >= 200
    for records, prefix in ((train, "train-"), (evals, "eval-")):
        ids = [r["id"] for r in records]
        assert len(set(ids)) == len(ids)
        assert all(i.startswith(prefix) for i in ids)
        for r in records:
            checks = r["meta"]["checks"]
            assert 1 <= len(checks) <= 3, r["id"]
            assert validate_checks(checks) == checks, r["id"]
            assert len({c["type"] for c in checks}) == len(checks), r["id"]
            assert isinstance(r["prompt"], str) and r["prompt"].strip()
            assert r["meta"]["topic"]
    train_prompts = {r["prompt"] for r in train}
    eval_prompts = {r["prompt"] for r in evals}
    assert len(train_prompts) == len(train)
    assert len(eval_prompts) == len(evals)
    assert not train_prompts & eval_prompts
    assert not {r["id"] for r in train} & {r["id"] for r in evals}
    used = {c["type"] for r in train + evals for c in r["meta"]["checks"]}
    assert len(used) >= 16  # every trained type (the held-out families are in other files)
    assert not used & {"exact", "numeric", "regex"}
    assert len({r["meta"]["topic"] for r in train}) >= 40


def _load_generator():
    import importlib.util
    spec = importlib.util.spec_from_file_location("make_prompts", DATA / "make_prompts.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_demo_prompt_files_are_reproducible(tmp_path):
    gen = _load_generator()
    assert gen.main(["--out", str(tmp_path)]) == 0
    for name in ("train.jsonl", "eval.jsonl", "eval-types.jsonl", "eval-three.jsonl",
                 "train-varied.jsonl"):
        assert (tmp_path / name).read_bytes() == (DATA / name).read_bytes(), name
    other = tmp_path / "seed1"
    assert gen.main(["--out", str(other), "--seed", "1"]) == 0
    assert (other / "train-varied.jsonl").read_bytes() != (DATA / "train-varied.jsonl").read_bytes()


def test_held_out_families_never_reach_a_training_prompt():
    gen = _load_generator()
    held = gen.HELD_OUT_TYPES
    assert held == {"all_lowercase", "all_uppercase", "capital_word_frequency", "starts_with",
                    "ends_with", "valid_json", "two_responses", "repeat_prompt"}
    assert set(gen.WEIGHTS) == {t for f in gen.FAMILIES.values() for t in f}
    train, evals = _load(DATA / "train.jsonl"), _load(DATA / "eval.jsonl")
    for r in train + evals:
        assert not {c["type"] for c in r["meta"]["checks"]} & held, r["id"]
    types, three = _load(DATA / "eval-types.jsonl"), _load(DATA / "eval-three.jsonl")
    for r in types:
        assert {c["type"] for c in r["meta"]["checks"]} <= held, r["id"]
    assert {c["type"] for r in types for c in r["meta"]["checks"]} == held
    assert all(len(r["meta"]["checks"]) == 3 for r in three)
    assert {c["type"] for r in three for c in r["meta"]["checks"]} & held
    # other phrasings than the training prompts: no instruction sentence is shared
    from alignkit.checks import describe_check
    for r in types + three:
        assert not any(describe_check(c) in r["prompt"] for c in r["meta"]["checks"]), r["id"]
        assert r["prompt"] not in {t["prompt"] for t in train}


def test_varied_training_prompts_reword_the_same_records():
    gen = _load_generator()
    from alignkit.checks import describe_check
    train, varied = _load(DATA / "train.jsonl"), _load(DATA / "train-varied.jsonl")
    assert [r["id"] for r in varied] == [r["id"] for r in train]
    assert [r["meta"]["checks"] for r in varied] == [r["meta"]["checks"] for r in train]
    assert all(r["meta"]["phrasing"] == "varied" for r in varied)
    for r in varied:
        assert not {c["type"] for c in r["meta"]["checks"]} & gen.HELD_OUT_TYPES, r["id"]
        # never the transfer sets' wording, so that the held-out phrasings stay held out
        for c in r["meta"]["checks"]:
            assert not any(p(c) in r["prompt"] for p in gen.PARAPHRASES[c["type"]]), r["id"]
    texts = {r["prompt"] for name in ("train", "eval", "eval-types", "eval-three")
             for r in _load(DATA / f"{name}.jsonl")}
    assert not texts & {r["prompt"] for r in varied}
    assert len({r["prompt"] for r in varied}) == len(varied)
    # reworded for real: most prompts use at least one non-canonical instruction, and
    # every layout and every wording occurs
    canonical = sum(all(describe_check(c) in r["prompt"] for c in r["meta"]["checks"])
                    for r in varied)
    assert canonical < 0.5 * len(varied)
    assert sum(r["prompt"].startswith("Task: ") for r in varied) > 0.1 * len(varied)
    for t, forms in gen.TRAIN_PHRASINGS.items():
        for form in forms:
            assert any(form(c) in r["prompt"] for r in varied for c in r["meta"]["checks"]
                       if c["type"] == t), (t, form)
    # the task is recovered from the canonical prompt, and a prompt that is not one fails
    assert gen.canonical_task(train[0]) in train[0]["prompt"]
    with pytest.raises(ValueError, match="train-00001"):
        gen.canonical_task({**train[0], "prompt": "something else"})


def test_demo_prompts_have_no_conflicting_checks():
    gen = _load_generator()
    records = [r for name in ("train", "eval", "eval-types", "eval-three")
               for r in _load(DATA / f"{name}.jsonl")]
    for r in records:
        types = [c["type"] for c in r["meta"]["checks"]]
        assert gen._compatible_types(types), (r["id"], types)
        by = {c["type"]: c for c in r["meta"]["checks"]}
        if "max_words" in by:
            assert by["max_words"]["n"] >= gen._word_demand(by), r["id"]
        if "all_lowercase" in by:
            for t in ("starts_with", "ends_with"):
                if t in by:
                    assert by[t]["phrase"] == by[t]["phrase"].lower(), r["id"]
