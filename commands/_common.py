"""Flags shared by several commands, declared once so they read the same everywhere."""
from __future__ import annotations

from typing import Optional

import typer

INPUT_HELP = "Input JSONL (.jsonl or .jsonl.gz); '-' reads stdin."


def input_arg(help: str = INPUT_HELP):
    return typer.Argument("-", help=help, show_default=True)


def output_opt(help: str = "Output JSONL path; '-' writes stdout."):
    return typer.Option("-", "--output", "-o", help=help)


def out_dir_opt(help: str = "Output model folder (written atomically)."):
    return typer.Option(..., "--output", "-o", help=help)


def seed_opt(default: int = 0):
    return typer.Option(default, "--seed", help="Random seed: same inputs + seed -> same output.")


def dtype_opt(default: str = "auto"):
    return typer.Option(default, "--dtype",
                        help="auto | float32 | bfloat16 (bf16 is ~3x faster on CPUs with AVX-512 BF16).")


def shard_opt():
    return typer.Option(None, "--shard", help="Process only shard I of N (I/N, by id hash).")


def force_opt():
    return typer.Option(False, "--force", help="Replace an existing output folder.")


def allow_pickle_opt():
    return typer.Option(False, "--allow-pickle", help="Allow loading pickle (.bin) weights.")


def trust_remote_code_opt():
    return typer.Option(False, "--trust-remote-code", help="Allow model code from the folder.")


def config_note() -> str:
    return "Any flag can also come from --config FILE (YAML or TOML); command-line flags win."


# --- training flags, declared once ---------------------------------------------------

def _train_params():
    """(name, default typer.Option) for every TrainOptions flag."""
    O = typer.Option
    return [
        ("epochs", O(1.0, "--epochs", help="Training epochs.")),
        ("max_steps", O(-1, "--max-steps", help="Stop after this many optimizer steps (-1: use --epochs).")),
        ("lr", O(None, "--lr", help="Learning rate (default: the method's).")),
        ("batch_size", O(4, "--batch-size", help="Per-device batch size.")),
        ("grad_accum", O(1, "--grad-accum", help="Gradient accumulation steps.")),
        ("max_length", O(512, "--max-length", help="Max tokens of prompt + completion.")),
        ("seed", seed_opt()),
        ("dtype", dtype_opt()),
        ("gradient_checkpointing", O(False, "--gradient-checkpointing", help="Trade compute for memory.")),
        ("lora_r", O(0, "--lora-r", help="LoRA rank (0: train full weights).")),
        ("lora_alpha", O(16, "--lora-alpha", help="LoRA alpha.")),
        ("lora_dropout", O(0.0, "--lora-dropout", help="LoRA dropout.")),
        ("lora_targets", O("all-linear", "--lora-targets", help="LoRA target modules (comma list or all-linear).")),
        ("merge_lora", O(False, "--merge-lora", help="Write merged full weights instead of an adapter.")),
        ("logging_steps", O(1, "--logging-steps", help="Write metrics.jsonl every N steps.")),
        ("save_steps", O(0, "--save-steps", help="Checkpoint every N steps (0: only on interrupt).")),
        ("warmup_ratio", O(0.0, "--warmup-ratio", help="Linear warmup share of the steps.")),
        ("resume", O(False, "--resume", help="Continue the unfinished run in OUT.partial/.")),
        ("force", force_opt()),
    ]


def train_command(default_lr: float = 5e-6):
    """Decorator: add the shared training flags to a typer command function.

    The wrapped function receives `opts: TrainOptions` instead of those flags, so every
    training command parses them the same way and stays short.
    """
    import functools
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)
        own = [p for n, p in sig.parameters.items() if n != "opts"]
        names = {p.name for p in own}
        # --lr defaults to None (the method's default): without an annotation click
        # would parse it as a string.
        types = {"lr": Optional[float]}
        extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d,
                                   annotation=types.get(n, inspect.Parameter.empty))
                 for n, d in _train_params() if n not in names]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]

        @functools.wraps(fn)
        def wrapper(**kwargs):
            from alignkit.training import TrainOptions
            fields = {n for n, _ in _train_params()}
            opt_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in fields and k not in names}
            if opt_kwargs.get("lr") is None:
                opt_kwargs["lr"] = default_lr
            return fn(opts=TrainOptions(**opt_kwargs), **kwargs)

        wrapper.__signature__ = sig.replace(parameters=own + extra)
        del wrapper.__wrapped__
        return wrapper

    return deco
