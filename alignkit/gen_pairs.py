"""The `gen-pairs` pipeline: prompts in, samples (or pair) records out.

Built on the sampler in `alignkit.generation`: samples records, and the pairing modes of
DESIGN.md / ALGORITHMS.md (given answer vs a reference sample, the Nash-MD / IPO-MD
geometric mixture, context-contrast negatives), plus `--shard` and `--resume-from`.
torch and transformers are imported inside functions only.
"""
from __future__ import annotations

import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from . import console
from .errors import DataError, UsageError
from .generation import (SampleParams, check_same_vocab, pad_id, completion_logps,
                         encode_prompt, render_prompt, sample, token_logps)
from .engines import EngineOptions
from .records import Text
from .text import as_completion, completion_text as text_of

# ======================================================================================
# The gen-pairs pipeline
# ======================================================================================

MODES = ("samples", "reference", "mixture", "contrast")
_DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")


@dataclass
class GenPairsOptions:
    """Everything `alignkit gen-pairs` asks for (see the command's help)."""
    model: str | None = None
    params: SampleParams = field(default_factory=SampleParams)
    dtype: str = "auto"
    system: str | None = None
    raw: bool = False
    engines: EngineOptions = field(default_factory=EngineOptions)
    pair_with_reference: str | None = None
    mixture: str | None = None
    alpha: float | None = None
    contrast_prompt: str | None = None
    shard: tuple[int, int] | None = None
    resume_from: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False
    value_guides: list = field(default_factory=list)  # [{"dir", "beta"}] (--value-guide)

    @property
    def mode(self) -> str:
        if self.pair_with_reference:
            return "reference"
        if self.mixture:
            return "mixture"
        if self.contrast_prompt:
            return "contrast"
        return "samples"

    @property
    def sampler_spec(self) -> str:
        """The model that samples: REF in --pair-with-reference mode, else --model."""
        return self.pair_with_reference or self.model  # type: ignore[return-value]

    def check(self) -> "GenPairsOptions":
        modes = [f for f, v in (("--pair-with-reference", self.pair_with_reference),
                                ("--mixture", self.mixture),
                                ("--contrast-prompt", self.contrast_prompt)) if v]
        if len(modes) > 1:
            raise UsageError(f"choose one pairing mode, not {' and '.join(modes)}")
        if self.pair_with_reference and self.model and self.model != self.pair_with_reference:
            raise UsageError("--pair-with-reference REF samples from REF; drop --model "
                             "(or give the same model)")
        if not self.sampler_spec:
            raise UsageError("--model is required (or --pair-with-reference REF)")
        if self.alpha is not None and not self.mixture:
            raise UsageError("--alpha only applies with --mixture REF")
        if self.mixture:
            if self.alpha is None:
                self.alpha = 0.5
            if not 0.0 <= self.alpha <= 1.0:
                raise UsageError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.engines.uses_vllm and self.mode != "samples":
            raise UsageError(f"--engine {self.engines.engine} supports plain sampling only; pairing "
                             "modes (--pair-with-reference, --mixture, --contrast-prompt) need --engine hf")
        self.engines.check()
        if self.value_guides and self.engines.uses_vllm:
            raise UsageError("--value-guide needs --engine hf")
        if self.dtype not in _DTYPES:
            raise UsageError(f"--dtype must be one of {', '.join(_DTYPES)}, got {self.dtype!r}")
        if self.system and self.raw:
            raise UsageError("--system needs the chat template; it cannot be used with --raw")
        if self.contrast_prompt is not None and not self.contrast_prompt.strip():
            raise UsageError("--contrast-prompt needs a meta field name")
        self.params.check()
        return self


# --- input records ----------------------------------------------------------------------------

def given_answer(record: dict):
    """The prompt record's given answer: `meta.chosen`, else a top-level `chosen`."""
    meta = record.get("meta")
    if isinstance(meta, dict) and meta.get("chosen") is not None:
        return meta["chosen"]
    return record.get("chosen")


def _check_text(value, field_name: str) -> None:
    from .records import check_text
    check_text(value, field_name)


