"""MPO (Meta Policy Optimization, arXiv 2504.20157; ALGORITHMS.md Part D §6): online
training against an LLM judge whose rubric is rewritten during training by a
meta-judge, to close the loopholes the policy exploits (reward hacking) instead of
hand-tuning the rubric.

`train-policy --method grpo --reward judge:MODEL --rubric FILE --meta-judge MODEL
--meta-every K` (any online method): every K optimizer steps (`MPOCallback.on_step_end`,
a `transformers.TrainerCallback`) the meta-judge model (a local chat model, loaded once;
the judge's own model when it names the same folder) reads

- the current rubric (the judge scorer's `default_rubric`, the `--rubric` one), and
- up to `--meta-samples` completions of the last rollout with their judge scores (the
  judge scorer's `last_scored`: every completion of its last reward call that was graded
  with that rubric), drawn uniformly with a seed of (--seed, step) and shown best score
  first,

in `META_TEMPLATE` (through its chat template, the answer pre-filled with "1.") and
writes an improved numbered rubric: keep what works, tighten items whose high scores
look exploited (long, repetitive, evasive answers), add items that close loopholes. The
answer is parsed by `alignkit.rubrics.parse_rubric_list` (the list parser of
gen-rubrics; an answer cut at the token limit loses its last item); when nothing
parses, the old rubric stays. A new rubric replaces the judge's (`JudgeScorer.set_rubric`)
and is used by every later reward call. Records with their own `meta.rubric` keep it
(only the shared `--rubric` rubric evolves, so `--rubric` is required). With several
`judge:` rewards the first one's rubric evolves.

`OUT/rubrics.jsonl` holds one line per version, `{"version", "step", "rubric",
"reason"}`: version 0 is the initial rubric at step 0; version v the rubric that took
effect after optimizer step `step` (a multiple of K; the rollouts after it are scored
with it). `--resume` keeps the versions up to the checkpoint's step and restores the
last of them. With several processes the rows are gathered, the main process runs the
meta-judge and the new rubric is broadcast. metrics.jsonl gets `mpo/rubric_version`.

Simplified against the paper: MPO's meta reward model runs three prompts (per-sample
meta-analysis of the grader's scores, rubric refinement, and a merge of the refined
rubrics into one, with optional prescreening) over PPO rollouts and its judge sums
graded sub-scores; here ONE refinement prompt sees a sample of the last rollout at once,
the judge stays alignkit's yes/no P(yes) judge, and the policy is trained by any
online method (GRPO by default). The prompt wording is our own.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, Callable

from .. import console
from ..errors import UsageError
from ..registry import Param
from ..text import completion_text, render_prompt, transcript

META_JUDGE = Param("meta_judge", str, None, "MPO (simplified: one refinement prompt, not the "
                   "paper's meta-analysis/refine/merge): a local chat model that rewrites the "
                   "judge's --rubric every --meta-every steps from the last rollout's judged "
                   "completions; needs --reward judge:MODEL and --rubric. History: "
                   "OUT/rubrics.jsonl.", metavar="MODEL")
META_EVERY = Param("meta_every", int, 10, "--meta-judge: rewrite the rubric after every N "
                   "optimizer steps (the paper's default interval: 10).", low=1)
META_SAMPLES = Param("meta_samples", int, 8, "--meta-judge: completions of the last rollout "
                     "shown to the meta-judge (uniform sample; the paper: 20).", low=1)
META_TEMPERATURE = Param("meta_temperature", float, 0.7, "--meta-judge: sampling temperature "
                         "of the meta-judge's answer (0: greedy).", low=0.0)
PARAMS = (META_JUDGE, META_EVERY, META_SAMPLES, META_TEMPERATURE)

HISTORY = "rubrics.jsonl"
MAX_ITEMS = 8             # rubric items kept from an answer
MAX_NEW_TOKENS = 384      # tokens of the meta-judge's answer
MAX_SHOWN_CHARS = 600     # each instruction / response is cut to this in the prompt
PREFILL = "1."

META_TEMPLATE = (
    "You are a senior instructor checking the rubric of a junior grader. The grader scores "
    "each response of a student model by answering one yes/no question per rubric item; "
    "the score (0 to 1) is the mean probability of 'yes' over the principles, and 0 when a "
    "hard rule fails.\n\nCurrent rubric:\n{rubric}\n\nRecent responses with the grader's "
    "scores, best first:\n\n{samples}\n\nFind responses that score high without deserving "
    "it (for example long, repetitive, off-topic or evasive answers) and criteria that miss "
    "the purpose of the task. Write an improved rubric: keep the items that work, tighten "
    "the items that are exploited, add items that close the loopholes. Each item is one "
    "short sentence about a single response that can be answered with yes or no. Begin "
    "explicit requirements with 'Hard rule:' and general qualities with 'Principle:'. "
    "Answer with the numbered list only, at most {max_items} items.")


def _cut(text: str, n: int = MAX_SHOWN_CHARS) -> str:
    return text if len(text) <= n else text[:n] + " [...]"


def format_rubric(rubric: list[dict]) -> str:
    """`1. Hard rule: X` / `2. Principle: Y` lines (the list format the parser reads)."""
    kind = {"hard": "Hard rule", "principle": "Principle"}
    return "\n".join(f"{i}. {kind[r['kind']]}: {r['text']}" for i, r in enumerate(rubric, 1))


def meta_prompt(rubric: list[dict], rows: list[dict], max_items: int = MAX_ITEMS) -> str:
    """The meta-judge's instruction (before its chat template): the rubric and the rows
    ({prompt, completion, score}) best score first."""
    rows = sorted(rows, key=lambda r: -r["score"])
    samples = "\n\n".join(
        f"Sample {i} (score {r['score']:.2f}):\nInstruction: {_cut(transcript(r['prompt']))}\n"
        f"Response: {_cut(completion_text(r['completion']))}" for i, r in enumerate(rows, 1))
    return META_TEMPLATE.format(rubric=format_rubric(rubric), samples=samples or "(none)",
                                max_items=max_items)


def step_seed(seed: int, step: int) -> int:
    digest = hashlib.sha256(f"{seed}\x00mpo\x00{step}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


def pick_rows(rows: list[dict], n: int, seed: int) -> list[dict]:
    """Up to n of the rows graded with the shared rubric, uniformly (seeded)."""
    rows = [r for r in rows if r.get("default_rubric", True)]
    if len(rows) <= n:
        return list(rows)
    return random.Random(seed).sample(rows, n)


# --- the meta-judge ---------------------------------------------------------------------------

# meta(instruction text, seed) -> (answer text, finished)
Meta = Callable[[str, int], tuple]


def model_meta(model, tokenizer, temperature: float) -> Meta:
    """A Meta sampling `model`'s answer through its chat template, pre-filled with "1."."""
    def meta(text: str, seed: int) -> tuple:
        from ..generation import SampleParams, sample
        params = SampleParams(n=1, temperature=temperature, max_new_tokens=MAX_NEW_TOKENS,
                              seed=seed, batch_size=1)
        row = sample(model, tokenizer, [render_prompt(tokenizer, text) + PREFILL], params,
                     raw=True, keys=["mpo"], progress_desc="meta-judge")[0][0]
        return PREFILL + row["text"], row["finished"]
    return meta


