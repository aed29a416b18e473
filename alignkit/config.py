"""`--config FILE`: flags from a YAML or TOML file (command-line flags win)."""
from __future__ import annotations

from pathlib import Path

from .errors import UsageError


def load_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix == ".toml":
            import tomllib
            data = tomllib.loads(text)
        else:
            import yaml
            data = yaml.safe_load(text)
    except Exception as e:
        raise UsageError(f"--config {path}: cannot parse: {e}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path}: expected a mapping of flag names to values")
    return data
