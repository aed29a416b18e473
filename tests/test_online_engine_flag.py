"""`train-policy --engine` / `--sync-every` in the main venv (no vLLM here; the runs on
vLLM are tests/engines/test_online_vllm.py): the flags and their refusals, and
`policy.weight_sync.full_weights`, the policy's full weights under the base model's
names that the vLLM engine is given."""
from __future__ import annotations

import importlib.util
import json

import pytest
import torch

from conftest import write_jsonl

PROMPTS = [{"id": f"q{i}", "prompt": p} for i, p in
           enumerate(["Write about the ocean", "Tell me a joke", "Say hello", "Name a color"])]


def _train(cli, tiny_model, tmp_path, *flags):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    return cli(["train-policy", "--method", "grpo", "--model", tiny_model, src, "--reward",
                "length", "-o", tmp_path / "m", "--max-steps", 1, "--batch-size", 4,
                "--max-new-tokens", 4, *flags])


def test_help_lists_the_engine_flags(cli):
    r = cli(["train-policy", "--help"])
    assert r.code == 0
    text = " ".join(r.out.split())
    assert "--engine" in text and "--sync-every" in text


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vllm is installed")
def test_engine_vllm_without_vllm_exits_2_with_the_install_hint(cli, tiny_model, tmp_path):
    r = _train(cli, tiny_model, tmp_path, "--engine", "vllm")
    assert r.code == 2, r
    assert "needs vLLM, which is not installed" in r.err and "--engine hf" in r.err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()


@pytest.mark.parametrize("flags,needle", [
    (["--sync-every", "2"], "--sync-every needs --engine vllm"),
    (["--engine", "vllm", "--sync-every", "0"], "--sync-every must be >= 1"),
    (["--engine", "sglang"], "--engine must be one of"),
])
def test_engine_flag_usage_errors_exit_2(cli, tiny_model, tmp_path, flags, needle):
    r = _train(cli, tiny_model, tmp_path, *flags)
    assert r.code == 2, r
    assert needle in r.err
    assert not (tmp_path / "m.partial").exists()


def test_ipo_md_refuses_engine_vllm(cli, tiny_model, tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    r = cli(["train-policy", "--method", "ipo-md", "--model", tiny_model, src, "--reward",
             "length", "-o", tmp_path / "m", "--engine", "vllm"])
    assert r.code == 2, r
    assert "geometric mixture" in r.err and "--engine hf" in r.err


# --- weight_sync ---------------------------------------------------------------------------------

def _lora(tiny_model, dtype=torch.float32):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=dtype)
    torch.manual_seed(0)  # the same lora_A every call
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    with torch.no_grad():  # a trained-looking adapter: B != 0
        g = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_full_weights_of_a_lora_model_are_the_merged_model_and_leave_it_untouched(tiny_model, dtype):
    from alignkit.policy.weight_sync import full_weights
    model = _lora(tiny_model, dtype)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with full_weights(model) as it:
        got = {n: t.clone() for n, t in it}
    for n, p in model.named_parameters():  # bit for bit: no merge/unmerge round-off
        assert torch.equal(p, before[n]), n
    merged = _lora(tiny_model, dtype).merge_and_unload()
    want = dict(merged.named_parameters())
    assert set(got) == set(want)  # the base model's names, no lora_ tensors
    for n, t in got.items():
        assert t.dtype == want[n].dtype
        assert torch.allclose(t.float(), want[n].float(), atol=1e-6 if dtype == torch.float32 else 1e-2), n
    assert any(not torch.equal(got[n], before["base_model.model." + n.replace(".weight", ".base_layer.weight")])
               for n in got if "proj" in n)  # the adapter is in the weights


def test_full_weights_of_a_full_model_are_its_parameters(tiny_model):
    from transformers import AutoModelForCausalLM

    from alignkit.policy.weight_sync import full_weights
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    with full_weights(model) as it:
        got = dict(it)
    want = dict(model.named_parameters())
    assert set(got) == set(want) and all(got[n] is not None and torch.equal(got[n], want[n]) for n in got)
    from safetensors import safe_open
    with safe_open(str(tiny_model / "model.safetensors"), "pt") as f:
        assert set(got) <= set(f.keys())  # named as in the folder


def test_full_weights_of_a_dora_model_go_through_merge_and_unmerge(tiny_model):
    """A LoRA variant (DoRA) has no W + dW merge: TRL's merge / read / unmerge."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.policy.weight_sync import full_weights
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj"], use_dora=True))
    with full_weights(model) as it:
        got = dict((n, t.clone()) for n, t in it)
    assert not any(layer.merged for layer in model.modules() if hasattr(layer, "merged_adapters"))
    merged = dict(model.merge_and_unload().named_parameters())
    assert set(got) == set(merged)
    assert all(torch.allclose(got[n], merged[n], atol=1e-6) for n in got)


def test_samples_gen_records_the_hf_engine_unchanged(cli, tiny_model, tmp_path):
    """--engine hf (the default): the manifest records the engine, samples say nothing new."""
    r = _train(cli, tiny_model, tmp_path, "--sample-every", "1")
    assert r.code == 0, r
    man = json.loads((tmp_path / "m" / "alignkit.json").read_text())
    assert man["hyperparameters"]["engine"] == "hf"
    rec = json.loads((tmp_path / "m" / "samples.jsonl").read_text().splitlines()[0])
    assert "engine" not in rec["gen"]
