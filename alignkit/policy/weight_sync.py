"""The policy's full weights under the base model's names, for a vLLM engine
(`train-policy --engine vllm`).

Why: an online trainer that samples with vLLM samples from the engine's own copy of the
weights, loaded once from the policy's initial folder. After optimizer steps that copy
is stale; `sync_to_engine` pushes the trained weights into it (`VllmEngine.load_weights`)
so that the samples come from the policy being trained.

What: `full_weights(model)` gives (name, tensor) pairs named as in the base model's
folder (the names vLLM's `load_weights` takes): a full model's parameters as they are;
a peft LoRA model's base weights with the active adapter folded in (W + ΔW), the
adapter's own tensors left out. accelerate's wrapper (DDP, `torch.compile`) is unwrapped
first. Names are cleaned as TRL's vLLM weight sync does (`trl/generation/vllm_generation.py`,
formerly GRPOTrainer's `_move_model_to_vllm`): strip `base_model.model.` and
`.base_layer`, skip the `lora_` tensors and the `original_module` copies of
`modules_to_save`, strip `modules_to_save.default.`.

LoRA: TRL merges in place (`merge_adapter()`), reads the weights and unmerges
(`unmerge_adapter()`). W += ΔW then W −= ΔW does not give W back bit for bit, and with
a sync at every step the frozen base (which is also the reference: the policy with its
adapter disabled) drifts by the round-off, visibly so in bfloat16. Here a plain LoRA
layer's merged weight is computed beside the model, W + ΔW with peft's own
`get_delta_weight` (what `merge` adds), and the model is not touched. Layers that peft
merges otherwise (DoRA and the other LoRA variants, `lora_bias`) go through TRL's
merge / read / unmerge, as TRL does.

Tensors are yielded one at a time: with the engine in this process, a merged LoRA
weight exists only until the engine has copied it.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

def unwrap(model):
    """The model under accelerate's wrappers (DDP's `.module`, DeepSpeed's engine,
    `torch.compile`'s `_orig_mod`)."""
    from accelerate.utils import extract_model_from_parallel
    return extract_model_from_parallel(model)


def is_peft(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def clean_name(name: str) -> str:
    """A peft parameter name -> the base model's (TRL's cleaning)."""
    name = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return name.replace("modules_to_save.default.", "").replace("_checkpoint_wrapped_module.", "")


def _skip(name: str) -> bool:
    return "lora_" in name or "original_module" in name


def _lora_layers(model):
    from peft.tuners.lora import LoraLayer
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _plain(layer) -> bool:
    """A LoRA layer whose merge is W += get_delta_weight (no variant, no LoRA bias)."""
    adapters = [a for a in layer.active_adapters if a in _adapter_keys(layer)]
    return not any(a in getattr(layer, "lora_variant", {}) or
                   getattr(layer, "lora_bias", {}).get(a, False) for a in adapters)


def _adapter_keys(layer) -> set:
    return set(layer.lora_A.keys()) | set(getattr(layer, "lora_embedding_A", {}).keys())


def _merged_weights(model) -> dict[int, tuple]:
    """id(base weight) -> (layer, adapters to fold in) for the plain LoRA layers whose
    active adapters are not merged already and not disabled."""
    out = {}
    for layer in _lora_layers(model):
        if getattr(layer, "disable_adapters", False):
            continue
        todo = [a for a in layer.active_adapters
                if a in _adapter_keys(layer) and a not in layer.merged_adapters]
        if todo:
            out[id(layer.get_base_layer().weight)] = (layer, todo)
    return out


def _peft_weights(model) -> Iterator[tuple[str, "object"]]:
    import torch
    fold = _merged_weights(model)
    for name, param in model.named_parameters():
        if _skip(name):
            continue
        entry = fold.get(id(param))
        if entry is None:
            yield clean_name(name), param.detach()
            continue
        layer, adapters = entry
        with torch.no_grad():
            w = param.detach().clone()
            for a in adapters:
                w += layer.get_delta_weight(a).to(w.dtype)
        yield clean_name(name), w


def _peft_weights_merged(model) -> Iterator[tuple[str, "object"]]:
    """TRL's way: merge in place, read, unmerge (for the LoRA variants)."""
    model.merge_adapter()
    try:
        for name, param in model.named_parameters():
            if not _skip(name):
                yield clean_name(name), param.detach()
    finally:
        model.unmerge_adapter()


@contextmanager
def full_weights(model):
    """Context manager giving an iterator of (name, tensor): the policy's full weights
    under the base model's names (see the module doc). Consume it inside the `with`."""
    import torch
    model = unwrap(model)
    with torch.no_grad():
        if not is_peft(model):
            it = ((n, p.detach()) for n, p in model.named_parameters())
        elif all(_plain(layer) for layer in _lora_layers(model)):
            it = _peft_weights(model)
        else:
            it = _peft_weights_merged(model)
        try:
            yield it
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()  # runs the unmerge of a half-consumed merged iterator


def sync_to_engine(model, engine) -> None:
    """Load the policy's full weights into `engine` (`VllmEngine.load_weights`: vLLM's
    in-place reload, which takes the whole set in one call)."""
    with full_weights(model) as weights:
        engine.load_weights(weights)
