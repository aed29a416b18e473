"""The sampler (alignkit.generation) and `alignkit gen-pairs`: records, logp against
teacher forcing, determinism (seed, batching, shards, resume), the pairing modes, and
the error paths (exit 2 for flags, exit 3 with path:line for data)."""
from __future__ import annotations

import json
import math

import pytest

from alignkit.gen_pairs import GenPairsOptions, remove_context
from alignkit.generation import (SampleParams, pick_tokens, completion_logps, encode_pair, encode_prompt,
                                 render_prompt, sample, token_logps)
from alignkit.vllm_engine import vllm_available
from alignkit.records import derive_id, validate
from conftest import write_jsonl

torch = pytest.importorskip("torch")

PROMPTS = [
    {"id": "a", "prompt": "Write a short answer.", "meta": {"topic": "x"}, "keep_me": [1, 2]},
    {"prompt": [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Explain why the sky is blue."}]},
    {"id": "c", "prompt": "Give three tips for cooking rice."},
    {"id": "d", "prompt": "hello"},
]


@pytest.fixture(scope="module")
def lm(tiny_model):
    from alignkit.models import load_causal_lm
    return load_causal_lm(tiny_model, "float32")


@pytest.fixture(scope="module")
def lm_b(tiny_model_b):
    from alignkit.models import load_causal_lm
    return load_causal_lm(tiny_model_b, "float32")


def _teacher_forced(model, prompt_ids, comp_ids, ref=None, alpha=0.0):
    """Independent reference: one full forward pass, log-softmax at each position."""
    ids = torch.tensor([prompt_ids + comp_ids])
    with torch.no_grad():
        lsm = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        if ref is not None:
            rl = torch.log_softmax(ref(input_ids=ids).logits[0].float(), -1)
            lsm = torch.log_softmax((1 - alpha) * lsm + alpha * rl, -1)
    start = len(prompt_ids)
    return sum(lsm[start + i - 1, t].item() for i, t in enumerate(comp_ids))


def _canonical(tok, s: dict) -> bool:
    """Whether a sample's text tokenizes back to its sampled ids (eos aside)."""
    ids = s["token_ids"][:-1] if s["finished"] else s["token_ids"]
    return tok(s["text"], add_special_tokens=False)["input_ids"] == ids


def _gen(cli, tiny_model, src, *extra, out=None):
    args = ["gen-pairs", src, "--model", tiny_model, "--max-new-tokens", "6", *extra]
    if out is not None:
        args += ["-o", out]
    return cli(args)


# --- prompt rendering and encoding ----------------------------------------------------------

def test_render_prompt_template_system_raw(lm):
    _, tok = lm
    assert render_prompt(tok, "hi") == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert render_prompt(tok, "hi", system="S") == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert render_prompt(tok, "hi", raw=True) == "hi"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "q2"}]
    assert render_prompt(tok, msgs, raw=True).endswith("<|im_start|>user\nq2<|im_end|>\n"
                                                       "<|im_start|>assistant\n")
    from alignkit.errors import UsageError
    with pytest.raises(UsageError):
        render_prompt(tok, "hi", system="S", raw=True)


def test_message_prompt_needs_template(lm):
    import copy

    from alignkit.errors import UsageError
    tok = copy.deepcopy(lm[1])
    tok.chat_template = None
    assert render_prompt(tok, "plain") == "plain"
    with pytest.raises(UsageError, match="chat template"):
        render_prompt(tok, [{"role": "user", "content": "x"}])