def remove_context(prompt: Text, context) -> Text:
    """The prompt with the context string(s) cut out (whitespace tidied)."""
    parts = [context] if isinstance(context, str) else list(context)

    def cut(s: str) -> str:
        # mark each cut, then join its two sides with the whitespace they need: a blank
        # line where the cut touched a line break, else one space; the rest is untouched
        for c in parts:
            s = re.sub(r"[ \t]*" + re.escape(c) + r"[ \t]*", "\x00", s)
        s = re.sub(r"\n*(?:\x00\n*)+", lambda m: "\n\n" if "\n" in m.group(0) else " ", s)
        return s.strip()

    if isinstance(prompt, str):
        return cut(prompt)
    return [{**m, "content": cut(m["content"])} for m in prompt]


def _check_context(record: dict, field_name: str) -> None:
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    ctx = meta.get(field_name)
    where = f"meta.{field_name}"
    if ctx is None:
        raise DataError(f"missing: --contrast-prompt {field_name} needs the context to remove",
                        field=where)
    parts = [ctx] if isinstance(ctx, str) else ctx
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p for p in parts):
        raise DataError("expected a non-empty string or list of strings", field=where)
    full = record["prompt"] if isinstance(record["prompt"], str) else \
        "\n".join(m["content"] for m in record["prompt"])
    for p in parts:
        if p not in full:
            raise DataError("context not found in the prompt", field=where)


def read_prompts(path: str, opts: GenPairsOptions) -> tuple[list[dict], str | None]:
    """Validated prompt records of the shard, checked for the mode's needs up front
    (so bad data fails before a model is loaded). Returns (records, input sha256)."""
    from .io import in_shard, read_records
    reader = read_records(path, "prompt", unique_ids=True)
    records = []
    for rec in reader:
        try:
            if opts.mode == "reference":
                ans = given_answer(rec)
                if ans is None:
                    raise DataError("missing: --pair-with-reference needs the given answer "
                                    "(meta.chosen or chosen)", field="chosen")
                _check_text(ans, "meta.chosen" if isinstance(rec.get("meta"), dict)
                            and "chosen" in rec["meta"] else "chosen")
            elif opts.mode == "contrast":
                _check_context(rec, opts.contrast_prompt)  # type: ignore[arg-type]
                ans = given_answer(rec)
                if ans is not None:
                    _check_text(ans, "chosen")
        except DataError as e:
            raise e.at(reader.name, reader.line) from None
        if in_shard(rec["id"], opts.shard):
            records.append({"id": rec["id"], **rec})  # a derived id goes first too
    return records, reader.sha256


# --- resume -------------------------------------------------------------------------------------

def _prompt_id(rec: dict) -> str:
    return rec.get("prompt_id", rec.get("id"))


def _iter_resume_lines(path: str):
    """(line number, raw line, record) of an earlier output; a truncated or broken last
    line is skipped with a warning, a broken line elsewhere is a DataError."""
    from .io import parse_json_line
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    for i, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            rec = parse_json_line(raw.rstrip(b"\r\n"))
            if not isinstance(rec, dict) or not isinstance(rec.get("id"), str):
                raise DataError("expected a record with a string id")
        except DataError as e:
            if i == len(lines):
                console.warn(f"{path}:{i}: ignoring the truncated last line ({e.problem})")
                return
            raise e.at(path, i) from None
        yield i, raw if raw.endswith(b"\n") else raw + b"\n", rec


def resume_state(path: str | None, per_prompt: int) -> set[str]:
    """Prompt ids complete in an earlier output (all `per_prompt` records present).
    A missing file means nothing is done yet (a cron job's first run)."""
    if not path:
        return set()
    if not Path(path).exists():
        console.info(f"--resume-from {path}: no such file yet; starting from the beginning")
        return set()
    counts: dict[str, int] = {}
    for _, _, rec in _iter_resume_lines(path):
        pid = _prompt_id(rec)
        counts[pid] = counts.get(pid, 0) + 1
    return {pid for pid, c in counts.items() if c >= per_prompt}


# --- building records --------------------------------------------------------------------------

def _given_completion(ans, prompt: Text):
    return as_completion(text_of(ans), prompt) if isinstance(ans, str) != isinstance(prompt, str) else ans


def _gen_block(opts: GenPairsOptions, spec: str, sha: str, **extra) -> dict:
    p = opts.params
    gen = {"model": spec, "model_sha256": sha, "temperature": p.temperature, "top_p": p.top_p,
           "max_new_tokens": p.max_new_tokens, "seed": p.seed, "top_k": p.top_k, "n": p.n,
           "dtype": opts.dtype, "engine": opts.engines.record_name}
    if opts.system:
        gen["system"] = opts.system
    if opts.raw:
        gen["raw"] = True
    gen.update(extra)
    return gen


