"""Output folders as artifacts: LoRA adapters that plain peft loads from any directory
(the base recorded as an absolute plain folder, embedded names materialised), alignkit's
loader finding a moved base by its sha256, the model card (README.md) and
`--report-to tensorboard` event files. One tiny run per command, 2 steps each."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from alignkit.reward_models.synthetic import marker_pairs
from conftest import write_jsonl

PROMPTS = ["Write a short answer.", "Explain why the sky is blue.",
           "Give three tips for cooking rice.", "Hello thanks please",
           "Use bullet points and a title.", "Answer in at most fifty words.",
           "Tell me about music and art.", "What is math?"]
STEPS = ["--max-steps", "2", "--batch-size", "4", "--max-length", "64"]
IDS = torch.tensor([[1, 5, 7, 9, 11, 13]])


def run(args) -> int:
    """The CLI in-process (module-scoped fixtures cannot use the `cli` fixture), with
    sys.argv as a shell would set it (alignkit.json records the command from it)."""
    import sys

    from alignkit import cli as cli_mod
    args = [str(a) for a in args]
    old, sys.argv = sys.argv, ["alignkit", *args]
    try:
        return cli_mod.main(args)
    finally:
        sys.argv = old


def info(folder) -> dict:
    return json.loads((Path(folder) / "alignkit.json").read_text())


def adapter_cfg(folder) -> dict:
    return json.loads((Path(folder) / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def outputs(tmp_path_factory, tiny_model, tiny_model_b):
    """Each training command once, run from a folder of its own with the base given as a
    relative path (bt also with the bare embedded name)."""
    root = tmp_path_factory.mktemp("artifacts")
    pairs = write_jsonl(root / "pairs.jsonl", [
        {"prompt": p, "chosen": "good answer yes thanks", "rejected": "bad no"} for p in PROMPTS])
    rm_pairs = write_jsonl(root / "rm.jsonl", marker_pairs(16, seed=5))
    train_dir = root / "train"
    train_dir.mkdir()
    rel = os.path.relpath(tiny_model, train_dir)
    assert not Path(rel).is_absolute()
    runs = {
        "policy": ["train-policy", "--method", "dpo", "--model", rel, pairs, "--lora-r", "4",
                   "--lr", "1e-2", "--report-to", "tensorboard", *STEPS],
        "rm": ["train-rm", "--method", "bt", "--model", rel, rm_pairs, "--lora-r", "4",
               "--lr", "1e-2", *STEPS],
        "rm_embedded": ["train-rm", "--method", "bt", "--model", "tiny-llama", rm_pairs,
                        "--lora-r", "4", "--lr", "1e-2", *STEPS],
        "distill": ["distill", "--method", "aligndistil", "--teacher", tiny_model,
                    "--teacher-ref", tiny_model_b, "--student", rel, pairs, "--lora-r", "4",
                    "--lr", "1e-2", "--eval-split", "0.25", *STEPS],
        "full": ["train-policy", "--method", "dpo", "--model", rel, pairs, "--lr", "1e-4",
                 *STEPS],
    }
    old = os.getcwd()
    os.chdir(train_dir)
    try:
        for name, args in runs.items():
            assert run([*args, "-o", name]) == 0, name
    finally:
        os.chdir(old)
    return {name: train_dir / name for name in runs} | {"root": root, "rel": rel}


@pytest.fixture
def elsewhere(tmp_path, monkeypatch):
    """Load from a working directory that is neither the training one nor the base's."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


# --- 1. adapters load in plain peft from anywhere -------------------------------------------

@pytest.mark.parametrize("name", ["policy", "distill"])
def test_causal_adapter_loads_in_plain_peft_from_another_dir(outputs, name, tiny_model,
                                                             elsewhere):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    from alignkit.models import load_causal_lm, model_sha256
    out = outputs[name]
    base = adapter_cfg(out)["base_model_name_or_path"]
    assert Path(base).is_absolute() and Path(base) == tiny_model.resolve()
    assert info(out)["base"]["path"] == base
    assert info(out)["base"]["sha256"] == model_sha256(tiny_model)
    plain = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    ours, _ = load_causal_lm(out, "float32")
    want = _logits(ours)
    assert torch.allclose(_logits(plain), want, atol=1e-5)
    bare = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    assert not torch.allclose(_logits(bare), want, atol=1e-4)  # the adapter is applied


