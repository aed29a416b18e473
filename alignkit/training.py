"""What every training command shares: flags, the work folder, metrics, signals, output.

Layout of a run writing `OUT`:
- `OUT.partial/` is the work folder while training runs: checkpoints
  (`checkpoint-N/`) and `metrics.jsonl`. `--resume` continues from its last checkpoint.
- On success the final model is written atomically to `OUT` (a temp folder renamed at the
  end) with `metrics.jsonl` and `alignkit.json`, and `OUT.partial/` is removed. A failed
  run leaves no `OUT`; an interrupted one (Ctrl-C, SIGTERM) saves a checkpoint into
  `OUT.partial/` and exits 130.

Trainers are Hugging Face / TRL `Trainer`s; `run_trainer` adds the callbacks and the
signal handling, `save_output` writes the folder. The same code runs under
`accelerate launch` (only the main process writes).
"""
from __future__ import annotations

import json
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from . import console
from .errors import UsageError
from .io import atomic_dir, manifest
from .registry import opt


@dataclass
class TrainOptions:
    """Flags common to train-policy, train-rm and distill (each field is one flag; its
    help is declared here and nowhere else)."""
    epochs: float = opt(1.0, "Training epochs.", low=0.0, low_open=True)
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use --epochs).")
    lr: Optional[float] = opt(None, "Learning rate (default: the method's).", low=0.0,
                              low_open=True)
    batch_size: int = opt(4, "Per-device batch size.", low=1)
    grad_accum: int = opt(1, "Gradient accumulation steps.", low=1)
    max_length: int = opt(512, "Max tokens of prompt + completion.", low=1)
    seed: int = opt(0, "Random seed: same inputs + seed -> same output.")
    dtype: str = opt("auto", "auto | float32 | bfloat16 (bf16 is ~3x faster on CPUs with "
                     "AVX-512 BF16).", choices=("auto", "float32", "fp32", "bfloat16", "bf16",
                                                 "float16", "fp16"))
    gradient_checkpointing: bool = opt(False, "Trade compute for memory.")
    lora_r: int = opt(0, "LoRA rank (0: train full weights).", low=0)
    lora_alpha: int = opt(16, "LoRA alpha.")
    lora_dropout: float = opt(0.0, "LoRA dropout.", low=0.0, high=1.0)
    lora_targets: str = opt("all-linear", "LoRA target modules (comma list or all-linear).")
    merge_lora: bool = opt(False, "Write merged full weights instead of an adapter.")
    logging_steps: int = opt(1, "Write metrics.jsonl every N steps.", low=1)
    save_steps: int = opt(0, "Checkpoint every N steps (0: only on interrupt).", low=0)
    warmup_ratio: float = opt(0.0, "Linear warmup share of the steps.", low=0.0, high=1.0)
    resume: bool = opt(False, "Continue the unfinished run in OUT.partial/.")
    force: bool = opt(False, "Replace an existing output folder.")
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)

    def with_lr(self, default: float) -> "TrainOptions":
        """Fill `lr` with a method's default when --lr was not given."""
        if self.lr is None:
            self.lr = default
        return self


def work_dir_for(out: str | Path) -> Path:
    out = Path(out)
    return out.parent / f"{out.name}.partial"


def is_main_process() -> bool:
    """False in the non-zero ranks of an `accelerate launch`/`torchrun` run (read from the
    environment, so it works before the process group exists)."""
    import os
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0


def prepare_run(out: str | Path, opts: TrainOptions) -> Path:
    """Check the output and work folders before any heavy work; return the work folder.
    Only the main process checks and creates it (the other ranks of a distributed run
    would otherwise find the folder rank 0 just made and refuse)."""
    out = Path(out)
    work = work_dir_for(out)
    if not is_main_process():
        return work
    if out.exists() and not opts.force:
        raise UsageError(f"{out} already exists (use --force to replace it)")
    if work.exists() and not opts.resume:
        if opts.force:
            shutil.rmtree(work)
        else:
            raise UsageError(f"{work} holds an unfinished run: pass --resume to continue it "
                             "or --force to start over")
    if opts.resume and not work.exists():
        raise UsageError(f"--resume: no unfinished run in {work}")
    work.mkdir(parents=True, exist_ok=True)
    return work


def last_checkpoint(work: Path) -> str | None:
    """The newest complete checkpoint in the work folder (one a kill cut short while it
    was being written lacks its trainer_state.json and is skipped)."""
    ckpts = sorted((p for p in work.glob("checkpoint-*")
                    if p.is_dir() and (p / "trainer_state.json").is_file()),
                   key=lambda p: int(p.name.split("-")[-1]) if p.name.split("-")[-1].isdigit() else -1)
    return str(ckpts[-1]) if ckpts else None


def use_bf16(dtype: str) -> bool:
    return dtype in ("bfloat16", "bf16")