def refine(judge, meta: Meta, rows: list[dict], seed: int) -> list[dict] | None:
    """One meta-judge call: the new rubric, or None when its answer parses to nothing."""
    from ..rubrics import parse_rubric_list
    text, finished = meta(meta_prompt(judge.default_rubric, rows), seed)
    items = parse_rubric_list(text or "", MAX_ITEMS, truncated=not finished)
    return items or None


# --- the history and the callback -------------------------------------------------------------

def _history_callback():
    from transformers import TrainerCallback

    class MPOCallback(TrainerCallback):
        """Rewrites `judge`'s rubric every `every` optimizer steps (see the module
        docstring) and keeps `work/rubrics.jsonl`."""

        def __init__(self, judge, meta: Meta, work: Path, every: int, samples: int = 8,
                     seed: int = 0, trainer: Any = None):
            self.judge, self.meta, self.every, self.samples = judge, meta, every, samples
            self.seed, self.trainer = seed, trainer
            self.path = Path(work) / HISTORY
            self.history: list[dict] = []

        def _write(self) -> None:
            from ..io import atomic_file, dumps
            with atomic_file(self.path) as f:
                for line in self.history:
                    f.write(dumps(line) + "\n")

        def _main(self) -> bool:
            return self.trainer is None or self.trainer.accelerator.is_main_process

        def on_train_begin(self, args, state, control, **kwargs):
            step = state.global_step
            if step > 0 and self.path.exists():  # --resume: the versions up to the checkpoint
                lines = [json.loads(x) for x in self.path.read_text(encoding="utf-8").splitlines()
                         if x.strip()]
                self.history = [x for x in lines if x["step"] <= step]
            if self.history:
                self.judge.set_rubric(self.history[-1]["rubric"])
            else:
                self.history = [{"version": 0, "step": 0, "rubric": self.judge.default_rubric,
                                 "reason": "initial rubric (--rubric)"}]
            if self._main():
                self._write()

        def on_step_end(self, args, state, control, **kwargs):
            step = state.global_step
            if step > 0 and step % self.every == 0:
                self.update(step)
            if self.trainer is not None:  # every step, so each logging step has it
                self.trainer._metrics["train"]["mpo/rubric_version"].append(
                    float(self.history[-1]["version"]) if self.history else 0.0)

        def update(self, step: int) -> bool:
            """One meta-judge call after optimizer step `step`; True if the rubric changed."""
            rows = list(self.judge.last_scored)
            acc = self.trainer.accelerator if self.trainer is not None else None
            multi = acc is not None and acc.num_processes > 1
            if multi:
                from accelerate.utils import broadcast_object_list, gather_object
                rows = gather_object(rows)
            box = [None]
            if self._main():
                picked = pick_rows(rows, self.samples, step_seed(self.seed, step))
                new = refine(self.judge, self.meta, picked, step_seed(self.seed, step) + 1)
                if new is not None:
                    mean = sum(r["score"] for r in picked) / max(1, len(picked))
                    box = [(new, f"meta-judge refinement of version "
                                 f"{self.history[-1]['version']} from {len(picked)} completions "
                                 f"(mean judge score {mean:.3f})")]
            if multi:
                broadcast_object_list(box)
            if box[0] is None:
                console.debug(f"mpo: step {step}: the meta-judge's answer gave no rubric items; "
                              "keeping the current rubric")
                return False
            new, reason = box[0]
            self.judge.set_rubric(new)
            self.history.append({"version": self.history[-1]["version"] + 1, "step": step,
                                 "rubric": self.judge.default_rubric, "reason": reason})
            if self._main():
                self._write()
            return True

    return MPOCallback


