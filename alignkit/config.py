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


def config_defaults(params, values: dict, path: str, command: str) -> dict:
    """A --config mapping -> click's default_map for one command. Keys are flag names
    with or without dashes (`max-new-tokens`, `max_new_tokens`, `--max-new-tokens`) or a
    flag's parameter name; a key that is no flag of the command is a UsageError."""
    import keyword
    by_key: dict[str, str] = {}
    for p in params:
        if getattr(p, "param_type_name", "") not in ("option", "argument"):
            continue
        by_key[p.name] = p.name
        if p.name.endswith("_") and keyword.iskeyword(p.name[:-1]):
            by_key[p.name[:-1]] = p.name
        for opt in list(getattr(p, "opts", ())) + list(getattr(p, "secondary_opts", ())):
            if opt.startswith("--"):
                by_key[opt[2:].replace("-", "_")] = p.name
    out = {}
    for key, value in values.items():
        norm = str(key).lstrip("-").replace("-", "_")
        if norm not in by_key:
            raise UsageError(f"--config {path}: unknown key {key!r} (not a flag of "
                             f"alignkit {command})")
        out[by_key[norm]] = value
    return out