def trainer_kwargs(opts: TrainOptions, work: Path) -> dict:
    """Keyword arguments shared by every TRL/transformers config class."""
    import torch
    return dict(
        output_dir=str(work),
        num_train_epochs=opts.epochs,
        max_steps=opts.max_steps,
        learning_rate=opts.lr,
        per_device_train_batch_size=opts.batch_size,
        gradient_accumulation_steps=opts.grad_accum,
        seed=opts.seed,
        data_seed=opts.seed,
        bf16=use_bf16(opts.dtype),
        logging_steps=opts.logging_steps,
        save_strategy="steps" if opts.save_steps > 0 else "no",
        save_steps=opts.save_steps if opts.save_steps > 0 else 500,
        report_to=[],
        disable_tqdm=True,
        # transformers 5 renamed it; the old name (TRL configs default it to True) warns.
        activation_checkpointing=opts.gradient_checkpointing,
        gradient_checkpointing=None,
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        warmup_steps=opts.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type="linear",
        save_only_model=False,
    )


def lora_config(opts: TrainOptions, task_type: str = "CAUSAL_LM"):
    """A peft LoraConfig from the flags, or None when --lora-r is 0."""
    if opts.lora_r <= 0:
        return None
    from peft import LoraConfig
    targets: Any = opts.lora_targets
    if targets != "all-linear":
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    return LoraConfig(r=opts.lora_r, lora_alpha=opts.lora_alpha, lora_dropout=opts.lora_dropout,
                      target_modules=targets, task_type=task_type)


def _callbacks(work: Path, total_steps_hint: int | None = None):
    from transformers import TrainerCallback

    class Metrics(TrainerCallback):
        """metrics.jsonl (one line per logging step) and progress on stderr."""

        def __init__(self):
            self.t0 = time.time()
            self._prog = None
            self._task = None

        def on_train_begin(self, args, state, control, **kw):
            if state.is_world_process_zero:
                self._prog = console.progress("training", total=state.max_steps or None)
                self._task = self._prog.__enter__()

        def on_step_end(self, args, state, control, **kw):
            if self._task is not None:
                self._task.advance()
            if _STOP["flag"]:
                control.should_save = True
                control.should_training_stop = True

        def on_log(self, args, state, control, logs=None, **kw):
            if not state.is_world_process_zero or not logs:
                return
            row = {"step": state.global_step, "epoch": round(state.epoch or 0, 4),
                   "time_s": round(time.time() - self.t0, 2), **logs}
            with open(work / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row, default=float) + "\n")
            if console.VERBOSITY >= 2:
                console.debug(json.dumps(row, default=float))

        def on_train_end(self, args, state, control, **kw):
            if self._prog is not None:
                self._prog.__exit__(None, None, None)
                self._prog = None

    return [Metrics()]


_STOP = {"flag": False}


def run_trainer(trainer, work: Path, resume: bool) -> None:
    """Train with metrics/progress callbacks; on SIGINT/SIGTERM save a checkpoint in
    the work folder and raise KeyboardInterrupt (the CLI exits 130)."""
    for cb in _callbacks(work):
        trainer.add_callback(cb)
    # Our callback reports progress; drop the default printer/progress callbacks.
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    for cb in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(cb)
    _STOP["flag"] = False

    def on_signal(signum, frame):
        if _STOP["flag"]:  # second signal: stop now
            raise KeyboardInterrupt
        _STOP["flag"] = True
        console.warn("interrupt received: saving a checkpoint, then stopping "
                     "(send again to stop at once)")

    import threading
    main_thread = threading.current_thread() is threading.main_thread()
    old = {}
    if main_thread:
        for s in (signal.SIGINT, signal.SIGTERM):
            old[s] = signal.signal(s, on_signal)
    try:
        ckpt = last_checkpoint(work) if resume else None
        if resume and ckpt:
            console.info(f"resuming from {ckpt}")
        trainer.train(resume_from_checkpoint=ckpt)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    if _STOP["flag"]:
        if last_checkpoint(work) is None or trainer.state.global_step > int(
                last_checkpoint(work).rsplit("-", 1)[-1]):
            trainer._save_checkpoint(trainer.model, trial=None)
        console.info(f"checkpoint saved in {work}; rerun with --resume to continue")
        raise KeyboardInterrupt


def final_metrics(trainer) -> dict:
    """The last logged values of each metric (loss, rewards/margins, accuracies, ...)."""
    out: dict = {}
    for row in trainer.state.log_history:
        for k, v in row.items():
            if isinstance(v, (int, float)):
                out[k] = v
    return out


def save_output(model, tokenizer, out: str | Path, work: Path, *, force: bool,
                merge_lora: bool = False, info: dict | None = None,
                started: float | None = None, seed: int | None = None,
                inputs: dict | None = None) -> Path:
    """Write the final model folder atomically (merged or adapter), with metrics.jsonl
    and alignkit.json, then remove the work folder."""
    out = Path(out)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with atomic_dir(out, force=force) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for log in ("metrics.jsonl", "samples.jsonl"):  # samples: online methods
            if (work / log).exists():
                shutil.copy2(work / log, tmp / log)
        data = manifest(inputs=inputs, seed=seed, started=started, **(info or {}))
        (tmp / "alignkit.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return out
