"""Model folders: tiny models, the one loader's rules (safetensors only, adapters,
embedded names), and the real SmolLM2 materialisation (slow)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from alignkit.errors import UsageError


def _tensors(folder: Path):
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def test_tiny_seeds_differ_tokenizer_same(tiny_model, tiny_model_b):
    a, b = _tensors(tiny_model), _tensors(tiny_model_b)
    assert a.keys() == b.keys()
    assert any(not (a[k] == b[k]).all() for k in a)
    ta = json.loads((tiny_model / "tokenizer.json").read_text())
    tb = json.loads((tiny_model_b / "tokenizer.json").read_text())
    assert ta["model"]["vocab"] == tb["model"]["vocab"]


def test_tiny_is_deterministic(tmp_path, tiny_model, cli):
    out = tmp_path / "again"
    r = cli(["models", "tiny", "--out", out, "--seed", "0"])
    assert r.code == 0, r
    a, b = _tensors(tiny_model), _tensors(out)
    assert all((a[k] == b[k]).all() for k in a)
    assert cli(["models", "tiny", "--out", out]).code == 2  # exists, no --force


def test_tiny_loads_in_plain_transformers_with_chat_template(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert model.config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")


def test_loader_refuses_pickle_and_resolves_errors(tmp_path, tiny_model):
    from alignkit.models import load_causal_lm, resolve
    pk = tmp_path / "pickled"
    shutil.copytree(tiny_model, pk)
    (pk / "model.safetensors").unlink()
    (pk / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(UsageError, match="--allow-pickle"):
        load_causal_lm(pk)
    with pytest.raises(UsageError, match="not an embedded model"):
        resolve(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match="not a model folder"):
        resolve(empty)


def test_loader_reads_peft_adapter(tmp_path, tiny_model):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_causal_lm
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    peft = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    adapter = tmp_path / "adapter"
    peft.save_pretrained(adapter)
    model, tok = load_causal_lm(adapter, "float32")
    ids = torch.tensor([[1, 5, 7, 9]])
    with torch.no_grad():
        want = peft(input_ids=ids).logits
        got = model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert tok.eos_token == "<|im_end|>"
    # merged (for sampling): a plain model with the adapter folded in, the same logits
    merged, _ = load_causal_lm(adapter, "float32", merged=True)
    assert not hasattr(merged, "peft_config")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        assert torch.allclose(merged(input_ids=ids).logits, want, atol=1e-5)


def test_models_list_and_pull_tiny(cli, alignkit_home):
    r = cli(["models", "list"])
    assert r.code == 0 and "smollm2-135m-instruct" in r.out and "minilm-l6" in r.out
    r = cli(["models", "pull", "tiny-llama"])
    assert r.code == 0 and Path(r.out.strip()) == alignkit_home / "models" / "tiny-llama"
    assert "tiny-llama               materialised" in cli(["models", "list"]).out
    assert cli(["models", "pull", "no-such-model"]).code == 2


def test_minilm_materialises_from_its_package(tmp_path):
    from alignkit.models import pull
    out = pull("minilm-l6", tmp_path / "minilm")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == "bert" and (out / "model.safetensors").exists()


@pytest.mark.slow
def test_smollm2_pull_loads_in_plain_transformers_and_speaks_english(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models import pull
    path = pull("smollm2-135m-instruct", tmp_path / "smol")
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text