def test_policy_base_keeps_the_spec_as_typed(outputs):
    assert info(outputs["policy"])["base"]["spec"] == outputs["rel"]


@pytest.mark.parametrize("name", ["rm", "rm_embedded"])
def test_rm_adapter_loads_in_plain_peft_from_another_dir(outputs, name, alignkit_home,
                                                         tiny_model, elsewhere):
    from peft import AutoPeftModelForSequenceClassification
    from transformers import AutoTokenizer

    from alignkit.models import load_seq_cls
    out = outputs[name]
    base = Path(adapter_cfg(out)["base_model_name_or_path"])
    assert base.is_absolute() and (base / "config.json").exists()
    if name == "rm_embedded":  # the bare name, materialised in the model cache
        assert base == (alignkit_home / "models" / "tiny-llama").resolve()
        assert info(out)["base"]["spec"] == "tiny-llama"
    else:
        assert base == tiny_model.resolve()
    plain = AutoPeftModelForSequenceClassification.from_pretrained(str(out), num_labels=1).eval()
    ours, _ = load_seq_cls(out, "float32")
    tok = AutoTokenizer.from_pretrained(out)
    batch = tok(["Tell me about art. Use bullet points, good."], return_tensors="pt")
    with torch.no_grad():
        got = plain(**batch).logits
        want = ours(**batch).logits
    assert got.shape == (1, 1) and torch.allclose(got, want, atol=1e-5)


# --- alignkit's loader finds a moved base ---------------------------------------------------

def _stale_copy(adapter: Path, dest: Path, gone: Path) -> Path:
    """A copy of an adapter folder whose recorded base (config and manifest) is `gone`."""
    shutil.copytree(adapter, dest)
    cfg = adapter_cfg(dest)
    cfg["base_model_name_or_path"] = str(gone)
    (dest / "adapter_config.json").write_text(json.dumps(cfg))
    man = info(dest)
    man["base"]["path"] = str(gone)
    (dest / "alignkit.json").write_text(json.dumps(man))
    return dest


def test_loader_finds_a_moved_base_by_sha256(outputs, tmp_path, monkeypatch, tiny_model):
    from alignkit.errors import UsageError
    from alignkit.models import load_causal_lm
    want = _logits(load_causal_lm(outputs["policy"], "float32")[0])
    gone = tmp_path / "gone" / "base"
    ad = _stale_copy(outputs["policy"], tmp_path / "ad", gone)
    man = info(ad)
    man["base"]["spec"] = str(gone)
    (ad / "alignkit.json").write_text(json.dumps(man))
    # A fresh model cache (the session's holds tiny-llama, the same weights).
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNKIT_HOME", str(home))
    with pytest.raises(UsageError, match=r"base model .*gone: no folder with its sha256"):
        load_causal_lm(ad, "float32")
    shutil.copytree(tiny_model, home / "models" / "mine" / "moved-base")
    model, tok = load_causal_lm(ad, "float32")
    assert torch.allclose(_logits(model), want, atol=1e-6)
    assert tok.eos_token == "<|im_end|>"


def test_loader_rebuilds_a_moved_embedded_base(outputs, tmp_path, monkeypatch):
    from alignkit.models import load_seq_cls
    want = load_seq_cls(outputs["rm_embedded"], "float32")[0](input_ids=IDS).logits
    ad = _stale_copy(outputs["rm_embedded"], tmp_path / "ad", tmp_path / "old-home" / "x")
    monkeypatch.setenv("ALIGNKIT_HOME", str(tmp_path / "new-home"))  # another cache
    model, _ = load_seq_cls(ad, "float32")
    assert (tmp_path / "new-home" / "models" / "tiny-llama" / "config.json").exists()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=IDS).logits, want, atol=1e-6)


