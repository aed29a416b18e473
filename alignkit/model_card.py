"""The README.md model card of an output folder, written from its alignkit.json: what
it is, the base, the data, the hyperparameters, the final metrics, the command line and
how to load it with transformers/peft. Used by `training.finish_folder`."""
from __future__ import annotations

import json
from pathlib import Path


# alignkit.json keys the card shows in their own sections
_CARD_OWN = {"command", "versions", "inputs", "seed", "counts", "wall_time_s", "base", "data",
             "hyperparameters", "final_metrics", "metrics", "train_options"}
_NOT_HPARAMS = {"resume", "force", "extra"}


def model_card(data: dict, folder: Path, final: Path) -> str:
    """README.md of an output folder, from its alignkit.json (`data`): what it is, the
    base, the data, the hyperparameters, the final metrics, the command line and how to
    load it with transformers/peft."""
    folder, final = Path(folder), Path(final)
    adapter = (folder / "adapter_config.json").exists()
    cfg = _read_json(folder / ("adapter_config.json" if adapter else "config.json"))
    seq_cls = cfg.get("task_type") == "SEQ_CLS" if adapter else any(
        str(a).endswith("ForSequenceClassification") for a in cfg.get("architectures") or [])
    method = data.get("method") or next(
        (v for k, v in data.items() if k.endswith("_method") and isinstance(v, str)), "unknown")
    base = data.get("base") if isinstance(data.get("base"), dict) else {}
    what = ("reward model (sequence classification, one score per text)" if seq_cls
            else "causal language model")
    form = (f"a LoRA adapter (r={cfg.get('r')}, alpha={cfg.get('lora_alpha')}) over its base"
            if adapter else "full weights")
    out = ["---", f"library_name: {'peft' if adapter else 'transformers'}", "tags:",
           "- alignkit", f"- {method}", "---", "", f"# {final.name}", "",
           f"A {what} trained with alignkit's `{method}` method: {form}.", "",
           "| | |", "| --- | --- |", f"| method | `{method}` |"]
    out += [f"| base {k} | {_cell(base.get(k))} |" for k in ("spec", "path", "sha256")
            if base.get(k)]
    out += [f"| seed | {_cell(data.get('seed'))} |",
            f"| wall time (s) | {_cell(data.get('wall_time_s'))} |", ""]

    out += ["## Data", ""]
    if isinstance(data.get("data"), dict):
        out += _table(data["data"])
    elif data.get("inputs"):
        out += ["| input | sha256 |", "| --- | --- |"]
        out += [f"| {_cell(k)} | {_cell(v)} |" for k, v in data["inputs"].items()]
        out.append("")
    if data.get("counts"):
        out += ["Counts:", ""] + _table(data["counts"])

    out += ["## Hyperparameters", ""]
    hp = data.get("hyperparameters") or data.get("train_options") or {}
    out += _table({k: v for k, v in hp.items() if k not in _NOT_HPARAMS})
    for key, value in data.items():
        if key.endswith("_options") and key != "train_options" and isinstance(value, dict):
            out += [f"### {key.replace('_', ' ')}", ""] + _table(value)

    metrics = data.get("final_metrics") or data.get("metrics") or {}
    out += ["## Final metrics", ""] + (_table(_flatten(metrics)) if metrics else
                                        ["(none logged)", ""])
    rest = {k: v for k, v in data.items() if k not in _CARD_OWN and not k.endswith("_options")
            and v not in (None, "", {}, [])}
    if rest:
        out += ["## Other settings", ""] + _table(rest)

    out += ["## Command", "", "```bash", str(data.get("command", "")), "```", ""]
    out += ["## How to load", ""]
    if adapter or cfg:
        out += _load_snippet(str(final.resolve()), adapter, seq_cls, base)
    else:  # alignkit's own layout (a reward model of several parts)
        out += [f"This folder has alignkit's `{method}` layout (see alignkit.json): load it "
                f"with `alignkit.reward_models.load_reward_model({str(final.resolve())!r})` "
                f"or score with `alignkit score --scorer rm:{final.resolve()}`.", ""]
    versions = data.get("versions") or {}
    if versions:
        out += ["## Versions", ""] + _table(versions)
    out += ["Written by alignkit from `alignkit.json` (the full provenance record); "
            "`metrics.jsonl` has every logged step."]
    return "\n".join(out) + "\n"


def _load_snippet(path: str, adapter: bool, seq_cls: bool, base: dict) -> list[str]:
    head = "AutoPeftModelFor" if adapter else "AutoModelFor"
    cls = head + ("SequenceClassification" if seq_cls else "CausalLM")
    module = "peft" if adapter else "transformers"
    extra = ", num_labels=1" if seq_cls else ""
    lines = ["```python", f"from {module} import {cls}", "from transformers import AutoTokenizer",
             "", f"model = {cls}.from_pretrained({path!r}{extra})",
             f"tokenizer = AutoTokenizer.from_pretrained({path!r})"]
    if seq_cls:
        lines += ['batch = tokenizer(["<the prompt and completion, rendered>"], return_tensors="pt")',
                  "reward = model(**batch).logits[:, 0]"]
    lines += ["```", ""]
    if adapter:
        lines += [f"The base is read from `adapter_config.json`: `{base.get('path')}` (a plain "
                  "transformers folder). If it moves, alignkit's loaders "
                  "(`alignkit.models.load_causal_lm` / `load_seq_cls`, hence every command "
                  "taking this folder) find it again by its sha256 in alignkit's model cache; "
                  "for plain peft, point `base_model_name_or_path` at its new place.", ""]
    return lines


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _flatten(d: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            flat.update(_flatten(v, f"{prefix}{k}/"))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _cell(v) -> str:
    if isinstance(v, float):
        text = f"{v:.6g}"
    elif isinstance(v, (dict, list, tuple)):
        text = json.dumps(v, default=str)
    else:
        text = "" if v is None else str(v)
    text = text.replace("|", "\\|").replace("\n", " ")
    return f"`{text}`" if text and not isinstance(v, (int, float)) else text or "-"


def _table(d: dict) -> list[str]:
    if not d:
        return ["(none)", ""]
    return ["| name | value |", "| --- | --- |"] + [
        f"| {k} | {_cell(v)} |" for k, v in d.items()] + [""]
