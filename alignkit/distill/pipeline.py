"""One distillation run: flags -> models -> rows -> held-out metric -> train -> output.

Order of the checks: flags and records first (exit 2 / exit 3), then the tokenizers of
every model (exit 2 when they differ), then the work folder (`OUT.partial/`), so a wrong
call leaves nothing behind. The held-out metric (`--eval-split` of the records, the
method's own per-token divergence to its teacher on the held-out responses) is measured
before and after training and written to stderr and `OUT/alignkit.json`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from .. import console
from ..errors import UsageError
from ..registry import Entry, params_of
from . import DISTILL, FRESH_STUDENT_LR, DistillConfig
from .data import (DistillData, build_student, check_tokenizers, given_completion_ids, load,
                   logit_width, make_rows, parse_student_config, require_completions,
                   sample_ids, split, with_policy)


class _Quiet:
    """A progress task that shows nothing (on-policy sampling inside the training bar)."""

    def advance(self, n: int = 1, **fields) -> None:
        pass


def resolve_config(m: Entry, cfg: DistillConfig, data: DistillData) -> DistillConfig:
    """Fill the method's defaults and check the flags against the method and the data."""
    c = dataclasses.replace(cfg)
    for p in params_of(DistillConfig):  # the shared flags (also when given as a library call)
        p.coerce(getattr(c, p.name))
    if not c.teacher:
        raise UsageError("--teacher is required")
    given = m.options(cfg.params)  # a flag of another method is a UsageError
    for name in m.requires:
        if given[name] is None:
            p = m.param(name)
            raise UsageError(f"--method {m.name} needs {p.flag_name} ({p.help[0].lower()}"
                             f"{p.help[1:].rstrip('.')})")
    if c.student and c.student_config:
        raise UsageError("give --student or --student-config, not both")
    if c.student_config:
        parse_student_config(c.student_config)
    if not c.student and not c.student_config:
        if not m.student_is_teacher:
            raise UsageError("--student (a folder or embedded name) or --student-config "
                             "(a fresh small student) is required")
        c.student = c.teacher
    if c.responses is None:
        c.responses = m.responses
        if c.responses == "given" and not data.has_completions():
            c.responses = "teacher"
    if c.responses == "student" and not m.on_policy:
        raise UsageError(f"--method {m.name}: on-policy training is --lmbda (the share of "
                         "student-generated batches), not --on-policy")
    defaults = {**m.method_defaults, **(m.student_defaults if c.responses == "student" else {})}
    if c.temperature is None:
        c.temperature = defaults["temperature"]
    for name, v in given.items():
        if v is None and name in defaults:
            given[name] = defaults[name]
    for name, (lo, hi) in m.ranges.items():
        if not lo <= given[name] <= hi:
            raise UsageError(f"{m.param(name).flag_name} must be in [{lo:g}, {hi:g}] for "
                             f"{m.name}, got {given[name]}")
    # every declared parameter: the method's values, the declared default for the others
    c.params = {**{n: p.default for n, p in DISTILL.params().items()}, **given}
    return c


