"""Flags shared by several commands, declared once so they read the same everywhere."""
from __future__ import annotations

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
