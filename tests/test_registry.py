"""The consolidated library: one registry walked for every kind, one text layer, one
scorer-options group, an import graph without cycles or private cross-imports, and
files that read top to bottom (no library file over 600 lines but the checks table)."""
from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "alignkit"

# kind -> (command, how its entries are listed: extra args, or None for --help)
LISTED = {
    "scorer": ("score", None),
    "relabel strategy": ("relabel", None),
    "policy method": ("train-policy", ["--list-methods"]),
    "reward-model method": ("train-rm", ["--list-methods"]),
    "distill method": ("distill", ["--list-methods"]),
    "merge method": ("merge-soup", None),
}


def _help(cli, *args) -> str:
    import os
    old = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "400"  # one line per option: flags are not wrapped
    try:
        r = cli([*args])
    finally:  # later tests (docs/cli.md against --help) see the usual width
        if old is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = old
    assert r.code == 0, r
    return r.out


def _flags(help_text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", help_text))


@pytest.mark.parametrize("kind", list(LISTED))
def test_every_entry_is_listed_documented_and_its_params_are_flags(cli, kind):
    import alignkit
    reg = alignkit.registries()[kind]
    command, listing = LISTED[kind]
    help_text = _help(cli, command, "--help")
    listed = _help(cli, command, *listing) if listing else help_text
    docs = (ROOT / "docs" / "cli.md").read_text()
    completion = (ROOT / "completions" / "alignkit.bash").read_text()
    flags = _flags(help_text)
    assert len(reg) > 0
    for entry in reg:
        assert re.search(rf"(?<![\w-]){re.escape(entry.name)}(?![\w-])", listed), (kind, entry.name)
        assert entry.name in docs, (kind, entry.name, "docs/cli.md")
        assert re.search(rf"(?<![\w-]){re.escape(entry.name)}(?![\w-])", completion), (kind, entry.name)
        assert entry.summary and entry.kind == kind
        for p in entry.params:
            assert p.flag_name in flags, (kind, entry.name, p.flag_name)
            assert p.help, (kind, entry.name, p.name)
            assert p.coerce(p.default) == p.default or p.default is None


def test_unknown_names_get_one_message_with_a_close_match():
    import alignkit
    from alignkit.errors import UsageError
    for kind, reg in alignkit.registries().items():
        name = reg.names()[0]
        with pytest.raises(UsageError, match=rf"unknown {kind} '{re.escape(name)}x'.*did you "
                                             rf"mean '{re.escape(name)}'"):
            reg.get(name + "x")


def test_declared_parameters_validate_their_values():
    from alignkit.errors import UsageError
    from alignkit.registry import Param
    p = Param("density", float, 0.5, "Share kept.", low=0.0, high=1.0, low_open=True)
    assert p.coerce("0.25") == 0.25
    for bad, msg in [("x", "must be a number"), (0.0, "must be > 0.0"), (1.5, "must be <= 1.0"),
                     (float("nan"), "finite")]:
        with pytest.raises(UsageError, match=msg):
            p.coerce(bad)
    c = Param("sign", str, "sum", "Election.", choices=("sum", "count"))
    with pytest.raises(UsageError, match="one of sum | count"):
        c.coerce("max")
    n = Param("k", int, 2, "K.", low=1)
    assert n.coerce("3") == 3
    with pytest.raises(UsageError, match="integer"):
        n.coerce(2.5)


def test_entry_options_fill_defaults_and_refuse_flags_that_do_not_apply():
    from alignkit.errors import UsageError
    from alignkit.registry import Param, Registry
    reg = Registry("toy method", "--method")
    reg.add("a", "first", "json:dumps", params=(Param("t", float, 0.5, "T."),), lr=1e-3)
    e = reg.get("a")
    assert e.options({"t": None}) == {"t": 0.5} and e.options({"t": "0.75"}) == {"t": 0.75}
    assert e.lr == 1e-3 and e.load() is json.dumps
    with pytest.raises(UsageError, match="--beta does not apply to toy method 'a'"):
        e.options({"beta": 1.0})


# --- the scorer options group ---------------------------------------------------------

def test_score_eval_relabel_and_train_policy_share_the_scorer_options(cli):
    from alignkit.registry import params_of
    from alignkit.scorers.options import ScorerOptions
    wanted = {p.flag_name for p in params_of(ScorerOptions)}
    for command in ("score", "eval", "relabel", "train-policy"):
        missing = wanted - _flags(_help(cli, command, "--help"))
        assert not missing, (command, missing)


def test_aggregate_reaches_a_maxmin_reward_model(tmp_path, monkeypatch):
    """`--aggregate` travels from the flags to the reward-model scorer unchanged, and a
    maxmin folder without it is scored by the minimum (the MaxMin objective)."""
    from alignkit.scorers.options import ScorerOptions
    seen = []

    class FakeMixture:
        def __init__(self, aggregate):
            self.aggregate = aggregate

        def score(self, prompts, completions, users=None):
            rewards = [(1.0, 3.0)] * len(prompts)  # two reward models
            fn = {"min": min, "mean": lambda r: sum(r) / len(r), None: min}[self.aggregate]
            return [fn(r) for r in rewards]

    def fake_load(spec, user=None, aggregate=None, **kw):
        seen.append(aggregate)
        return FakeMixture(aggregate)

    folder = tmp_path / "mm"
    folder.mkdir()
    (folder / "alignkit.json").write_text(json.dumps({"rm_method": "maxmin"}))
    import alignkit.reward_models as rms
    monkeypatch.setattr(rms, "load_reward_model", fake_load)
    for aggregate, want in [("min", 1.0), ("mean", 2.0)]:
        scorer = ScorerOptions(aggregate=aggregate).build([f"rm:{folder}"])
        assert seen[-1] == aggregate
        rec = {"id": "a", "prompt": "p", "completions": [{"text": "x"}]}
        assert scorer.score_records([rec])[0]["completions"][0]["score"] == want


# --- the text layer -------------------------------------------------------------------

def test_a_two_message_completion_renders_the_same_everywhere(tiny_model):
    """Sampler log-prob ids, trainer ids, the rules checks and the reward model's input
    all see `A\\n\\nB` for a completion of two assistant messages A, B."""
    from alignkit.checks import run_checks
    from alignkit.models import load_tokenizer
    from alignkit.policy.data import Tokenization, completion_text
    from alignkit.scorers import rm_inputs
    from alignkit.text import encode_pair, render_prompt
    tok = load_tokenizer(str(tiny_model))
    two = [{"role": "assistant", "content": "First part."},
           {"role": "assistant", "content": "Second part."}]
    joined = "First part.\n\nSecond part."
    one = [{"role": "assistant", "content": joined}]
    # the sampler's (and gen-pairs' re-scoring) tokenization
    _, sampler_ids = encode_pair(tok, render_prompt(tok, "Hi"), two)
    assert sampler_ids == encode_pair(tok, render_prompt(tok, "Hi"), joined)[1]
    # a trainer's tokenization
    t = Tokenization(tok, 512)
    assert t.completion(completion_text(two)) == sampler_ids
    # the rules scorer: paragraphs count sees both messages, ends_with sees the last
    res = run_checks(two, [{"type": "min_paragraphs", "n": 2},
                           {"type": "ends_with", "phrase": "Second part."}])
    assert [r["passed"] for r in res] == [True, True]
    # the reward model's input: the same as one assistant message holding the joined text
    assert rm_inputs(tok, "Hi", two) == rm_inputs(tok, "Hi", one)
    assert joined in rm_inputs(tok, "Hi", two)


def test_text_rules_on_edge_cases():
    from alignkit.errors import DataError
    from alignkit.text import as_completion, completion_text, prompt_text
    assert completion_text("x") == "x" and completion_text([]) == ""
    assert completion_text([{"role": "assistant", "content": "a"}, {"role": "tool", "content": "r"},
                            {"role": "assistant", "content": "b"}]) == "a\n\nb"
    with pytest.raises(DataError, match="assistant messages only"):
        completion_text([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])
    assert prompt_text([{"role": "system", "content": "s"}, {"role": "user", "content": "u1"},
                        {"role": "assistant", "content": "a"}, {"role": "user", "content": "u2"}]) == "u2"
    assert as_completion("t", [{"role": "user", "content": "q"}]) == \
        [{"role": "assistant", "content": "t"}]
    with pytest.raises(DataError):
        completion_text(["not a message"])


# --- layout ---------------------------------------------------------------------------

def _modules() -> dict[str, Path]:
    out = {}
    for path in LIB.rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import in the file (module level
    and inside functions), relative imports resolved."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            names = [a.name for a in node.names]
            # `from pkg import submodule` imports the submodule
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            out.append((mod, [n for n in names if f"{mod}.{n}" not in modules], node.lineno))
            out += [(s, [], node.lineno) for s in subs]
    return out


def test_no_module_imports_another_modules_private_names():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for mod, names, line in _imports(name, path, modules):
            if mod.startswith("alignkit") and mod != name:
                bad += [f"{path.relative_to(ROOT)}:{line}: {mod}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_the_import_graph_of_alignkit_has_no_cycle():
    """Module-level imports only (an import inside a function runs on use and cannot
    deadlock the package's import); edges to a package's own __init__ from its
    submodules are kept."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        top = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
        lines = {n.lineno for n in top}
        for mod, _, line in _imports(name, path, modules):
            if line in lines and mod in modules and mod != name:
                graph[name].add(mod)
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
            if m not in state:
                visit(m)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_no_library_file_is_over_600_lines():
    long = {str(p.relative_to(ROOT)): n for p in LIB.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 600}
    assert not long, long


def test_import_alignkit_is_light_and_its_public_names_resolve():
    import subprocess
    import sys
    code = ("import sys, alignkit; assert 'torch' not in sys.modules; "
            "names = [n for n in alignkit.__all__ if n != '__version__']; "
            "[getattr(alignkit, n) for n in names if n not in ('merge', 'evaluate', "
            "'load_causal_lm', 'load_reward_model', 'build_merge', 'TrainOptions')]; "
            "print(len(names))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    import alignkit
    for n in alignkit.__all__:
        assert getattr(alignkit, n) is not None


def test_train_policy_reward_rm_aggregate_min_reaches_a_two_model_maxmin_folder(cli, tmp_path,
                                                                              tiny_model):
    """`train-policy --reward rm:MAXMIN --aggregate min`: the rewards the online trainer
    records are the per-sample minimum of the folder's two reward models, computed here
    independently with each model; `--aggregate mean` gives their mean."""
    from alignkit.reward_models import load_reward_model
    from alignkit.reward_models.synthetic import marker_pairs
    from conftest import write_jsonl
    pairs = write_jsonl(tmp_path / "pairs.jsonl", marker_pairs(32, seed=1, user_groups=[0, 1]))
    rm = tmp_path / "mm"
    r = cli(["train-rm", "--method", "maxmin", "--model", tiny_model, pairs, "-o", rm, "--k", "2",
             "--em-iters", "1", "--max-steps", "2", "--batch-size", "8", "--max-length", "48",
             "--lr", "1e-2"])
    assert r.code == 0, r
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": f"Say {i}."}
                                                 for i in range(4)])
    got = {}
    for agg in ("min", "mean"):
        out = tmp_path / f"pol-{agg}"
        r = cli(["train-policy", "--method", "grpo", "--model", tiny_model, prompts, "--reward",
                 f"rm:{rm}", "--aggregate", agg, "--max-steps", "1", "--max-new-tokens", "6",
                 "--batch-size", "8", "--sample-every", "1", "-o", out])
        assert r.code == 0, r
        recs = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
        hp = json.loads((out / "alignkit.json").read_text())["hyperparameters"]
        assert hp["aggregate"] == agg  # the choice is recorded
        got[agg] = [(rec["prompt"], c["text"], c["score"]) for rec in recs for c in rec["completions"]]
    from alignkit.reward_models.inference import seq_cls_rewards
    mix = load_reward_model(rm, aggregate="mean")
    assert len(mix.models) == 2
    for agg, rows in got.items():
        per_model = [seq_cls_rewards(m, mix.tokenizer, [p for p, _, _ in rows],
                                     [t for _, t, _ in rows], max_length=1024) for m in mix.models]
        assert any(abs(a - b) > 1e-3 for a, b in zip(*per_model))  # the two models disagree
        want = [min(v) if agg == "min" else sum(v) / len(v) for v in zip(*per_model)]
        assert [s for _, _, s in rows] == pytest.approx(want, abs=1e-4), agg
