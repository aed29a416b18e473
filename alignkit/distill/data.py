"""Records, models and token rows for distillation.

Input records: prompts (`{"prompt"}`), prompt+completion records (`{"prompt",
"completion"}`: kind "completion" for `records.detect_kind`; a file may mix them with
prompt records) or pairs (the chosen side is the given completion); string or chat. Read
through `alignkit.recordset.checked`: each record validated as its detected kind, a
pair file holds only pairs, and ids are unique in a prompt file (records.UNIQUE_ID_KINDS;
a repeated id is exit 3 at its line). Tokenization is the sampler's (`alignkit.generation`): the
prompt goes through the chat template with the assistant turn opened (`render_prompt` +
`encode_prompt`), a given completion is its text plus EOS (`encode_pair`), and sampled
completions keep their token ids. A row is `{"index", "prompt_ids", "completion_ids"}`
plus `teacher_prompt_ids` when the teacher reads another prompt (context distillation).
Rows longer than `--max-length` lose the end of their completion; a row whose prompt
alone fills it is dropped with a warning.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from .. import console
from ..errors import DataError, UsageError
from ..records import Text, text_of
from ..recordset import Records, checked


@dataclass
class DistillData(Records):
    """Validated records of one input (`recordset.Records`: path, kind, records, lines,
    sha256, split); `path` is the name messages use ("<stdin>" for '-'). `kind` is
    "pair", "completion" (every record has a completion) or "prompt"."""

    def has_completions(self) -> bool:
        return all(completion_of(r) is not None for r in self.records)


def completion_of(record: dict) -> Text | None:
    """The given completion: a pair's chosen side, or a prompt record's `completion`."""
    return record["chosen"] if "chosen" in record else record.get("completion")


KINDS = ("prompt", "pair", "completion")  # what distill reads (`records.detect_kind`)


def _family(kind: str) -> str:
    """Prompt and prompt+completion records may share a file; pairs may not."""
    return "pair" if kind == "pair" else "prompt"


def load(path: str) -> DistillData:
    """Read prompts (with or without a completion) or pairs (one of the two per file);
    DataError (exit 3) with path:line, also for a repeated id in a prompt file."""
    from ..io import read_records
    reader = read_records(path)
    records, lines, first = [], [], None

    def one_family(rec: dict, kind: str) -> None:
        if first is not None and _family(kind) != _family(first):
            raise DataError(f"a {_family(kind)} record in a file of {_family(first)} records "
                            "(one kind per file)")

    for rec, kind, line in checked(reader, KINDS, one_family):
        first = first or kind
        records.append(rec)
        lines.append(line)
    if first == "pair":
        kind = "pair"
    else:
        kind = "completion" if records and all("completion" in r for r in records) else "prompt"
    return DistillData(reader.name, kind, records, lines, reader.sha256 or "")


def split(n: int, frac: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, held-out) record indices: a seeded `frac` share held out, at least one
    record kept for training."""
    if not 0.0 <= frac < 1.0:
        raise UsageError(f"--eval-split must be in [0, 1), got {frac}")
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = min(int(round(frac * n)), n - 1)
    return sorted(idx[k:]), sorted(idx[:k])


def with_policy(tokenizer, prompt: Text, policy: str) -> Text:
    """The prompt with the policy text in its context: a system message first (prepended
    to an existing system message), or plain text before the prompt when the tokenizer
    has no chat template."""
    if not getattr(tokenizer, "chat_template", None) and isinstance(prompt, str):
        return f"{policy}\n\n{prompt}"
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if msgs and msgs[0]["role"] == "system":
        msgs[0]["content"] = f"{policy}\n\n{msgs[0]['content']}"
        return msgs
    return [{"role": "system", "content": policy}] + msgs


# --- models -------------------------------------------------------------------------------

def check_tokenizers(named: list[tuple[str, str, object]]) -> None:
    """Every (role, spec, tokenizer) must have the same vocabulary; UsageError (exit 2)."""
    role0, spec0, tok0 = named[0]
    vocab0 = tok0.get_vocab()
    for role, spec, tok in named[1:]:
        vocab = tok.get_vocab()
        if vocab != vocab0:
            differ = sum(1 for t, i in vocab.items() if vocab0.get(t) != i) + \
                sum(1 for t in vocab0 if t not in vocab)
            raise UsageError(
                f"the {role} ({spec}) and the {role0} ({spec0}) do not share a tokenizer "
                f"({len(vocab)} vs {len(vocab0)} tokens, {differ} differ): distillation "
                "compares next-token distributions over one vocabulary. Use a student with "
                "the teacher's tokenizer (--student-config hidden=64,layers=2 builds one)")


