"""The CLI contract: exit codes, stdin handling, help without heavy imports, schema,
config files, completions."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from alignkit.cli import COMMAND_MODULES

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "trl", "datasets")


def _help_imports(args):
    code = (
        "import sys\nfrom alignkit.cli import main\n"
        f"rc = main({args!r})\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], rc, file=sys.stderr)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    return p


def _subcommands():
    import typer.main

    from alignkit.cli import app
    root = typer.main.get_command(app)
    out = []
    for name, cmd in root.commands.items():
        out.append([name])
        for sub in getattr(cmd, "commands", {}):
            out.append([name, sub])
    return out


def test_root_help_is_light():
    p = _help_imports(["--help"])
    assert "HEAVY [] 0" in p.stderr, p.stderr
    assert "Example" in p.stdout


@pytest.mark.parametrize("cmd", _subcommands(), ids=lambda c: " ".join(c))
def test_every_command_help_is_light_and_has_example(cmd):
    p = _help_imports(cmd + ["--help"])
    assert "HEAVY [] 0" in p.stderr, p.stderr
    assert "Example" in p.stdout, f"{cmd}: --help needs a worked example"


def test_version(cli):
    r = cli(["--version"])
    assert r.code == 0 and r.out.startswith("alignkit ")


def test_unknown_command_is_usage_error(cli):
    assert cli(["no-such-command"]).code == 2


def test_schema(cli):
    r = cli(["schema", "pair"])
    assert r.code == 0
    s = json.loads(r.out)
    assert s["required"] == ["id", "prompt", "chosen", "rejected"]
    assert cli(["schema", "nope"]).code == 2


def test_env_json(cli):
    r = cli(["env", "--json"])
    info = json.loads(r.out)
    assert r.code == 0 and info["alignkit"] and "torch_threads" in info


def test_console_script_exit_codes(tmp_path):
    """The installed entry point, end to end: bad data -> 3 with path:line."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "prompt": "x"}\nnot json\n')
    exe = Path(sys.executable).parent / "alignkit"
    p = subprocess.run([str(exe), "schema", "pair"], capture_output=True, text=True)
    assert p.returncode == 0
    p = subprocess.run([str(exe), "--debug", "schema", "zzz"], capture_output=True, text=True)
    assert p.returncode == 2 and "Error: unknown record type" in p.stderr


def test_completions_are_current(tmp_path):
    from alignkit.completions import GENERATORS
    for name, gen in GENERATORS.items():
        committed = (ROOT / "completions" / name).read_text()
        assert committed == gen(), f"completions/{name} is stale: run `make completions`"


def test_completion_scripts_name_every_command():
    text = (ROOT / "completions" / "alignkit.bash").read_text()
    for cmd in _subcommands():
        assert cmd[-1] in text


def test_config_file_supplies_flags(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("as-json: true\n")
    r = cli(["--config", str(cfg), "env"])
    assert r.code == 0 and json.loads(r.out)["alignkit"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("- 1\n- 2\n")
    assert cli(["--config", str(bad), "env"]).code == 2


def test_every_subpackage_is_packaged():
    """A regular (non-editable) install must ship every alignkit subpackage."""
    import tomllib
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {f"alignkit.{p.name}" for p in (ROOT / "alignkit").iterdir()
             if p.is_dir() and (p / "__init__.py").exists()}
    assert found <= listed, f"add to pyproject packages: {found - listed}"
    assert "alignkit.commands" in listed


def test_cli_reference_is_current():
    """docs/cli.md is generated from --help: it must match the real CLI."""
    from alignkit.docs import render
    committed = (ROOT / "docs" / "cli.md").read_text()
    assert committed == render(), "docs/cli.md is stale: run `make docs`"


def test_a_closed_downstream_pipe_is_exit_0_every_time(tmp_path):
    """`alignkit ... | head` under `set -o pipefail` (Make, cron): exit 0, nothing on
    stderr, however early or late the pipe closes."""
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(20000):
            f.write(json.dumps({"id": f"a{i}", "prompt": "p", "completions": [{"text": "hi there"}]}) + "\n")
    exe = Path(sys.executable).parent / "alignkit"
    for i in range(8):
        cut = "head -1" if i % 2 else "head -c 1"
        sink = tmp_path / "head.out"
        p = subprocess.run(["bash", "-c", f"set -o pipefail; '{exe}' score --scorer length '{big}' | {cut} > '{sink}'"],
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0 and p.stderr == "", (i, p.returncode, p.stderr)


@pytest.mark.parametrize("exc, code", [
    (PermissionError(13, "Permission denied"), 1),
    (IsADirectoryError(21, "Is a directory"), 2),
])
def test_os_errors_are_one_clean_line_naming_the_users_path(cli, tmp_path, monkeypatch, exc, code):
    import alignkit.io as aio
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "p", "completions": [{"text": "x"}]}) + "\n")
    out = tmp_path / "out.jsonl"
    exc.filename = str(tmp_path / ".out.jsonl.4242.k3j9.tmp")  # the atomic writer's temp file

    def fail(*a, **k):
        raise exc
    monkeypatch.setattr(aio.os, "replace", fail)
    r = cli(["score", "--scorer", "length", src, "-o", out])
    assert r.code == code, r
    assert r.err.strip() == f"Error: {out}: {exc.strerror}", r.err