def test_lora_on_an_adapter_records_its_merged_base(outputs, tmp_path, elsewhere):
    """A new adapter trained on an adapter sits on their merge: that merge is written
    once into the model cache and is the recorded base."""
    from peft import AutoPeftModelForCausalLM

    from alignkit.models import load_causal_lm, models_dir
    out = tmp_path / "second"
    pairs = outputs["root"] / "pairs.jsonl"
    assert run(["train-policy", "--method", "dpo", "--model", outputs["policy"], pairs,
                "-o", out, "--lora-r", "4", "--lr", "1e-2", *STEPS]) == 0
    base = Path(adapter_cfg(out)["base_model_name_or_path"])
    assert base.parent == (models_dir() / "merged").resolve()
    assert info(out)["base"]["spec"] == str(outputs["policy"])
    first = _logits(load_causal_lm(outputs["policy"], "float32")[0])
    from transformers import AutoModelForCausalLM
    assert torch.allclose(_logits(AutoModelForCausalLM.from_pretrained(base)), first, atol=1e-5)
    plain = AutoPeftModelForCausalLM.from_pretrained(str(out)).eval()
    assert torch.allclose(_logits(plain), _logits(load_causal_lm(out, "float32")[0]), atol=1e-5)


# --- 2. the model card ----------------------------------------------------------------------

@pytest.mark.parametrize("name,method", [("policy", "dpo"), ("rm", "bt"),
                                         ("distill", "aligndistil"), ("full", "dpo")])
def test_model_card(outputs, name, method):
    out = outputs[name]
    card = (out / "README.md").read_text()
    man = info(out)
    assert "More Information Needed" not in card
    assert f"`{method}`" in card and man["command"] in card
    assert man["command"].startswith(f"alignkit {man['command'].split()[1]} --method {method}")
    assert man["base"]["path"] in card and man["base"]["sha256"] in card
    assert "## Hyperparameters" in card and "## Final metrics" in card
    assert "| lr | 0.01 |" in card or "| lr | 0.0001 |" in card
    for sha in man["inputs"].values():
        if isinstance(sha, str):
            assert sha in card or name == "distill"
    adapter = (out / "adapter_config.json").exists()
    assert adapter == (name != "full")
    loader = ("AutoPeftModelForSequenceClassification" if name == "rm" else
              "AutoPeftModelForCausalLM" if adapter else "AutoModelForCausalLM")
    assert f"{loader}.from_pretrained({str(out.resolve())!r}" in card


def test_full_weight_folder_records_its_base(outputs, tiny_model):
    from alignkit.models import model_sha256
    base = info(outputs["full"])["base"]
    assert base == {"spec": outputs["rel"], "path": str(tiny_model.resolve()),
                    "sha256": model_sha256(tiny_model)}


# --- 3. experiment tracking -----------------------------------------------------------------

def test_report_to_tensorboard_writes_the_training_loss(outputs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = list((outputs["policy"] / "runs").rglob("events.out.tfevents.*"))
    assert events, "no event file in OUT/runs/"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "train/loss" in tags, tags
    losses = acc.Scalars("train/loss")
    rows = [json.loads(l) for l in (outputs["policy"] / "metrics.jsonl").read_text().splitlines()]
    logged = [r["loss"] for r in rows if "loss" in r]
    assert [e.step for e in losses] == [1, 2]
    assert [e.value for e in losses] == pytest.approx(logged, rel=1e-5)
    assert not (outputs["rm"] / "runs").exists()  # default: none


def test_report_to_is_validated(cli, tiny_model, outputs, tmp_path, monkeypatch):
    from alignkit import training
    pairs = outputs["root"] / "pairs.jsonl"
    args = ["train-policy", "--method", "dpo", "--model", tiny_model, pairs, *STEPS]
    r = cli([*args, "-o", tmp_path / "a", "--report-to", "mlflow"])
    assert r.code == 2 and "--report-to" in r.err
    monkeypatch.setitem(training.TRACKERS, "wandb", (("no_such_module_here",), "wandb"))
    r = cli([*args, "-o", tmp_path / "b", "--report-to", "wandb"])
    assert r.code == 1 and "pip install wandb" in r.err
    assert not (tmp_path / "b").exists() and not (tmp_path / "b.partial").exists()


@pytest.mark.parametrize("command", ["train-policy", "train-rm", "distill"])
def test_every_trainer_has_report_to(cli, command):
    r = cli([command, "--help"])
    assert r.code == 0 and "--report-to" in r.out and "tensorboard" in r.out