STUDENT_KEYS = {"hidden": "hidden", "layers": "layers", "heads": "heads",
                "intermediate": "intermediate"}


def parse_student_config(spec: str) -> dict:
    """'hidden=64,layers=2' -> build_tiny keyword arguments."""
    out = {}
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or key not in STUDENT_KEYS:
            raise UsageError(f"--student-config takes KEY=INT items with KEY in "
                             f"{', '.join(STUDENT_KEYS)}, got {item!r}")
        try:
            out[STUDENT_KEYS[key]] = int(value)
        except ValueError:
            raise UsageError(f"--student-config {key}: expected an integer, got {value!r}") from None
        if out[STUDENT_KEYS[key]] < 1:
            raise UsageError(f"--student-config {key} must be >= 1")
    hidden, heads = out.get("hidden", 64), out.get("heads", 4)
    if hidden % heads:
        raise UsageError(f"--student-config: hidden ({hidden}) must be a multiple of heads ({heads})")
    return out


def build_student(spec: str, teacher: str, folder: Path, seed: int) -> Path:
    """A fresh random tiny Llama with the teacher's tokenizer, in `folder` (rebuilt the
    same from the seed on --resume)."""
    import shutil

    from ..models import build_tiny
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    return build_tiny(folder, seed=seed, tokenizer_from=teacher, **parse_student_config(spec))


def logit_width(models: list, tokenizer) -> int:
    """The vocabulary width the losses compare: the smallest output size, which must
    cover the tokenizer (sizes padded beyond it are cut off)."""
    width = min(m.get_output_embeddings().weight.shape[0] for m in models)
    if width < len(tokenizer):
        raise UsageError(f"a model's output layer has {width} rows but the tokenizer has "
                         f"{len(tokenizer)} tokens")
    return width


# --- rows --------------------------------------------------------------------------------

def prompt_ids(tokenizer, prompt: Text) -> list[int]:
    from ..generation import encode_prompt, render_prompt
    return encode_prompt(tokenizer, render_prompt(tokenizer, prompt))


def require_completions(data: DistillData) -> None:
    """DataError (exit 3) at the first record without a given completion."""
    for i, rec in enumerate(data.records):
        if completion_of(rec) is None:
            raise DataError("missing: --responses given needs pairs or prompt records with a "
                            "completion", data.path, data.lines[i], "completion")


def given_completion_ids(tokenizer, data: DistillData, i: int) -> list[int]:
    from ..generation import encode_pair, render_prompt
    comp = completion_of(data.records[i])
    return encode_pair(tokenizer, render_prompt(tokenizer, data.records[i]["prompt"]), text_of(comp))[1]


def sample_ids(model, tokenizer, prompts: list[Text], keys: list[str], *, n: int, seed: int,
               cfg, desc: str = "sampling", progress=None) -> list[list[list[int]]]:
    """n sampled completions (token ids, EOS included when finished) per prompt."""
    from ..generation import SampleParams, sample
    params = SampleParams(n=n, temperature=cfg.temperature, top_p=cfg.top_p,
                          max_new_tokens=cfg.max_new_tokens, seed=seed)
    out = sample(model, tokenizer, prompts, params, keys=keys, return_ids=True,
                 progress_desc=desc, progress=progress)
    return [[c["token_ids"] for c in group] for group in out]


def make_rows(tokenizer, data: DistillData, indices: list[int],
              completions: list[list[int]] | None, max_length: int, *,
              policy: str | None = None, repeat: int = 1, what: str = "training") -> list[dict]:
    """Rows for `indices` (each repeated `repeat` times, matching `completions` in that
    order; `completions=None` leaves them out, for on-policy rows). The teacher's prompt
    carries `policy` when given."""
    rows, dropped = [], 0
    for k, i in enumerate(j for j in indices for _ in range(repeat)):
        prompt = data.records[i]["prompt"]
        p = prompt_ids(tokenizer, prompt)
        row = {"index": i, "prompt_ids": p}
        if policy is not None:
            row["teacher_prompt_ids"] = prompt_ids(tokenizer, with_policy(tokenizer, prompt, policy))
        if completions is not None:
            room = max_length - len(p)
            if room < 1:
                dropped += 1
                continue
            row["completion_ids"] = list(completions[k][:room])
        elif len(p) >= max_length:
            dropped += 1
            continue
        rows.append(row)
    if dropped:
        console.warn(f"{dropped} {what} record(s) whose prompt fills --max-length {max_length} "
                     "tokens were skipped")
    if indices and not rows:
        raise UsageError(f"every {what} prompt is longer than --max-length {max_length}")
    return rows