def MPOCallback(*args, **kwargs):
    """The callback (transformers is imported only when one is built)."""
    return _history_callback()(*args, **kwargs)


# --- the command's side -----------------------------------------------------------------------

def check(options: dict, specs: list[str], rubric: Any) -> None:
    """--meta-judge needs a judge reward and --rubric; the other --meta-* need --meta-judge.
    UsageError (exit 2) before any model loads."""
    if not options.get("meta_judge"):
        given = [p.flag_name for p in PARAMS[1:] if options.get(p.name, p.default) != p.default]
        if given:
            raise UsageError(f"{', '.join(given)} needs --meta-judge MODEL")
        return
    if not any(s.split(":", 1)[0] == "judge" for s in specs):
        raise UsageError("--meta-judge rewrites the judge's rubric: it needs a judge reward "
                         f"(--reward judge:MODEL); the rewards are {', '.join(specs)}")
    if rubric is None:
        raise UsageError("--meta-judge evolves the --rubric rubric: give --rubric FILE (the "
                         "initial rubric; records' own meta.rubric is not rewritten)")


def attach(trainer, options: dict, scorer, work: Path, seed: int):
    """Add the MPO callback to `trainer` when --meta-judge is given (else None). The
    meta-judge is loaded once, through the judge's model cache (the same spec as the
    judge's model reuses it)."""
    spec = options.get("meta_judge")
    if not spec:
        return None
    from ..scorers.base import load_model
    from ..scorers.judge import JudgeScorer
    judge = next(s for s in scorer.scorers if isinstance(s, JudgeScorer))
    model, tok = load_model(judge.options, spec, "causal")
    cb = MPOCallback(judge, model_meta(model, tok, options["meta_temperature"]), work,
                     options["meta_every"], options["meta_samples"], seed, trainer)
    trainer.add_callback(cb)
    return cb