def test_encode_pair_adds_eos_and_matches_prompt_encoding(lm):
    _, tok = lm
    rendered = render_prompt(tok, "hello")
    p, c = encode_pair(tok, rendered, "good answer")
    assert p == encode_prompt(tok, rendered) == tok(rendered, add_special_tokens=False)["input_ids"]
    assert c == tok("good answer", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert encode_pair(tok, rendered, "good answer", add_eos=False)[1] == c[:-1]
    # a message-list completion is scored on its text
    assert encode_pair(tok, rendered, [{"role": "assistant", "content": "good answer"}])[1] == c


# --- token choice ------------------------------------------------------------------------------

def test_pick_inverse_cdf_frequencies_across_blocks():
    vocab = 700  # several 256-token blocks, the last one partial
    logits = torch.full((1, vocab), float("-inf"))
    probs = {5: 0.2, 300: 0.5, 699: 0.3}
    for i, p in probs.items():
        logits[0, i] = math.log(p)
    n = 1000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    picks = pick_tokens(logits.expand(n, vocab), u, SampleParams(temperature=1.0)).tolist()
    counts = {i: picks.count(i) for i in probs}
    assert sum(counts.values()) == n  # never a zero-probability token
    for i, p in probs.items():
        assert abs(counts[i] - n * p) <= 1


def test_pick_filters_and_greedy():
    logits = torch.tensor([[0.0, 3.0, 2.9, -1.0, 1.0]])
    u = torch.linspace(0.001, 0.999, 200, dtype=torch.float64)
    rows = logits.expand(200, 5)
    assert set(pick_tokens(rows, u, SampleParams(temperature=1.0, top_k=1)).tolist()) == {1}
    assert set(pick_tokens(rows, u, SampleParams(temperature=1.0, top_k=2)).tolist()) == {1, 2}
    # top-p 0.5: token 1 holds ~0.47 of the mass, so tokens 1 and 2 are kept
    assert set(pick_tokens(rows, u, SampleParams(temperature=1.0, top_p=0.5)).tolist()) == {1, 2}
    assert set(pick_tokens(rows, u, SampleParams(temperature=1.0, top_p=0.01)).tolist()) == {1}
    assert set(pick_tokens(rows, u, SampleParams(temperature=0.0)).tolist()) == {1}
    # a low temperature sharpens: almost all mass on token 1 and 2
    assert set(pick_tokens(rows, u, SampleParams(temperature=0.05)).tolist()) <= {1, 2}


# --- the sampler -------------------------------------------------------------------------------

def test_sample_logp_matches_teacher_forcing(lm):
    model, tok = lm
    prompts = [p["prompt"] for p in PROMPTS]
    params = SampleParams(n=3, max_new_tokens=10, seed=3, batch_size=2)
    groups = sample(model, tok, prompts, params, return_ids=True)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    for prompt, group in zip(prompts, groups):
        pids = encode_prompt(tok, render_prompt(tok, prompt))
        for s in group:
            assert set(s) == {"text", "logp", "n_tokens", "finished", "token_ids"}
            assert s["n_tokens"] == len(s["token_ids"]) and 1 <= s["n_tokens"] <= 10
            assert s["finished"] == (s["token_ids"][-1] == tok.eos_token_id)
            ref = _teacher_forced(model, pids, s["token_ids"])
            assert abs(s["logp"] - ref) < 1e-4, (s["logp"], ref)
    # the library's own teacher forcing gives the same numbers
    flat = [(encode_prompt(tok, render_prompt(tok, p)), s["token_ids"]) for p, g in zip(prompts, groups)
            for s in g]
    per = token_logps(model, flat, batch_size=5)
    logps = [s["logp"] for g in groups for s in g]
    assert all(abs(sum(x) - y) < 1e-4 for x, y in zip(per, logps))
    assert [len(x) for x in per] == [s["n_tokens"] for g in groups for s in g]


def test_forward_keep_gives_the_last_logits_and_a_contiguous_head_input(tiny_model):
    """A frozen model (as every merged or reference model is) keeps the last `keep`
    positions' logits of the full forward, and its head sees a contiguous input (a
    strided one makes torch copy the head weight once per row)."""
    from alignkit.generation import forward_keep, left_pad
    from alignkit.models import load_causal_lm
    model, _ = load_causal_lm(tiny_model, "float32")
    model.requires_grad_(False)
    ids, mask, pos = left_pad([[5, 6, 7, 8, 9, 10], [11, 12, 13]], 0, "cpu")
    seen = []
    probe = model.get_output_embeddings().register_forward_hook(
        lambda mod, args, out: seen.append(args[0].is_contiguous()))
    with torch.inference_mode():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        for keep in (1, 3):
            _, last = forward_keep(model, keep, input_ids=ids, attention_mask=mask, position_ids=pos)
            assert last.shape == (2, keep, full.shape[-1])
            assert torch.allclose(last, full[:, -keep:], atol=1e-5)
    probe.remove()
    assert seen == [True, True, True]
    assert not model.get_output_embeddings()._forward_pre_hooks  # the hook is removed


def test_eos_stops_and_is_not_in_text(lm, tiny_model):
    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(tiny_model, "float32")
    params = SampleParams(n=1, temperature=1.0, max_new_tokens=10)
    free = sample(model, tok, ["hello"], params, return_ids=True)[0][0]
    ids = free["token_ids"]
    k = next(i for i in range(2, len(ids)) if ids[i] not in ids[:i])
    model.generation_config.eos_token_id = [tok.eos_token_id, ids[k]]
    s = sample(model, tok, ["hello"], params, return_ids=True)[0][0]
    assert s["finished"] is True and s["n_tokens"] == k + 1 and s["token_ids"] == ids[:k + 1]
    assert s["text"] == tok.decode(ids[:k], skip_special_tokens=True)
    pids = encode_prompt(tok, render_prompt(tok, "hello"))
    assert abs(s["logp"] - _teacher_forced(model, pids, s["token_ids"])) < 1e-4
    # special tokens never reach the text
    for g in sample(lm[0], lm[1], ["hello", "Write"], SampleParams(n=4, max_new_tokens=12, temperature=1.5)):
        for c in g:
            assert "<|im_end|>" not in c["text"] and "<|im_start|>" not in c["text"]


def test_completion_logps_sums_and_per_token(lm):
    model, tok = lm
    rendered = [render_prompt(tok, "hello"), render_prompt(tok, "Write a short answer.")]
    comps = ["good answer", "yes no"]
    sums = completion_logps(model, tok, rendered, comps)
    per = completion_logps(model, tok, rendered, comps, per_token=True)
    for r, c, s, pt in zip(rendered, comps, sums, per):
        p_ids, c_ids = encode_pair(tok, r, c)
        assert len(pt) == len(c_ids)
        assert abs(s - sum(pt)) < 1e-9
        assert abs(s - _teacher_forced(model, p_ids, c_ids)) < 1e-4
    no_eos = completion_logps(model, tok, rendered, comps, add_eos=False, batch_size=1)
    assert all(abs(a - (b - pt[-1])) < 1e-4 for a, b, pt in zip(no_eos, sums, per))


def test_sample_deterministic_and_batch_independent(lm):
    model, tok = lm
    prompts = [p["prompt"] for p in PROMPTS]
    keys = ["k1", "k2", "k3", "k4"]
    a = sample(model, tok, prompts, SampleParams(n=2, max_new_tokens=8, seed=1, batch_size=4), keys=keys)
    b = sample(model, tok, prompts, SampleParams(n=2, max_new_tokens=8, seed=1, batch_size=1), keys=keys)
    c = sample(model, tok, prompts, SampleParams(n=2, max_new_tokens=8, seed=2, batch_size=4), keys=keys)
    assert [[x["text"] for x in g] for g in a] == [[x["text"] for x in g] for g in b]
    assert all(abs(x["logp"] - y["logp"]) < 1e-4 for ga, gb in zip(a, b) for x, y in zip(ga, gb))
    assert [[x["text"] for x in g] for g in a] != [[x["text"] for x in g] for g in c]
    # the n samples of a prompt differ from each other
    assert all(len({x["text"] for x in g}) == 2 for g in a)
    # a prompt's samples do not depend on the other prompts in the call
    alone = sample(model, tok, prompts[2:3], SampleParams(n=2, max_new_tokens=8, seed=1), keys=keys[2:3])
    assert [x["text"] for x in alone[0]] == [x["text"] for x in a[2]]


def test_slot_decoder_matches_the_batch_loop(lm, tiny_model, monkeypatch):
    """Continuous batching (slots refilled as samples end, compacted at the tail) gives
    the same tokens and logp as decoding each batch to its end with a shrinking cache."""
    from alignkit import slots
    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(tiny_model, "float32")
    assert slots.supported(model)
    # an extra stop token makes samples end at different steps, so slots are refilled
    prompts = [p["prompt"] for p in PROMPTS] + ["a much longer prompt " * 4, "hi", "Write"]
    params = SampleParams(n=3, temperature=1.3, max_new_tokens=12, seed=5, batch_size=2)
    free = sample(model, tok, prompts, params, return_ids=True)
    for cand in sorted({t for g in free for x in g for t in x["token_ids"]}):
        model.generation_config.eos_token_id = [tok.eos_token_id, cand]
        got = sample(model, tok, prompts, params, return_ids=True)
        if len({x["n_tokens"] for g in got for x in g}) > 3:
            break
    monkeypatch.setenv("ALIGNKIT_SLOTS", "0")
    assert not slots.supported(model)
    want = sample(model, tok, prompts, params, return_ids=True)
    assert len({x["n_tokens"] for g in got for x in g}) > 3  # ends at many steps: refills
    assert [[x["token_ids"] for x in g] for g in got] == [[x["token_ids"] for x in g] for g in want]
    assert all(abs(x["logp"] - y["logp"]) < 1e-4 and x["finished"] == y["finished"]
               for g, h in zip(got, want) for x, y in zip(g, h))


def test_sample_restores_training_mode(tiny_model):
    from alignkit.models import load_causal_lm
    model, tok = load_causal_lm(tiny_model, "float32")
    params = SampleParams(n=2, max_new_tokens=4)
    want = sample(model, tok, ["hello"], params)
    model.train()
    for m in model.modules():  # dropout that would change the samples if left active
        if hasattr(m, "attention_dropout"):
            m.attention_dropout = 0.5
    got = sample(model, tok, ["hello"], params)
    assert model.training is True and got == want
    rendered = [render_prompt(tok, "hello")]
    model.eval()
    scored_eval = completion_logps(model, tok, rendered, ["good"])
    model.train()
    assert completion_logps(model, tok, rendered, ["good"]) == scored_eval and model.training


def test_mixture_sampling(lm, lm_b):
    model, tok = lm
    ref = lm_b[0]
    prompts = ["hello", "Write a short answer."]
    params = SampleParams(n=2, max_new_tokens=8, seed=5)
    mixed = sample(model, tok, prompts, params, ref_model=ref, alpha=0.3, return_ids=True)
    for prompt, group in zip(prompts, mixed):
        pids = encode_prompt(tok, render_prompt(tok, prompt))
        for s in group:
            ids = s["token_ids"]
            assert abs(s["logp"] - _teacher_forced(model, pids, ids)) < 1e-4
            assert abs(s["logp_ref"] - _teacher_forced(ref, pids, ids)) < 1e-4
            assert abs(s["logp_mix"] - _teacher_forced(model, pids, ids, ref, 0.3)) < 1e-4
    # alpha = 1 samples the reference's distribution, alpha = 0 the policy's
    plain_ref = sample(ref, tok, prompts, params)
    plain_pol = sample(model, tok, prompts, params)
    as_ref = sample(model, tok, prompts, params, ref_model=ref, alpha=1.0)
    as_pol = sample(model, tok, prompts, params, ref_model=ref, alpha=0.0)
    texts = lambda gs: [[x["text"] for x in g] for g in gs]  # noqa: E731
    assert texts(as_ref) == texts(plain_ref) and texts(as_pol) == texts(plain_pol)
    assert texts(as_ref) != texts(as_pol)


# --- the command: samples records -----------------------------------------------------------

def test_gen_pairs_end_to_end(cli, tiny_model, tmp_path):
    from alignkit.models import model_sha256
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "s.jsonl"
    r = _gen(cli, tiny_model, src, "-n", "3", "--top-k", "50", out=out)
    assert r.code == 0, r
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [x["id"] for x in recs] == ["a", derive_id(PROMPTS[1]["prompt"]), "c", "d"]
    for rec, src_rec in zip(recs, PROMPTS):
        validate(rec, "samples")
        assert rec["prompt"] == src_rec["prompt"]
        assert len(rec["completions"]) == 3
        for c in rec["completions"]:
            assert set(c) == {"text", "logp", "n_tokens", "finished"}
            assert c["logp"] < 0 and 1 <= c["n_tokens"] <= 6
            if isinstance(rec["prompt"], list):
                assert c["text"][0]["role"] == "assistant" and len(c["text"]) == 1
            else:
                assert isinstance(c["text"], str)
        assert rec["gen"] == {"model": str(tiny_model), "model_sha256": model_sha256(tiny_model),
                              "temperature": 0.7, "top_p": 1.0, "max_new_tokens": 6, "seed": 0,
                              "top_k": 50, "n": 3, "dtype": "auto", "engine": "hf"}
    assert recs[0]["meta"] == {"topic": "x"} and recs[0]["keep_me"] == [1, 2]
    man = json.loads((tmp_path / "s.jsonl.alignkit.json").read_text())
    assert man["counts"]["prompts"] == 4 and man["counts"]["records_written"] == 4
    assert man["counts"]["tokens"] == sum(c["n_tokens"] for x in recs for c in x["completions"])
    assert man["seed"] == 0 and man["mode"] == "samples" and str(src) in man["inputs"]


def test_gen_pairs_stdout_matches_library(cli, tiny_model, lm, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = _gen(cli, tiny_model, src, "-n", "2", "--system", "Be kind.", "--seed", "9")
    assert r.code == 0, r
    got = r.records[0]["completions"]
    want = sample(lm[0], lm[1], [PROMPTS[0]["prompt"]], SampleParams(n=2, max_new_tokens=6, seed=9),
                  system="Be kind.", keys=["a"], return_ids=True)[0]
    assert [c["text"] for c in got] == [w["text"] for w in want]
    for c, w in zip(got, want):
        if _canonical(lm[1], w):
            assert abs(c["logp"] - w["logp"]) < 1e-6
    assert r.records[0]["gen"]["system"] == "Be kind."
    assert not list(tmp_path.glob("*.alignkit.json"))  # no manifest for stdout


def test_logp_is_the_log_prob_of_the_text_as_trainers_tokenize_it(cli, tiny_model, lm, tmp_path):
    """A sample whose ids are not its text's own tokenization is re-scored on the text's
    tokens (what trainers see), so every `logp` equals teacher forcing on the text with
    eos when finished; the manifest counts the re-scored samples."""
    model, tok = lm
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    out = tmp_path / "s.jsonl"
    r = _gen(cli, tiny_model, src, "-n", "4", "--temperature", "1.5", "--seed", "2", out=out)
    assert r.code == 0, r
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    raw = sample(model, tok, [p["prompt"] for p in PROMPTS],
                 SampleParams(n=4, max_new_tokens=6, seed=2, temperature=1.5), return_ids=True,
                 keys=[x["id"] for x in recs])
    odd = sum(not _canonical(tok, s) for g in raw for s in g)
    assert odd > 0  # a random tiny model emits odd tokenizations: the case under test
    rendered, texts, eos, got = [], [], [], []
    for rec in recs:
        for c in rec["completions"]:
            rendered.append(render_prompt(tok, rec["prompt"]))
            texts.append(c["text"])
            eos.append(c["finished"])
            got.append(c["logp"])
    want = completion_logps(model, tok, rendered, texts, add_eos=eos)
    assert all(abs(a - b) < 1e-4 for a, b in zip(got, want)), list(zip(got, want))
    man = json.loads((tmp_path / "s.jsonl.alignkit.json").read_text())
    assert man["counts"]["samples_rescored"] == odd


def test_gen_pairs_same_seed_same_output(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    one = _gen(cli, tiny_model, src, "-n", "2", "--seed", "4")
    two = _gen(cli, tiny_model, src, "-n", "2", "--seed", "4")
    other = _gen(cli, tiny_model, src, "-n", "2", "--seed", "5")
    assert one.code == two.code == other.code == 0
    assert one.out == two.out
    assert _texts(one.records) != _texts(other.records)
    # another batching gives the same samples (logp equal up to float round-off)
    single = _gen(cli, tiny_model, src, "-n", "2", "--seed", "4", "--batch-size", "1")
    _same_records(single.records, one.records)


def _texts(records):
    return [[c["text"] for c in r["completions"]] for r in records]


def _same_records(got, want, keys=("logp",)):
    """Equal records, except float fields that may differ by round-off (other batching)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        gc, wc = g.pop("completions", None), w.pop("completions", None)
        gl = {k: g.pop(k) for k in ("ref_logp_chosen", "ref_logp_rejected", "ref_chosen_logps", "ref_rejected_logps") if k in g}
        wl = {k: w.pop(k) for k in ("ref_logp_chosen", "ref_logp_rejected", "ref_chosen_logps", "ref_rejected_logps") if k in w}
        assert g == w
        assert gl.keys() == wl.keys() and all(abs(gl[k] - wl[k]) < 1e-4 for k in gl)
        if gc is not None:
            for a, b in zip(gc, wc):
                assert {k: v for k, v in a.items() if k not in keys} == \
                    {k: v for k, v in b.items() if k not in keys}
                assert all(abs(a[k] - b[k]) < 1e-4 for k in keys)


def test_shards_partition_and_match_full_run(cli, tiny_model, tmp_path):
    many = [{"id": f"q{i}", "prompt": f"Give {i} tips."} for i in range(10)]
    src = write_jsonl(tmp_path / "p.jsonl", many)
    full = _gen(cli, tiny_model, src, "-n", "1")
    shards = [_gen(cli, tiny_model, src, "-n", "1", "--shard", f"{i}/3") for i in range(3)]
    assert full.code == 0 and all(s.code == 0 for s in shards)
    by_id = {r["id"]: r for r in full.records}
    seen = [r["id"] for s in shards for r in s.records]
    assert sorted(seen) == sorted(by_id) and len(seen) == len(set(seen))
    assert all(len(s.records) < 10 for s in shards)
    for s in shards:
        for r in s.records:
            assert r["completions"][0]["text"] == by_id[r["id"]]["completions"][0]["text"]


def test_resume_from_partial_output(cli, tiny_model, tmp_path):
    many = [{"id": f"q{i}", "prompt": f"Give {i} tips."} for i in range(5)]
    src = write_jsonl(tmp_path / "p.jsonl", many)
    full = _gen(cli, tiny_model, src, "-n", "2")
    assert full.code == 0
    lines = full.out.splitlines(keepends=True)
    partial = tmp_path / "out.jsonl"
    partial.write_text(lines[0] + lines[1] + lines[2][:40])  # killed mid-line
    r = _gen(cli, tiny_model, src, "-n", "2", "--resume-from", partial, out=partial)
    assert r.code == 0, r
    assert "truncated last line" in r.err
    lines_out = partial.read_text().splitlines(keepends=True)
    assert lines_out[:2] == lines[:2]  # the earlier records are copied verbatim
    _same_records([json.loads(x) for x in lines_out], full.records)
    man = json.loads((tmp_path / "out.jsonl.alignkit.json").read_text())
    assert man["counts"]["records_copied"] == 2 and man["counts"]["prompts_sampled"] == 3
    # all done: nothing sampled, output unchanged
    again = _gen(cli, tiny_model, src, "-n", "2", "--resume-from", partial)
    assert again.code == 0 and again.out == partial.read_text()
    # a missing file is a first run
    first = _gen(cli, tiny_model, src, "-n", "2", "--resume-from", tmp_path / "none.jsonl")
    assert first.code == 0 and first.out == full.out


def test_resume_from_broken_middle_line_is_data_error(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:2])
    bad = tmp_path / "old.jsonl"
    bad.write_text('{"id": "a"}\nnot json\n{"id": "c"}\n')
    r = _gen(cli, tiny_model, src, "--resume-from", bad)
    assert r.code == 3 and f"{bad}:2:" in r.err


# --- the command: pairing modes --------------------------------------------------------------

PAIR_PROMPTS = [
    {"id": "a", "prompt": "Write a short answer.", "meta": {"chosen": "yes good", "user": "u1"}},
    {"id": "b", "prompt": [{"role": "user", "content": "hello"}], "chosen": "hello thanks"},
]


def test_pair_with_reference(cli, tiny_model_b, lm_b, tmp_path):
    model_b, tok = lm_b
    src = write_jsonl(tmp_path / "p.jsonl", PAIR_PROMPTS)
    r = cli(["gen-pairs", src, "--pair-with-reference", tiny_model_b, "--max-new-tokens", "6"])
    assert r.code == 0, r
    recs = r.records
    assert [x["id"] for x in recs] == ["a", "b"]
    samples = sample(model_b, tok, [p["prompt"] for p in PAIR_PROMPTS],
                     SampleParams(n=1, max_new_tokens=6), keys=["a", "b"])
    rendered = [render_prompt(tok, p["prompt"]) for p in PAIR_PROMPTS]
    given_lp = completion_logps(model_b, tok, rendered, ["yes good", "hello thanks"])
    sample_lp = completion_logps(model_b, tok, rendered, [s[0]["text"] for s in samples],
                                 add_eos=[s[0]["finished"] for s in samples])
    for rec, s, lp, slp in zip(recs, samples, given_lp, sample_lp):
        validate(rec, "pair")
        assert rec["gen"]["model"] == str(tiny_model_b) and rec["gen"]["pairing"] == "reference"
        assert abs(rec["ref_logp_chosen"] - lp) < 1e-4
        assert abs(rec["ref_logp_rejected"] - slp) < 1e-4  # the text's own tokens
        assert rec.get("finished_rejected", True) == s[0]["finished"]
        assert rec.get("finished_chosen", True) is True
    assert recs[0]["chosen"] == "yes good" and recs[0]["rejected"] == samples[0][0]["text"]
    assert recs[0]["meta"] == {"chosen": "yes good", "user": "u1"}
    # conversational prompt -> conversational sides (TRL)
    assert recs[1]["chosen"] == [{"role": "assistant", "content": "hello thanks"}]
    assert recs[1]["rejected"] == [{"role": "assistant", "content": samples[1][0]["text"]}]


def test_pair_with_reference_n_pairs_ids_and_resume(cli, tiny_model_b, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PAIR_PROMPTS)
    args = ["gen-pairs", src, "--pair-with-reference", tiny_model_b, "-n", "2", "--max-new-tokens", "4"]
    r = cli(args)
    assert r.code == 0, r
    assert [(x["id"], x["prompt_id"]) for x in r.records] == [("a-0", "a"), ("a-1", "a"), ("b-0", "b"), ("b-1", "b")]
    assert r.records[0]["rejected"] != r.records[1]["rejected"]
    # a prompt with only some of its pairs written is sampled again
    part = tmp_path / "part.jsonl"
    part.write_text("".join(line + "\n" for line in r.out.splitlines()[:3]))
    again = cli(args + ["--resume-from", part])
    assert again.code == 0
    assert again.out.splitlines()[:2] == r.out.splitlines()[:2]
    _same_records(again.records, r.records)


def test_pair_with_reference_needs_given_answer(cli, tiny_model_b, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [PAIR_PROMPTS[0], {"id": "z", "prompt": "hi"}])
    r = cli(["gen-pairs", src, "--pair-with-reference", tiny_model_b])
    assert r.code == 3 and f"{src}:2: chosen: missing" in r.err


def test_mixture_mode(cli, tiny_model, tiny_model_b, lm, lm_b, tmp_path):
    from alignkit.models import model_sha256
    src = write_jsonl(tmp_path / "p.jsonl", PAIR_PROMPTS)
    r = _gen(cli, tiny_model, src, "-n", "2", "--mixture", tiny_model_b, "--alpha", "0.3")
    assert r.code == 0, r
    want = sample(lm[0], lm[1], [p["prompt"] for p in PAIR_PROMPTS], SampleParams(n=2, max_new_tokens=6),
                  ref_model=lm_b[0], alpha=0.3, keys=["a", "b"], return_ids=True)
    for rec, group in zip(r.records, want):
        validate(rec, "samples")
        assert rec["gen"]["mixture"] == {"ref": str(tiny_model_b), "ref_sha256": model_sha256(tiny_model_b),
                                         "alpha": 0.3}
        for c, w in zip(rec["completions"], group):
            if not _canonical(lm[1], w):  # re-scored on the text's own tokens
                assert set(c) == {"text", "logp", "n_tokens", "finished", "logp_ref"}
                continue
            assert set(c) == {"text", "logp", "n_tokens", "finished", "logp_ref", "logp_mix"}
            assert abs(c["logp_mix"] - w["logp_mix"]) < 1e-6 and abs(c["logp_ref"] - w["logp_ref"]) < 1e-6
    assert r.records[0]["completions"][0]["text"] == want[0][0]["text"]


CONTRAST = [
    {"id": "a", "prompt": "Context: the sky is blue.\n\nQuestion: what colour is the sky?",
     "meta": {"ctx": "Context: the sky is blue."}},
    {"id": "b", "prompt": [{"role": "user", "content": "Doc: rice needs water. Explain rice."}],
     "meta": {"ctx": ["Doc: rice needs water."], "chosen": "rice needs water"}},
]


def test_remove_context():
    assert remove_context(CONTRAST[0]["prompt"], "Context: the sky is blue.") == \
        "Question: what colour is the sky?"
    assert remove_context(CONTRAST[1]["prompt"], ["Doc: rice needs water."]) == \
        [{"role": "user", "content": "Explain rice."}]
    # only the whitespace at the cut is tidied
    assert remove_context("def f():\n    return  1\nCTX\n\nmore", "CTX") == "def f():\n    return  1\n\nmore"
    assert remove_context("A CTX B", "CTX") == "A B"


def test_contrast_prompt_mode(cli, tiny_model, lm, tmp_path):
    model, tok = lm
    src = write_jsonl(tmp_path / "p.jsonl", CONTRAST)
    r = _gen(cli, tiny_model, src, "--contrast-prompt", "ctx")
    assert r.code == 0, r
    a, b = r.records
    for rec in (a, b):
        validate(rec, "pair")
        assert rec["gen"]["pairing"] == "contrast" and rec["gen"]["contrast_field"] == "ctx"
    p6 = SampleParams(n=1, max_new_tokens=6)
    full = [encode_prompt(tok, render_prompt(tok, c["prompt"])) for c in CONTRAST]
    reduced = [remove_context(c["prompt"], c["meta"]["ctx"]) for c in CONTRAST]
    neg = sample(model, tok, reduced, p6, keys=["a\x00contrast", "b\x00contrast"], return_ids=True)
    pos = sample(model, tok, [CONTRAST[0]["prompt"]], p6, keys=["a"])[0][0]
    # record a: both sides sampled; chosen with the full prompt, rejected without the context
    assert a["prompt"] == CONTRAST[0]["prompt"]
    rendered_a = render_prompt(tok, CONTRAST[0]["prompt"])
    own = completion_logps(model, tok, [rendered_a] * 2, [pos["text"], neg[0][0]["text"]],
                           add_eos=[pos["finished"], neg[0][0]["finished"]])
    assert a["chosen"] == pos["text"] and abs(a["ref_logp_chosen"] - own[0]) < 1e-4
    assert a["rejected"] == neg[0][0]["text"]
    # the negative is scored under the FULL prompt, not the one it was sampled with
    assert abs(a["ref_logp_rejected"] - own[1]) < 1e-4
    assert abs(a["ref_logp_rejected"] - neg[0][0]["logp"]) > 1e-3
    if _canonical(tok, neg[0][0]):
        assert abs(a["ref_logp_rejected"] - _teacher_forced(model, full[0], neg[0][0]["token_ids"])) < 1e-4
    # record b: the given answer is chosen
    assert b["chosen"] == [{"role": "assistant", "content": "rice needs water"}]
    assert b["rejected"] == [{"role": "assistant", "content": neg[1][0]["text"]}]
    want = completion_logps(model, tok, [render_prompt(tok, CONTRAST[1]["prompt"])], ["rice needs water"])[0]
    assert abs(b["ref_logp_chosen"] - want) < 1e-4
    want = completion_logps(model, tok, [render_prompt(tok, CONTRAST[1]["prompt"])],
                            [neg[1][0]["text"]], add_eos=neg[1][0]["finished"])[0]
    assert abs(b["ref_logp_rejected"] - want) < 1e-4


@pytest.mark.parametrize("meta, problem", [
    ({}, "meta.ctx: missing"),
    ({"ctx": "not in the prompt"}, "meta.ctx: context not found"),
    ({"ctx": 5}, "meta.ctx: expected a non-empty string"),
])
def test_contrast_prompt_bad_context(cli, tiny_model, tmp_path, meta, problem):
    src = write_jsonl(tmp_path / "p.jsonl", [CONTRAST[0], {"id": "z", "prompt": "hi", "meta": meta}])
    r = _gen(cli, tiny_model, src, "--contrast-prompt", "ctx")
    assert r.code == 3 and f"{src}:2: {problem}" in r.err, r


# --- errors ------------------------------------------------------------------------------------

def test_missing_prompt_field_is_data_error(cli, tiny_model, tmp_path):
    src = tmp_path / "p.jsonl"
    src.write_text('{"id": "a", "prompt": "x"}\n{"id": "b", "text": "no prompt"}\n')
    r = _gen(cli, tiny_model, src)
    assert r.code == 3 and f"{src}:2: prompt: missing required field" in r.err
    src.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    assert _gen(cli, tiny_model, src).code == 3
    src.write_text('{"id": "a", "prompt": 7}\n')
    r = _gen(cli, tiny_model, src)
    assert r.code == 3 and f"{src}:1: prompt:" in r.err


@pytest.mark.parametrize("flags", [
    ["-n", "0"], ["--temperature", "-1"], ["--top-p", "0"], ["--top-p", "1.5"], ["--top-k", "-1"],
    ["--max-new-tokens", "0"], ["--batch-size", "0"], ["--dtype", "float8"], ["--engine", "tgi"],
    ["--mixture", "X", "--contrast-prompt", "ctx"], ["--alpha", "0.5"],
    ["--mixture", "X", "--alpha", "1.5"], ["--system", "S", "--raw"], ["--shard", "3/2"],
    ["--pair-with-reference", "X"], ["--num-samples", "two"],
])
def test_bad_flags_exit_2(cli, tiny_model, tmp_path, flags):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = _gen(cli, tiny_model, src, *flags)
    assert r.code == 2, (flags, r)


def test_model_required_and_unknown_model(cli, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = cli(["gen-pairs", src])
    assert r.code == 2 and "--model is required" in r.err
    assert cli(["gen-pairs", src, "--model", tmp_path / "nope"]).code == 2


@pytest.mark.skipif(vllm_available(), reason="vllm is installed here")
def test_vllm_missing_is_clear_usage_error(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    r = _gen(cli, tiny_model, src, "--engine", "vllm")
    assert r.code == 2 and "vLLM, which is not installed" in r.err and "alignkit[vllm]" in r.err
    r = _gen(cli, tiny_model, src, "--engine", "vllm", "--contrast-prompt", "ctx")
    assert r.code == 2
    r = _gen(cli, tiny_model, src, "--engine", "ray-vllm", "--replicas", "2")
    assert r.code == 2 and "--engine ray-vllm needs vLLM" in r.err
    out = tmp_path / "e.jsonl"
    r = cli(["eval", src, "--model", tiny_model, "--engine", "ray-vllm", "--samples-out", out])
    assert r.code == 2 and "--engine ray-vllm needs vLLM" in r.err and not out.exists()


def test_replicas_need_ray_vllm(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    for cmd in (["gen-pairs", src, "--model", tiny_model], ["eval", src, "--model", tiny_model]):
        r = cli([*cmd, "--replicas", "2"])
        assert r.code == 2 and "--replicas needs --engine ray-vllm" in r.err, r.err
        r = cli([*cmd, "--engine", "ray-vllm", "--replicas", "0"])
        assert r.code == 2 and "--replicas" in r.err, r.err


def test_options_defaults():
    o = GenPairsOptions(model="m", mixture="r").check()
    assert o.alpha == 0.5 and o.mode == "mixture" and o.sampler_spec == "m"
    assert GenPairsOptions(pair_with_reference="r").check().sampler_spec == "r"


# --- real model ----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smollm2_samples_stop_and_score(cli, smollm2, tmp_path):
    """Real chat model: completions end at <|im_end|> (excluded from the text), and each
    logp matches teacher forcing of the decoded text where it re-encodes to the same tokens."""
    from alignkit.models import load_causal_lm
    src = write_jsonl(tmp_path / "p.jsonl", [
        {"id": "fr", "prompt": "What is the capital of France? Answer in one word."},
        {"id": "hi", "prompt": [{"role": "user", "content": "Say hello."}]}])
    r = cli(["gen-pairs", src, "--model", smollm2, "-n", "4", "--max-new-tokens", "24",
             "--temperature", "0.7", "--top-p", "0.9"])
    assert r.code == 0, r
    model, tok = load_causal_lm(smollm2, "float32")
    finished = 0
    for rec in r.records:
        validate(rec, "samples")
        rendered = render_prompt(tok, rec["prompt"])
        for c in rec["completions"]:
            text = c["text"] if isinstance(c["text"], str) else c["text"][0]["content"]
            assert text.strip() and "<|im_end|>" not in text and "<|im_start|>" not in text
            finished += c["finished"]
            _, ids = encode_pair(tok, rendered, text, add_eos=c["finished"])
            if len(ids) == c["n_tokens"]:  # the text re-encodes to the sampled tokens
                want = completion_logps(model, tok, [rendered], [text], add_eos=c["finished"])[0]
                assert abs(c["logp"] - want) < 1e-3
    assert finished >= 4
    assert "Paris" in " ".join(c["text"] for c in r.records[0]["completions"])


def test_killed_at_random_points_then_resumed_gives_the_uninterrupted_records(tiny_model, tmp_path):
    """SIGKILL gen-pairs (stdout redirected to a file, as under cron) at several random
    moments, then rerun it with --resume-from that file: the result is exactly the
    uninterrupted run's records, whatever the kill point."""
    import random
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path
    # 130 prompts: gen-pairs writes chunks of 64, so a kill can land between chunks
    src = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Give {i} tips."}
                                             for i in range(130)])
    exe = str(Path(sys.executable).parent / "alignkit")
    args = [exe, "gen-pairs", "--model", str(tiny_model), "-n", "2", "--max-new-tokens", "12",
            "--batch-size", "4", "--seed", "3", str(src)]
    full = tmp_path / "full.jsonl"
    started = time.monotonic()
    with open(full, "w") as f:
        subprocess.run(args, stdout=f, stderr=subprocess.DEVNULL, check=True, timeout=300)
    duration = time.monotonic() - started
    want = [json.loads(x) for x in full.read_text().splitlines()]
    rng = random.Random(0)
    kinds = set()
    for trial in range(3):
        out = tmp_path / f"out{trial}.jsonl"
        with open(out, "w") as f:
            p = subprocess.Popen(args, stdout=f, stderr=subprocess.DEVNULL)
            time.sleep(rng.uniform(0.5, 0.97) * duration)
            p.send_signal(signal.SIGKILL)
            p.wait()
        n_lines = len(out.read_text().splitlines())
        kinds.add("empty" if n_lines == 0 else "partial" if n_lines < len(want) else "done")
        again = tmp_path / f"again{trial}.jsonl"
        with open(again, "w") as f:
            subprocess.run([*args, "--resume-from", str(out)], stdout=f,
                           stderr=subprocess.DEVNULL, check=True, timeout=300)
        got = [json.loads(x) for x in again.read_text().splitlines()]
        _same_records(got, [dict(w) for w in want])
    assert kinds != {"empty"}, kinds  # at least one kill landed mid-file


def test_max_new_tokens_beyond_the_models_context_is_a_usage_error(cli, tmp_path, tiny_model, lm):
    """A cache of 10^9 positions is not allocated (it crashed with exit 1): the sampler
    refuses more new tokens than the model's max_position_embeddings, before any work."""
    from alignkit.errors import UsageError
    context = lm[0].config.max_position_embeddings
    with pytest.raises(UsageError, match=f"context of {context} tokens"):
        sample(lm[0], lm[1], ["hi"], SampleParams(n=1, max_new_tokens=context + 1))
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS[:1])
    out = tmp_path / "s.jsonl"
    r = cli(["gen-pairs", "--model", tiny_model, "--max-new-tokens", "1000000000", src, "-o", out])
    assert r.code == 2 and "exceeds the model's context" in r.err and not out.exists()
