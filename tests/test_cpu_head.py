"""alignkit's CPU LM head (policy/cpu_head.py) against TRL's fused head: the same
per-token values and the same gradients, chunked or not, and the trainer uses it."""
import pytest
import torch

from alignkit.policy import cpu_head


@pytest.fixture()
def patched(tiny_model):
    from trl.trainer.utils import add_fused_lm_head
    from alignkit.models import load_causal_lm
    model, _ = load_causal_lm(tiny_model, "float32")
    add_fused_lm_head(model, outputs=("log_probs",) + cpu_head.STATS)
    return model


def _batch(vocab: int):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (3, 14), generator=g)
    attn = torch.ones_like(ids)
    attn[1, 10:] = 0  # right padding
    attn[2, 7:] = 0
    labels = ids.masked_fill(attn == 0, -100)
    labels[:, :5] = -100  # the prompt
    return ids, attn, labels


@pytest.mark.parametrize("chunk", [4, 128])
def test_values_and_gradients_match_trl(patched, monkeypatch, chunk):
    monkeypatch.setattr(cpu_head, "CHUNK_ROWS", chunk)
    model = patched
    assert cpu_head.supported(model)
    ids, attn, labels = _batch(model.config.vocab_size)
    weights = torch.randn(3, 13, generator=torch.Generator().manual_seed(1))

    def run(fn):
        model.zero_grad()
        out = fn()
        (out.log_probs * weights).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    trl_out, trl_grads = run(lambda: model(input_ids=ids, attention_mask=attn, labels=labels,
                                           fused_lm_head=True))
    ours, our_grads = run(lambda: cpu_head.fused_forward(model, ids, attn, labels))
    mask = labels[:, 1:] != -100
    assert torch.equal(ours.label_mask, mask)
    for name in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits"):
        a, b = getattr(ours, name), getattr(trl_out, name)
        assert torch.allclose(a[mask], b[mask], atol=1e-5), name
        assert (a[~mask] == 0).all(), name
    assert torch.equal(ours.is_top1[mask], trl_out.is_top1[mask])
    assert ours.loss.item() == pytest.approx(trl_out.loss.item(), abs=1e-5)
    assert our_grads.keys() == trl_grads.keys() and len(our_grads) > 3
    for n in our_grads:  # the head (tied embedding) and the backbone alike
        assert torch.allclose(our_grads[n], trl_grads[n], atol=1e-5), n


def test_bf16_autocast_close_to_fp32(patched):
    ids, attn, labels = _batch(patched.config.vocab_size)
    with torch.no_grad():
        ref = cpu_head.fused_forward(patched, ids, attn, labels).log_probs
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = cpu_head.fused_forward(patched, ids, attn, labels).log_probs
    assert low.dtype == torch.float32
    assert torch.allclose(low, ref, atol=0.1)


def test_unsupported_heads_fall_back(patched):
    patched.config.final_logit_softcapping = 30.0
    assert not cpu_head.supported(patched)


def test_trainer_uses_it_and_trains_the_same(cli, tiny_model, tmp_path, monkeypatch):
    """A DPO run with alignkit's head and one with TRL's (ALIGNKIT_CPU_HEAD=0) give the
    same losses step by step (fp32)."""
    import json

    from conftest import write_jsonl
    from test_train_policy import FAST, pair_records
    calls = {"n": 0}
    real = cpu_head.fused_forward

    def counting(*a, **kw):
        calls["n"] += 1
        return real(*a, **kw)

    monkeypatch.setattr(cpu_head, "fused_forward", counting)
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_records(8, prefix="h"))
    losses = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("ALIGNKIT_CPU_HEAD", flag)
        out = tmp_path / f"m{flag}"
        r = cli(["train-policy", "--method", "dpo", "--model", tiny_model, data, "-o", out, *FAST,
                 "--no-ref-cache", "--dtype", "float32", "--lora-r", "4"])
        assert r.code == 0, r.err
        rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        losses[flag] = [x["loss"] for x in rows if "loss" in x]
        assert len(losses[flag]) == 2
        if flag == "1":
            assert calls["n"] > 0
            seen = calls["n"]
    assert calls["n"] == seen  # ALIGNKIT_CPU_HEAD=0: TRL's head only
    assert losses["1"] == pytest.approx(losses["0"], abs=1e-5)