@pytest.mark.parametrize("where", ["before", "after", "equals"])
def test_config_works_before_or_after_the_command_in_both_spellings(cli, tmp_path, where):
    src = tmp_path / "s.jsonl"
    src.write_text(json.dumps({"id": "a", "prompt": "p", "completions": [{"text": "a b c"}]}) + "\n")
    cfg = tmp_path / "c.toml"
    cfg.write_text('scorer = ["length:2:1"]\nchunk = 1\n')
    args = {"before": ["--config", cfg, "score", src], "after": ["score", src, "--config", cfg],
            "equals": ["score", f"--config={cfg}", src]}[where]
    r = cli(args)
    assert r.code == 0, r
    assert "length:2:1" in r.records[0]["completions"][0]["scores"]
    # a flag on the command line wins over the file
    r = cli([*args, "--scorer", "length"])
    assert set(r.records[0]["completions"][0]["scores"]) == {"length"}


def test_config_refuses_unknown_keys_naming_them(cli, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("scorer: [length]\nmax_new_tokenz: 3\n")
    r = cli(["score", "-", "--config", cfg], stdin="")
    assert r.code == 2 and "unknown key 'max_new_tokenz'" in r.err and "alignkit score" in r.err


def test_every_command_has_config_quiet_verbose_and_readable_placeholders(cli):
    import re
    for cmd in _subcommands():
        r = cli([*cmd, "--help"])
        assert r.code == 0, cmd
        if "Commands" not in r.out:  # a group (`models`) has its subcommands' flags
            for flag in ("--config", "--quiet", "--verbose"):
                assert flag in r.out, (cmd, flag)
        assert not re.search(r"<(bool|str|int|float|list\[\w+\])>", r.out), (cmd, r.out)


@pytest.mark.parametrize("line, want, not_want", [
    ("alignkit gen-pairs --model tiny --max", "--max-new-tokens", None),   # after an option value
    ("alignkit score in.jsonl --sco", "--scorer", None),                 # after a positional
    ("alignkit train-policy --method d", "dpo", "sft"),                  # a registry value
    ("alignkit merge-soup a b --method ti", "ties", None),
    ("alignkit relabel --strategy best", "best-worst", None),
    ("alignkit eval --scorer ru", "rules", None),
    ("alignkit gen-pairs --model smo", "smollm2-135m-instruct", None),   # embedded model names
    ("alignkit mo", "models", None),
    ("alignkit models pull --f", "--force", None),
])
def test_bash_completion_completes_real_command_lines(line, want, not_want):
    """Runs the committed bash script the way bash's completion does."""
    import shutil
    if not shutil.which("bash"):
        pytest.skip("no bash")
    script = ROOT / "completions" / "alignkit.bash"
    prog = (f"source '{script}'; COMP_WORDS=({line}); COMP_CWORD=$((${{#COMP_WORDS[@]}}-1)); "
            "_alignkit; printf '%s\\n' \"${COMPREPLY[@]}\"")
    p = subprocess.run(["bash", "-c", prog], capture_output=True, text=True, timeout=30)
    got = p.stdout.split()
    assert want in got, (line, got, p.stderr)
    assert not_want is None or not_want not in got


def test_lineage_marks_changed_and_missing_inputs(cli, tmp_path):
    import hashlib
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"id": "a", "prompt": "p"}\n')
    out = tmp_path / "samples.jsonl"
    out.write_text('{"id": "a", "prompt": "p", "completions": [{"text": "x"}]}\n')
    sha = hashlib.sha256(src.read_bytes()).hexdigest()
    (tmp_path / "samples.jsonl.alignkit.json").write_text(json.dumps({
        "command": "alignkit gen-pairs prompts.jsonl", "seed": 0,
        "inputs": {str(src): sha, str(tmp_path / "gone.jsonl"): "0" * 64,
                   "model:tiny-llama": "f" * 64}}))
    r = cli(["lineage", out, "--json"])
    assert r.code == 0, r
    tree = json.loads(r.out)
    kids = {Path(k["artifact"]).name: k for k in tree["inputs"]}
    assert kids["prompts.jsonl"]["status"] == "no manifest"
    assert kids["gone.jsonl"]["status"] == "missing"
    assert kids["tiny-llama"]["kind"] == "embedded model"
    src.write_text('{"id": "b", "prompt": "q"}\n')  # changed since it was consumed
    tree = json.loads(cli(["lineage", out, "--json"]).out)
    assert {Path(k["artifact"]).name: k for k in tree["inputs"]}["prompts.jsonl"]["status"] == "changed"
    assert cli(["lineage", tmp_path / "nothing"]).code == 2


def _float_options():
    from alignkit.cli import _float_annotation, click_command

    def walk(cmd, path=()):
        subs = getattr(cmd, "commands", {})
        for name, sub in subs.items():
            yield from walk(sub, path + (name,))
        if not subs:
            yield path, cmd
    return [(list(path), p.opts[0]) for path, cmd in walk(click_command()) for p in cmd.params
            if getattr(p, "param_type_name", "") == "option" and _float_annotation(p)]


def test_every_float_option_refuses_nan_and_inf_as_a_usage_error(cli):
    """`float()` reads 'nan' and 'inf', and a bound like `>= 0` lets nan through: every
    float flag of every command refuses both before any work (exit 2, the flag named)."""
    options = _float_options()
    assert len(options) > 40 and (["eval"], "--temperature") in options
    for path, flag in options:
        for bad in ("nan", "-inf"):
            r = cli([*path, flag, bad, "-"], stdin="")
            assert r.code == 2 and f"{flag} must be finite" in r.err, (path, flag, bad, r.err)
    r = cli(["gen-pairs", "--model", "tiny-llama", "--temperature", "0.5", "--help"])
    assert r.code == 0


def test_sample_params_refuse_a_nan_temperature():
    from alignkit.errors import UsageError
    from alignkit.generation import SampleParams
    for t in (float("nan"), float("inf"), -1.0):
        with pytest.raises(UsageError, match="--temperature"):
            SampleParams(temperature=t).check()
    assert SampleParams(temperature=0.0).check().temperature == 0.0
