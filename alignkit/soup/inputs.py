"""The models to merge (full folders or LoRA adapters over their base) and the checks
that they can be merged: tensor names and shapes, architecture, vocabulary, ties."""
from __future__ import annotations

import json
import math
import re
from itertools import zip_longest
from pathlib import Path
from typing import Any

from ..errors import DataError, UsageError
from .tensors import TensorFiles, TensorInfo, weight_files

# --- inputs: full models and LoRA adapters -----------------------------------------------


class LoraAdapter:
    """A PEFT LoRA adapter, applied to its base tensor by tensor (W + s·B·A)."""

    _KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                      r"(?:\.weight)?$")

    def __init__(self, folder: Path):
        cfg_path = folder / "adapter_config.json"
        try:
            cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e}", str(cfg_path)) from None
        kind = str(cfg.get("peft_type", "LORA")).upper()
        if kind != "LORA" or cfg.get("use_dora"):
            raise UsageError(f"{folder}: only LoRA adapters can be merged (this is "
                             f"{'DoRA' if cfg.get('use_dora') else kind})")
        st = folder / "adapter_model.safetensors"
        if not st.exists():
            raise UsageError(f"{folder}: no adapter_model.safetensors (pickle adapters are not read)")
        files = TensorFiles([st])
        raw = {k: files.read(k) for k in files.entries}
        files.close()
        self.alpha, self.rslora = float(cfg.get("lora_alpha", 8)), bool(cfg.get("use_rslora"))
        self.alpha_pattern = cfg.get("alpha_pattern") or {}
        self.fan_in_fan_out = bool(cfg.get("fan_in_fan_out"))
        parts: dict[str, dict[str, Any]] = {}
        self.replace: dict[str, Any] = {}
        for key, t in raw.items():
            m = self._KEY.match(key)
            if m:
                parts.setdefault(m.group(1), {})[m.group(2)] = t
            else:
                self.replace[re.sub(r"^base_model\.model\.", "", key).replace(".base_layer.", ".")] = t
        self.pairs: dict[str, tuple] = {}
        for module, d in parts.items():
            emb = "lora_embedding_A" in d
            a, b = (d.get("lora_embedding_A"), d.get("lora_embedding_B")) if emb else (d.get("lora_A"), d.get("lora_B"))
            if a is None or b is None or a.dim() != 2 or b.dim() != 2:
                raise DataError(f"{module}: LoRA A/B missing or not 2-D", str(st))
            self.pairs[f"{module}.weight"] = (module, a, b, emb)

    def touched(self) -> set[str]:
        return set(self.pairs) | set(self.replace)

    def _scale(self, module: str, r: int) -> float:
        alpha = self.alpha
        for pat, val in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pat})$", module):
                alpha = float(val)
                break
        return alpha / (math.sqrt(r) if self.rslora else r)

    def apply(self, name: str, w):
        """The adapted float32 tensor for `name` (w is modified in place)."""
        if name in self.replace:
            return self.replace[name].float().clone()
        if name not in self.pairs:
            return w
        module, a, b, emb = self.pairs[name]
        delta = b.float() @ a.float()
        if emb or self.fan_in_fan_out:
            delta = delta.T
        if tuple(delta.shape) != tuple(w.shape):
            raise UsageError(f"adapter tensor {name}: delta shape {list(delta.shape)} does not "
                             f"match the base's {list(w.shape)}")
        return w.add_(delta, alpha=self._scale(module, a.shape[0]))


_HEAD = "lm_head.weight"
_EMBEDS = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight", "embed_in.weight")


def _tie_map(weights_dir: Path, config: dict, stored: dict) -> dict[str, str]:
    """{tied target: source} (lm_head.weight -> model.embed_tokens.weight) when the model
    ties its word embeddings, else {}. Read from config.json and the stored names; only
    when those do not say which tensor is the embedding is transformers asked (the
    architecture class's `_tied_weights_keys`, which costs seconds of imports)."""
    tie = config.get("tie_word_embeddings")
    if tie is False or (tie is None and _HEAD in stored):
        return {}
    source = [n for n in stored if n.endswith(_EMBEDS) and n.count(".") <= 2]
    if len(source) == 1:
        return {_HEAD: source[0]}
    try:
        import transformers
        from transformers import AutoConfig
        transformers.logging.set_verbosity_error()
        cfg = AutoConfig.from_pretrained(weights_dir)
        archs = getattr(cfg, "architectures", None) or []
        keys = getattr(getattr(transformers, archs[0], None), "_tied_weights_keys", None) if archs else None
        if getattr(cfg, "tie_word_embeddings", False) and isinstance(keys, dict):
            return {str(k): str(v) for k, v in keys.items() if v in stored}
    except Exception:  # an architecture transformers does not know: nothing is known tied
        pass
    return {}


