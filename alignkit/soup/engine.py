"""The streaming merge: plan the output shards, compute each tensor with the method,
write it, copy config and tokenizer, record alignkit.json; all inside atomic_dir."""
from __future__ import annotations

import contextlib
import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import console
from ..io import atomic_dir, manifest
from .inputs import Input, check_compatible
from .methods import Job, MergeConfig
from .tensors import plan_shards, torch_dtype, write_safetensors


def _out_dtype(cfg: MergeConfig, stored):
    import torch
    if not stored.is_floating_point or cfg.dtype == "auto":
        return stored
    return getattr(torch, cfg.dtype)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
                    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja",
                    "chat_template.json")


def _copy_aux(ref: Input, out: Path, cfg: MergeConfig, tied: bool) -> None:
    """config.json (adjusted for ties and dtype), generation config and tokenizer files."""
    config = dict(ref.config)
    if bool(ref.tie) != tied:
        config["tie_word_embeddings"] = tied
    if cfg.dtype != "auto":
        for k in ("dtype", "torch_dtype"):
            if k in config or k == "dtype":
                config[k] = cfg.dtype
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in _TOKENIZER_FILES:
        if (ref.tok_dir / name).exists():
            shutil.copy2(ref.tok_dir / name, out / name)
    extra = ref.tok_dir / "additional_chat_templates"
    if extra.is_dir():
        shutil.copytree(extra, out / extra.name)
    for d in (ref.tok_dir, ref.weights_dir):
        if (d / "generation_config.json").exists():
            shutil.copy2(d / "generation_config.json", out / "generation_config.json")
            break


@contextlib.contextmanager
def _single_thread():
    """Run torch ops on one thread, then restore. Merging is streaming elementwise work,
    bound by memory and I/O: on the 2-core test machine with other jobs running, a linear
    merge of three 135M models took 6.6 s on one thread and 15-21 s on two (OpenMP
    threads spinning against each other and the other jobs)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def merge(cfg: MergeConfig, output: str | Path, *, force: bool = False) -> dict:
    """Merge the models of `cfg` into the folder `output` (atomically). Returns a summary."""
    with _single_thread():
        return _merge(cfg, output, force)


def _merge(cfg: MergeConfig, output: str | Path, force: bool) -> dict:
    import torch
    started = time.time()
    with atomic_dir(output, force=force) as tmp:
        inputs = [Input(s) for s in cfg.models]
        base = Input(cfg.base) if cfg.base else None
        ref = base or inputs[0]
        hasher = ThreadPoolExecutor(max_workers=1)
        try:
            others = [x for x in inputs if x is not ref]
            names, tied = check_compatible(ref, others)
            specs = []
            for n in names:
                stored = torch_dtype(ref.info(n).dtype)
                specs.append((n, ref.info(n).shape, _out_dtype(cfg, stored)))

            def produce(name: str):
                if not torch_dtype(ref.info(name).dtype).is_floating_point:
                    return ref.load(name)  # non-float buffers: the reference's, as stored
                job = Job(name, len(inputs), lambda i: inputs[i].load(name),
                          (lambda: base.load(name)) if base else None, cfg.weights, cfg.params, cfg.seed)
                with torch.no_grad():
                    return cfg.method.load()(job)

            # the inputs' sha256 (for alignkit.json) on a second thread while merging:
            # hashlib releases the GIL, so this overlaps with the tensor arithmetic
            digests_future = hasher.submit(
                lambda: {k: v for x in ([base] if base else []) + inputs for k, v in x.digests().items()})
            shards = plan_shards(specs, cfg.max_shard_bytes)
            files = (["model.safetensors"] if len(shards) == 1 else
                     [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
            total = 0
            with console.progress(f"merging ({cfg.method.name})", total=len(specs)) as bar:
                for fname, shard in zip(files, shards):
                    total += write_safetensors(tmp / fname, shard, produce, bar.advance)
            if len(shards) > 1:
                wmap = {s[0]: f for f, shard in zip(files, shards) for s in shard}
                (tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": dict(sorted(wmap.items()))},
                    indent=2) + "\n")
            _copy_aux(ref, tmp, cfg, tied)
            digests = digests_future.result()
            info = {**cfg.describe(), "tied_embeddings": tied, "shards": files, "tensors": len(specs),
                    "bytes": total, "adapters": [x.spec for x in inputs + [base] if x and x.lora]}
            data = manifest(inputs=digests, started=started, **info)  # seed: from info
            (tmp / "alignkit.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
        finally:
            hasher.shutdown(wait=False, cancel_futures=True)
            for x in inputs + ([base] if base else []):
                x.tensors.close()
    console.info(f"merged {len(inputs)} models ({cfg.method.name}) into {output}: "
                 f"{len(specs)} tensors, {len(files)} shard(s), {total / 1e6:.1f} MB")
    return info