def _completion_entry(s: dict, prompt: Text, extra_keys=("logp_ref", "logp_mix")) -> dict:
    entry = {"text": as_completion(s["text"], prompt), "logp": s["logp"],
             "n_tokens": s["n_tokens"], "finished": s["finished"]}
    entry.update({k: s[k] for k in extra_keys if k in s})
    return entry


def _pair_records(rec: dict, chosen: list, rejected: list, lp_c: list, lp_r: list,
                  gen: dict, n: int, fin_c: list | None = None,
                  fin_r: list | None = None) -> list[dict]:
    """n pair records of one prompt; `fin_*` are the sides' finished flags (None: a given
    answer, finished), written as finished_chosen/finished_rejected when a side was cut."""
    out = []
    for j in range(n):
        r = {**rec, "chosen": chosen[j], "rejected": rejected[j],
             "ref_logp_chosen": lp_c[j], "ref_logp_rejected": lp_r[j], "gen": gen}
        fc = True if fin_c is None else bool(fin_c[j])
        fr = True if fin_r is None else bool(fin_r[j])
        if not (fc and fr):
            r["finished_chosen"], r["finished_rejected"] = fc, fr
        if n > 1:
            r = {"id": f"{rec['id']}-{j}", "prompt_id": rec["id"],
                 **{k: v for k, v in r.items() if k != "id"}}
        out.append(r)
    return out