def _read_policy(path: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--policy {path}: no such file")
    text = p.read_text(encoding="utf-8").strip()
    if not text:
        raise UsageError(f"--policy {path}: the file is empty")
    return text


def train(data_path: str, out: str, opts, cfg: DistillConfig) -> dict:
    """Distil a student into `out` (see the package docstring); returns the held-out
    metric {"metric", "before", "after", "responses", "tokens"}."""
    started = time.time()
    m = DISTILL.get(cfg.method)
    mod = m.load()
    data = load(data_path)
    cfg = resolve_config(m, cfg, data)
    policy = _read_policy(cfg.policy) if cfg.policy else None
    if cfg.responses == "given":
        require_completions(data)
    if cfg.student_config and opts.lora_r > 0:
        raise UsageError("--student-config builds a fresh student: train its full weights "
                         "(drop --lora-r)")
    if opts.lr is None:
        opts.lr = FRESH_STUDENT_LR if cfg.student_config else \
            m.default_lr * (10 if opts.lora_r > 0 else 1)

    from ..models import load_tokenizer
    from ..training import final_metrics, prepare_run, run_trainer, save_trained, trainer_kwargs
    roles = [("teacher", cfg.teacher)] + \
        ([("teacher-ref", cfg.teacher_ref)] if cfg.teacher_ref else []) + \
        ([("student", cfg.student)] if cfg.student else [])
    toks = [(role, spec, load_tokenizer(spec, cfg.trust_remote_code)) for role, spec in roles]
    check_tokenizers(toks)
    tok = toks[-1][2] if cfg.student else toks[0][2]  # a fresh student has the teacher's

    work = prepare_run(out, opts)
    import warnings
    # transformers 5 deprecation raised by peft's get_peft_model and TRL's generation unwrap
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
    from transformers import set_seed
    set_seed(opts.seed)
    kwargs = trainer_kwargs(opts, work)
    student_spec, student, teachers = _load_models(cfg, opts, kwargs, work)
    width = logit_width([student, *teachers.values()], tok)
    train_rows, eval_rows = _rows(cfg, opts, data, tok, teachers["teacher"], policy)

    from .trainer import DistillCollator, divergence
    collator = DistillCollator(tok.pad_token_id if tok.pad_token_id is not None else 0)
    metric = mod.metric(cfg, cfg.responses == "student")
    before = divergence(student, teachers, eval_rows, collator, metric, width, opts.batch_size)
    trainer = _trainer(mod, cfg, opts, kwargs, data, tok, student_spec, student, teachers,
                       train_rows, collator, width, policy)
    run_trainer(trainer, work, opts.resume)
    after = divergence(trainer.model, teachers, eval_rows, collator, metric, width,
                       opts.batch_size)

    heldout = {"metric": mod.METRIC_NAME, "before": before["value"], "after": after["value"],
               "responses": after["responses"], "tokens": after["tokens"]}
    if eval_rows:
        console.info(f"held-out {heldout['metric']}: {before['value']:.6f} before -> "
                     f"{after['value']:.6f} after ({heldout['responses']} responses, "
                     f"{heldout['tokens']} tokens)")
    else:
        console.info("no held-out records (--eval-split rounds to none): no held-out metric")
    info = {"distill_method": m.name, "teacher": cfg.teacher, "teacher_ref": cfg.teacher_ref,
            "student": cfg.student or f"fresh:{cfg.student_config}",
            "responses": cfg.responses, "policy_chars": len(policy) if policy else None,
            "distill_options": cfg.as_dict(), "train_options": opts.as_dict(),
            "metrics": {"heldout": heldout, "train": final_metrics(trainer)},
            "counts": {"records": len(data.records), "train_rows": len(train_rows),
                       "heldout_rows": len(eval_rows)}}
    save_trained(trainer, tok, out, work, force=opts.force, merge_lora=opts.merge_lora,
                 info=info, started=started, seed=opts.seed, inputs=_inputs(cfg, data))
    return heldout


def _load_models(cfg: DistillConfig, opts, kwargs: dict, work: Path):
    """(student spec, student, {"teacher", "teacher_ref"?}) on the training device."""
    from transformers import TrainingArguments

    from ..models import load_causal_lm
    load_kw = dict(allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code,
                   device=TrainingArguments(**kwargs).device)
    spec = cfg.student or str(build_student(cfg.student_config, cfg.teacher,
                                            work / "student-init", opts.seed))
    student, _ = load_causal_lm(spec, opts.dtype, trainable_adapter=True, **load_kw)
    teachers = {"teacher": load_causal_lm(cfg.teacher, opts.dtype, merged=True, **load_kw)[0]}
    if cfg.teacher_ref:
        teachers["teacher_ref"] = load_causal_lm(cfg.teacher_ref, opts.dtype, merged=True,
                                                 **load_kw)[0]
    return spec, student, teachers


def _rows(cfg: DistillConfig, opts, data: DistillData, tok, teacher,
          policy: str | None) -> tuple[list[dict], list[dict]]:
    """(training rows, held-out rows). Held-out responses are the given ones or teacher
    samples (never the student's, so before and after see the same responses)."""
    train_idx, eval_idx = split(len(data.records), cfg.eval_split, opts.seed)
    eval_source = cfg.responses if cfg.responses != "student" else (
        "given" if data.has_completions() else "teacher")

    def completions(indices: list[int], source: str, what: str) -> tuple[list | None, int]:
        if source == "student" or not indices:
            return None, 1
        if source == "given":
            return [given_completion_ids(tok, data, i) for i in indices], 1
        prompts = [data.records[i]["prompt"] for i in indices]
        if policy is not None:
            prompts = [with_policy(tok, p, policy) for p in prompts]
        groups = sample_ids(teacher, tok, prompts, [_key(data, i) for i in indices],
                            n=cfg.num_samples, seed=opts.seed, cfg=cfg,
                            desc=f"teacher responses ({what})")
        return [ids for g in groups for ids in g], cfg.num_samples

    comps, rep = completions(train_idx, cfg.responses, "training")
    train_rows = make_rows(tok, data, train_idx, comps, opts.max_length, policy=policy,
                           repeat=rep)
    if not eval_idx:
        return train_rows, []
    comps, rep = completions(eval_idx, eval_source, "held-out")
    return train_rows, make_rows(tok, data, eval_idx, comps, opts.max_length, policy=policy,
                                 repeat=rep, what="held-out")


def _trainer(mod, cfg: DistillConfig, opts, kwargs: dict, data: DistillData, tok,
             student_spec: str, student, teachers: dict, train_rows: list[dict], collator,
             width: int, policy: str | None):
    """The method's trainer: its own (gkd: TRL's) or a DistillTrainer with its objective;
    a LoRA student when --lora-r is set."""
    from ..models import resolve
    from ..training import lora_config
    peft = lora_config(opts)
    on_policy = cfg.responses == "student"
    if hasattr(mod, "make_trainer"):
        trainer = mod.make_trainer(cfg, student=student, teachers=teachers, tokenizer=tok,
                                   train_rows=train_rows, kwargs=kwargs, opts=opts, peft=peft)
    else:
        from datasets import Dataset
        from peft import get_peft_model
        from transformers import TrainingArguments

        from .trainer import DistillTrainer
        if peft is not None:
            student = get_peft_model(student, peft)

        def rollout(model, indices: list[int], step: int) -> dict:
            from ..generation import row_seed
            was = model.training
            model.eval()
            groups = sample_ids(model, tok, [data.records[i]["prompt"] for i in indices],
                                [_key(data, i) for i in indices], n=1,
                                seed=row_seed(opts.seed, "on-policy", step), cfg=cfg,
                                progress=_Quiet())
            model.train(was)
            return collator(make_rows(tok, data, indices, [g[0] for g in groups],
                                      opts.max_length, policy=policy))

        trainer = DistillTrainer(model=student, args=TrainingArguments(**kwargs),
                                 data_collator=collator, train_dataset=Dataset.from_list(train_rows),
                                 processing_class=tok, teachers=teachers,
                                 objective=mod.objective(cfg, on_policy), width=width,
                                 rollout=rollout if on_policy else None)
    if peft is not None:  # the absolute base folder, so plain peft loads the adapter
        trainer.model.peft_config["default"].base_model_name_or_path = str(
            resolve(student_spec).resolve())
    return trainer


def _inputs(cfg: DistillConfig, data: DistillData) -> dict:
    """The manifest's input sha256s: the records and every given model."""
    from ..models import model_sha256
    out = {data.path: data.sha256}
    for role, spec in (("teacher", cfg.teacher), ("teacher-ref", cfg.teacher_ref),
                       ("student", cfg.student)):
        if spec:
            out[f"{role}:{spec}"] = model_sha256(spec)
    return out


def _key(data: DistillData, i: int) -> str:
    """The sampler's per-prompt random-stream key: stable across reruns and batching."""
    return f"{i}:{data.records[i].get('id', '')}"