class Input:
    """One model to merge: a full folder or a LoRA adapter over its base."""

    def __init__(self, spec: str):
        from ..models import adapter_base, resolve
        self.spec = spec
        self.folder = resolve(spec)
        base = adapter_base(self.folder)
        self.weights_dir = resolve(base) if base else self.folder
        self.lora = LoraAdapter(self.folder) if base else None
        cfg_path = self.weights_dir / "config.json"
        try:
            self.config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise UsageError(f"{self.weights_dir}: no config.json") from None
        except json.JSONDecodeError as e:
            raise DataError(f"invalid JSON: {e}", str(cfg_path)) from None
        if self.config.get("quantization_config"):
            raise UsageError(f"{self.weights_dir}: quantized weights cannot be merged")
        self.tensors = weight_files(self.weights_dir)
        self.tie = _tie_map(self.weights_dir, self.config, self.tensors.entries)
        if self.lora and self.tie and self.lora.touched() & (set(self.tie) | set(self.tie.values())):
            raise UsageError(f"{spec}: the adapter changes tied embeddings of its base; merge it "
                             "with peft's merge_and_unload first")
        if self.lora:
            unknown = sorted(self.lora.touched() - set(self.tensors.entries) - set(self.tie))
            if unknown:
                raise UsageError(f"{spec}: adapter tensor {unknown[0]} has no counterpart in its "
                                 f"base {self.weights_dir}")
        self.tok_dir = self.folder if (self.folder / "tokenizer_config.json").exists() else self.weights_dir
        self.virtual: dict[str, str] = {}  # name -> stored name (a tied head read from the embedding)

    def names(self, untie: bool) -> list[str]:
        """The tensor names this input contributes, in file order. A tied input drops its
        stored head, or (untie) gets it as a view of its input embedding."""
        names = [n for n in self.tensors.entries if n not in self.tie]
        if untie:
            for target, src in self.tie.items():
                names.insert(names.index(src) + 1, target)
                self.virtual[target] = src
        return names

    def info(self, name: str) -> TensorInfo:
        return self.tensors.entries[self.virtual.get(name, name)]

    def load(self, name: str):
        t = self.tensors.read(self.virtual.get(name, name))
        if not t.is_floating_point():
            return t
        t = t.float()
        return self.lora.apply(name, t) if self.lora else t

    def digests(self) -> dict[str, str]:
        from ..models import model_sha256
        out = {self.spec: model_sha256(self.folder)}
        if self.lora:
            out[f"{self.spec} (adapter base {self.weights_dir})"] = model_sha256(self.weights_dir)
        return out


# --- compatibility: architectures, tensor names and shapes, vocabularies -----------------

_ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "intermediate_size",
              "vocab_size", "hidden_act")


def _vocab(folder: Path) -> list | None:
    """The tokenizer's [(id, token)] sorted by id, from tokenizer.json / vocab.json, or None."""
    for name in ("tokenizer.json", "vocab.json"):
        path = folder / name
        if not path.exists():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if name == "vocab.json":
                return sorted((int(i), t) for t, i in data.items())
            v = (data.get("model") or {}).get("vocab")
            pairs = {int(i): t for t, i in v.items()} if isinstance(v, dict) else (
                {i: e[0] for i, e in enumerate(v)} if isinstance(v, list) else {})  # unigram: [[token, score]]
            pairs.update({int(a["id"]): a["content"] for a in data.get("added_tokens") or []})
            return sorted(pairs.items())
        except (ValueError, TypeError, KeyError, AttributeError, IndexError) as e:
            raise DataError(f"unreadable vocabulary: {e}", str(path)) from None
    return None


def check_compatible(ref: Input, others: list[Input]) -> tuple[list[str], bool]:
    """Refuse (exit 2) mismatched tensors, architectures or vocabularies, naming the
    first offending tensor. Returns the output tensor names and whether the output ties
    its embeddings."""
    tied = all(x.tie for x in [ref] + others)
    names = ref.names(untie=not tied)
    if not names:
        raise UsageError(f"{ref.spec}: no tensors to merge")
    known = set(names)
    for x in others:
        theirs = x.names(untie=not tied)
        have = set(theirs)
        for n in names:
            if n not in have:
                raise UsageError(f"cannot merge: tensor {n} is in {ref.spec} but not in {x.spec}")
            a, b = ref.info(n).shape, x.info(n).shape
            if a != b:
                raise UsageError(f"cannot merge: tensor {n} has shape {list(b)} in {x.spec} "
                                 f"but {list(a)} in {ref.spec}")
        extra = [n for n in theirs if n not in known]
        if extra:
            raise UsageError(f"cannot merge: tensor {extra[0]} is in {x.spec} but not in {ref.spec}")
        for k in _ARCH_KEYS:
            a, b = ref.config.get(k), x.config.get(k)
            if a is not None and b is not None and a != b:
                raise UsageError(f"cannot merge: architectures differ: config.json {k} is "
                                 f"{b!r} in {x.spec} but {a!r} in {ref.spec}")
    embed = next(iter(ref.tie.values()), None) or next((n for n in names if "embed" in n), names[0])
    ref_vocab = _vocab(ref.tok_dir)
    for x in others:
        v = _vocab(x.tok_dir)
        if ref_vocab is None or v is None or v == ref_vocab:
            continue
        diff = next((a, b) for a, b in zip_longest(ref_vocab, v) if a != b)
        raise UsageError(f"cannot merge: vocabularies differ (tensor {embed}): {x.spec} has "
                         f"{diff[1]} where {ref.spec} has {diff[0]} (id, token)")
    return names, tied