class _Pipeline:
    """Loads the models once and turns chunks of prompt records into output records."""

    def __init__(self, opts: GenPairsOptions):
        from .models import load_causal_lm, load_tokenizer, model_sha256
        self.opts = opts
        spec = opts.sampler_spec
        self.spec, self.sha = spec, model_sha256(spec)
        self.ref = self.engine = None
        device = _auto_device()
        if opts.engines.uses_vllm:
            from .engines import open_engine
            self.model, self.tok = None, load_tokenizer(spec, opts.trust_remote_code)
            self.engine = open_engine(opts.engines, spec, self.tok, dtype=opts.dtype,
                                      seed=opts.params.seed,
                                      trust_remote_code=opts.trust_remote_code)
        else:
            self.model, self.tok = load_causal_lm(
                spec, opts.dtype, allow_pickle=opts.allow_pickle,
                trust_remote_code=opts.trust_remote_code, device=device, merged=True)
        extra: dict[str, Any] = {}
        if opts.mode == "mixture":
            self.ref, _ = load_causal_lm(opts.mixture, opts.dtype, allow_pickle=opts.allow_pickle,
                                         trust_remote_code=opts.trust_remote_code, device=device,
                                         merged=True)
            check_same_vocab(self.model, self.ref)
            extra["mixture"] = {"ref": opts.mixture, "ref_sha256": model_sha256(opts.mixture),
                                "alpha": opts.alpha}
        elif opts.mode == "reference":
            extra["pairing"] = "reference"
        elif opts.mode == "contrast":
            extra["pairing"] = "contrast"
            extra["contrast_field"] = opts.contrast_prompt
        self.guides = None
        if opts.value_guides:
            from .reward_models.value import load_guides
            self.guides = load_guides(opts.value_guides, self.model, opts.dtype)
            extra["value_guides"] = [dict(g) for g in opts.value_guides]
        self.gen = _gen_block(opts, spec, self.sha, **extra)
        self.tokens = 0
        self.retokenized = 0  # samples re-scored on their text's own tokens
        self.has_template = bool(getattr(self.tok, "chat_template", None))

    def _render(self, prompt: Text) -> str:
        return render_prompt(self.tok, prompt, self.opts.system, self.opts.raw)

    def _sample(self, prompts: list, keys: list[str], task) -> list[list[dict]]:
        o = self.opts
        if self.engine is not None:
            res = self.engine.sample(prompts, o.params, system=o.system, raw=o.raw, keys=keys)
            task.advance(len(prompts))
        else:
            res = sample(self.model, self.tok, prompts, o.params, system=o.system, raw=o.raw,
                         ref_model=self.ref, alpha=o.alpha or 0.0, keys=keys, return_ids=True,
                         progress=task, guides=self.guides)
        self._retokenize(prompts, res)
        self.tokens += sum(s["n_tokens"] for group in res for s in group)
        return res

    def _retokenize(self, prompts: list, res: list[list[dict]]) -> None:
        """Make each sample's `logp` the log-prob of its text as trainers tokenize it.

        A sampler can emit a token sequence that is not the tokenizer's own encoding of
        the decoded text (a word split unusually, a special token that decoding drops);
        trainers re-tokenize the text, so that sample's `logp` would be off by a few
        nats and spoil the reference values it stands in for. Those samples (189 of the
        demo's 1280 SmolLM2 samples) are re-scored by teacher forcing on the text's own
        tokens, in one batched pass; `token_ids` follows; a mixture's `logp_mix` is
        dropped. The vLLM engine's samples take the same path, teacher-forced through
        the same engine (`VllmEngine.completion_logps`, the same tokenization)."""
        fix = []
        for i, group in enumerate(res):
            for s in group:
                ids = s["token_ids"]
                content = ids[:-1] if s["finished"] and ids else ids
                own = list(self.tok(s["text"], add_special_tokens=False)["input_ids"])
                if own != list(content):
                    fix.append((i, s, own))
        if not fix:
            return
        rendered = [self._render(prompts[i]) for i, _, _ in fix]
        texts = [s["text"] for _, s, _ in fix]
        eos = [bool(s["finished"]) for _, s, _ in fix]
        bs = self.opts.params.batch_size
        if self.engine is not None:
            lp = self.engine.completion_logps(rendered, texts, add_eos=eos)
        else:
            lp = completion_logps(self.model, self.tok, rendered, texts, add_eos=eos, batch_size=bs)
        lp_ref = (completion_logps(self.ref, self.tok, rendered, texts, add_eos=eos, batch_size=bs)
                  if self.ref is not None else None)
        for j, (_, s, own) in enumerate(fix):
            s["logp"] = lp[j]
            s["token_ids"] = own + [self.tok.eos_token_id] if s["finished"] else own
            if lp_ref is not None and "logp_ref" in s:
                s["logp_ref"] = lp_ref[j]
            s.pop("logp_mix", None)
        self.retokenized += len(fix)

    def process(self, records: list[dict], task) -> list[dict]:
        mode = self.opts.mode
        keys = [r["id"] for r in records]
        if mode in ("samples", "mixture"):
            groups = self._sample([r["prompt"] for r in records], keys, task)
            return [{**rec, "completions": [_completion_entry(s, rec["prompt"]) for s in group],
                     "gen": self.gen} for rec, group in zip(records, groups)]
        if mode == "reference":
            return self._reference_pairs(records, keys, task)
        return self._contrast_pairs(records, keys, task)

    def _score_given(self, records: list[dict], answers: list) -> list[float]:
        rendered = [self._render(r["prompt"]) for r in records]
        return completion_logps(self.model, self.tok, rendered, answers,
                                batch_size=self.opts.params.batch_size)

    def _reference_pairs(self, records, keys, task) -> list[dict]:
        """Given answer vs reference sample (SPIN-style data: chosen = the given answer,
        rejected = a sample from REF); both sides' log-probabilities under REF. This is
        not SePPO: SePPO draws its references from past policy checkpoints during
        training and flips the label by the anchor's likelihood."""
        n = self.opts.params.n
        groups = self._sample([r["prompt"] for r in records], keys, task)
        answers = [given_answer(r) for r in records]
        lp_given = self._score_given(records, answers)
        out = []
        for rec, group, ans, lp in zip(records, groups, answers, lp_given):
            chosen = [_given_completion(ans, rec["prompt"])] * n
            rejected = [as_completion(s["text"], rec["prompt"]) for s in group]
            out += _pair_records(rec, chosen, rejected, [lp] * n, [s["logp"] for s in group],
                                 self.gen, n, fin_r=[s["finished"] for s in group])
        return out

    def _contrast_pairs(self, records, keys, task) -> list[dict]:
        """Hallucination-style negatives: rejected = a sample with the context removed,
        chosen = a sample with the full prompt (or the given answer); both scored under
        the full prompt."""
        field_name, n = self.opts.contrast_prompt, self.opts.params.n
        reduced = [remove_context(r["prompt"], r["meta"][field_name]) for r in records]
        neg = self._sample(reduced, [f"{k}\x00contrast" for k in keys], task)
        answers = [given_answer(r) for r in records]
        need = [i for i, a in enumerate(answers) if a is None]
        pos_groups = dict(zip(need, self._sample([records[i]["prompt"] for i in need],
                                                 [keys[i] for i in need], console.NullTask())))
        given_lp = dict(zip(
            [i for i, a in enumerate(answers) if a is not None],
            self._score_given([r for r, a in zip(records, answers) if a is not None],
                              [a for a in answers if a is not None])))
        # the negatives were sampled under the reduced prompt: rescore under the full one
        full_ids = [encode_prompt(self.tok, self._render(r["prompt"])) for r in records]
        neg_lp = token_logps(self.model, [(full_ids[i], s["token_ids"]) for i, g in enumerate(neg)
                                          for s in g],
                             batch_size=self.opts.params.batch_size * n, pad_id=pad_id(self.tok))
        out = []
        for i, rec in enumerate(records):
            p = rec["prompt"]
            rejected = [as_completion(s["text"], p) for s in neg[i]]
            lp_r = [float(sum(x)) for x in neg_lp[i * n:(i + 1) * n]]
            fin_c = None
            if i in pos_groups:
                chosen = [as_completion(s["text"], p) for s in pos_groups[i]]
                lp_c = [s["logp"] for s in pos_groups[i]]
                fin_c = [s["finished"] for s in pos_groups[i]]
            else:
                chosen = [_given_completion(answers[i], p)] * n
                lp_c = [given_lp[i]] * n
            out += _pair_records(rec, chosen, rejected, lp_c, lp_r, self.gen, n, fin_c=fin_c,
                                 fin_r=[s["finished"] for s in neg[i]])
        return out

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None


def _auto_device() -> str | None:
    import torch
    return "cuda" if torch.cuda.is_available() else None


def run_gen_pairs(input_path: str, output: str, opts: GenPairsOptions,
                  chunk_prompts: int | None = None) -> dict:
    """The whole `gen-pairs` command: read, skip what --resume-from has, sample in
    chunks (records are written and flushed chunk by chunk, in input order), write the
    manifest. Returns the manifest's counts."""
    from .io import RecordWriter, check_output_file, manifest, write_manifest
    started = time.time()
    opts.check()
    if output != "-":
        check_output_file(output)  # before the prompts are read or a model is loaded
    records, in_sha = read_prompts(input_path, opts)
    per_prompt = opts.params.n if opts.mode in ("reference", "contrast") else 1
    done = resume_state(opts.resume_from, per_prompt)
    wanted = {r["id"] for r in records}
    todo = [r for r in records if r["id"] not in done]
    if done:
        console.info(f"--resume-from: {len(wanted & done)} prompt(s) already done, {len(todo)} to go")
    pipe = _Pipeline(opts) if todo else None
    chunk = chunk_prompts or max(opts.params.batch_size * 4, 64)
    copied = written = 0
    t_sample = 0.0
    try:
        with RecordWriter(output) as w:
            if done:
                for _, raw, rec in _iter_resume_lines(opts.resume_from):  # type: ignore[arg-type]
                    pid = _prompt_id(rec)
                    if pid in done and pid in wanted:
                        w.write(rec)
                        copied += 1
            if pipe is not None:
                with console.progress("gen-pairs", total=len(todo)) as task:
                    for start in range(0, len(todo), chunk):
                        t0 = time.time()
                        out = pipe.process(todo[start:start + chunk], task)
                        t_sample += time.time() - t0
                        w.write_all(out)
                        written += len(out)
                        if output == "-":
                            sys.stdout.flush()  # a redirect keeps whole chunks for --resume-from
    finally:
        if pipe is not None:
            pipe.close()  # the vLLM engine's memory (and threads) go back
    tokens = pipe.tokens if pipe else 0
    counts = {"prompts": len(records), "prompts_sampled": len(todo), "records_copied": copied,
              "records_written": written, "tokens": tokens,
              "samples_rescored": pipe.retokenized if pipe else 0}
    inputs = {input_path: in_sha or ""}
    if pipe is not None:
        inputs[f"model:{pipe.spec}"] = pipe.sha
        if opts.mixture:
            inputs[f"ref:{opts.mixture}"] = pipe.gen["mixture"]["ref_sha256"]
    write_manifest(output, manifest(
        inputs=inputs, seed=opts.params.seed, counts=counts, started=started,
        mode=opts.mode, gen=pipe.gen if pipe else None,
        tokens_per_s=round(tokens / t_sample, 2) if t_sample else None,
        options={**{k: v for k, v in asdict(opts).items() if k not in ("params", "engines")},
                 **asdict(opts.engines)}))
    return counts
