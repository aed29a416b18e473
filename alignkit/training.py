"""What every training command shares: flags, the work folder, metrics, signals, output.

Layout of a run writing `OUT`:
- `OUT.partial/` is the work folder while training runs: checkpoints
  (`checkpoint-N/`) and `metrics.jsonl`. `--resume` continues from its last checkpoint.
- On success the final model is written atomically to `OUT` (a temp folder renamed at the
  end) with `metrics.jsonl` and `alignkit.json`, and `OUT.partial/` is removed (renamed
  to a hidden temp first, which the next write to OUT sweeps if a kill cuts the
  deletion short, so a killed run leaves OUT or OUT.partial, never both). A failed
  run leaves no `OUT`; an interrupted one (Ctrl-C, SIGTERM) saves a checkpoint into
  `OUT.partial/` and exits 130.

Trainers are Hugging Face / TRL `Trainer`s; `run_trainer` adds the callbacks and the
signal handling, `save_output` writes the folder. The same code runs under
`accelerate launch` (DDP, FSDP, DeepSpeed): `save_trained` gathers the weights where
they are sharded over the processes (FSDP, ZeRO-3: `full_state_dict`, a collective
every rank calls) and only the main process writes; a stop (Ctrl-C, SIGTERM) that
reaches any rank stops every rank at the same step (`_agree`).

Every output folder loads in plain transformers/peft from any directory: an adapter's
`adapter_config.json` names its base by the absolute path of a plain transformers folder
(an embedded model materialised, an adapter base merged once into the model cache), and
alignkit.json keeps `base: {spec, path, sha256}`, by which alignkit's loader finds a base
that moved (`alignkit.models.adapter_base`). The folder's README.md is a model card made
from alignkit.json (`model_card`). `--report-to tensorboard` writes event files under
`OUT.partial/runs/`, copied to `OUT/runs/`.
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
from .errors import AlignkitError, UsageError
from .io import atomic_dir, discard_folder, manifest, sweep_stale_temps
from .model_card import model_card
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
    report_to: str = opt("none", "Experiment tracker that also gets the logged metrics "
                         "(tensorboard: event files in OUT/runs/).", metavar="NAME",
                         choices=("none", "tensorboard", "wandb", "trackio"))
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


# tracker -> (modules any one of which provides it, what to pip install)
TRACKERS: dict[str, tuple[tuple[str, ...], str]] = {
    "tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"),
    "wandb": (("wandb",), "wandb"),
    "trackio": (("trackio",), "trackio"),
}


def report_to(opts: TrainOptions) -> list[str]:
    """The `report_to` list of the trainer configs from --report-to, checked: an unknown
    name is a UsageError, a tracker whose package is not installed an AlignkitError
    (exit 1) naming what to install."""
    import importlib.util
    name = opts.report_to or "none"
    if name == "none":
        return []
    if name not in TRACKERS:
        raise UsageError(f"--report-to must be one of none, {', '.join(TRACKERS)}; got {name!r}")
    modules, package = TRACKERS[name]
    if not any(importlib.util.find_spec(m) is not None for m in modules):
        raise AlignkitError(f"--report-to {name}: the package {package!r} is not installed: "
                            f"run `pip install {package}`")
    return [name]


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
    report_to(opts)  # a missing tracker fails before any heavy work
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
    sweep_stale_temps(out)  # e.g. a finished run's work folder whose deletion a kill cut short
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
        report_to=report_to(opts),
        run_name=work.name.removesuffix(".partial"),
        disable_tqdm=True,
        **_checkpointing_kwargs(opts.gradient_checkpointing),
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
        remove_unused_columns=False,
        warmup_steps=opts.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio
        lr_scheduler_type="linear",
        save_only_model=False,
    )


def _checkpointing_kwargs(on: bool) -> dict:
    """Activation checkpointing under the name this transformers has: newer 5.x releases
    renamed `gradient_checkpointing` (the old name, which TRL configs default to True,
    then warns); 5.19, which vLLM's CPU build pins, has only the old one."""
    import dataclasses

    from transformers import TrainingArguments
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}:
        return {"activation_checkpointing": on, "gradient_checkpointing": None}
    return {"gradient_checkpointing": on}


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


def with_lora(model, opts: TrainOptions):
    """`(model, lora)`: the model wrapped in a fresh LoRA adapter from the flags (input
    gradients enabled under --gradient-checkpointing), or unchanged with lora None when
    --lora-r is 0. For alignkit's own training loops; TRL's trainers take `peft_config`."""
    lora = lora_config(opts)
    if lora is None:
        return model, None
    from peft import get_peft_model
    if opts.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, lora), lora


def _agree(trainer):
    """A function flag -> flag, true on every rank when it is true on any: a signal can
    reach the ranks of a distributed run at different steps, and a rank that stops alone
    leaves the others waiting in the next step's collectives. One process: the identity."""
    acc = getattr(trainer, "accelerator", None)
    if acc is None or acc.num_processes == 1:
        return lambda flag: flag

    def agree(flag: bool) -> bool:
        import torch
        t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
        return bool(acc.reduce(t, reduction="sum").item() > 0)
    return agree


def _callbacks(work: Path, total_steps_hint: int | None = None, agree=lambda flag: flag):
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
            _STOP["flag"] = agree(_STOP["flag"])
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
    for cb in _callbacks(work, agree=_agree(trainer)):
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
        # Distributed: every rank has written its part of the checkpoint before any looks
        # at it, all ranks decide alike whether to save one more (a collective under FSDP
        # and ZeRO-3), and none exits before the others are done (the launcher would kill
        # a rank still writing). One process: no waits, the same decision as ever.
        barrier()
        last = last_checkpoint(work)
        if _agree(trainer)(last is None
                           or trainer.state.global_step > int(last.rsplit("-", 1)[-1])):
            trainer._save_checkpoint(trainer.model, trial=None)
        barrier()
        if is_main_process():
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


def is_sharded(trainer) -> bool:
    """True when no single process holds the trained weights: FSDP (1 or 2), DeepSpeed
    ZeRO-3. (One process, DDP and ZeRO-1/2 keep a full copy on every rank.)"""
    acc = getattr(trainer, "accelerator", None)
    if acc is None:
        return False
    from accelerate.utils import DistributedType
    if acc.distributed_type == DistributedType.FSDP:
        return True
    if acc.distributed_type == DistributedType.DEEPSPEED:
        plugin = getattr(acc.state, "deepspeed_plugin", None)
        return plugin is not None and plugin.zero_stage == 3
    return False


def full_state_dict(trainer) -> dict | None:
    """The trained model's full weights where they are sharded (`is_sharded`), gathered as
    accelerate and TRL's `Trainer.save_model` do (`accelerator.get_state_dict`: FSDP's
    full state dict on the CPU, ZeRO-3's 16-bit consolidation): a collective, so every
    rank calls it; the main process gets the tensors, the others an empty dict. None when
    the model is not sharded: the model then saves its own weights, as in one process."""
    if not is_sharded(trainer):
        return None
    from accelerate.utils import DistributedType
    acc = trainer.accelerator
    model = trainer.model
    if acc.distributed_type == DistributedType.DEEPSPEED:
        model = getattr(trainer, "deepspeed", None) or trainer.model_wrapped  # the engine
    try:
        state = acc.get_state_dict(model)
    except ValueError as e:  # ZeRO-3 without stage3_gather_16bit_weights_on_model_save
        raise AlignkitError(f"cannot gather the trained weights to save them: {e} (in an "
                            "accelerate config: `zero3_save_16bit_model: true`, see "
                            "examples/accelerate/deepspeed_zero3.yaml)") from None
    return (state or {}) if acc.is_main_process else {}


def save_trained(trainer, tokenizer, out: str | Path, work: Path, **kw) -> Path:
    """`save_output` (keyword arguments `kw`) for the model a Trainer trained, under any
    launch: the weights are gathered on every rank where they are sharded
    (`full_state_dict`), the main process writes the folder, every rank waits for it,
    then the process group is ended. In one process: `save_output(trainer.model, ...)`."""
    acc = trainer.accelerator
    state = full_state_dict(trainer)
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_output(acc.unwrap_model(trainer.model), tokenizer, out, work, state_dict=state,
                    **kw)
    acc.wait_for_everyone()
    end_process_group()
    return Path(out)


def sharded_launch() -> bool:
    """True when `accelerate launch` asked for weights sharded over the processes (FSDP,
    DeepSpeed ZeRO-3), read from the environment it sets, so before any work."""
    import os
    env = os.environ
    if env.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return True
    if env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return False
    stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    ds_file = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if ds_file != "none":
        try:
            stage = json.loads(Path(ds_file).read_text()).get("zero_optimization", {}).get("stage")
        except (OSError, ValueError, AttributeError):
            pass
    return str(stage) == "3"


def refuse_sharded(what: str) -> None:
    """A UsageError, before any work, for a method whose models are used outside its
    Trainer (several models, custom layouts) and so cannot be sharded over processes."""
    if sharded_launch():
        raise UsageError(f"{what} cannot run with its weights sharded over processes (FSDP, "
                         "DeepSpeed ZeRO-3): launch it with DDP (examples/accelerate/ddp.yaml) "
                         "or ZeRO-2")


def barrier() -> None:
    """Wait for every rank of a distributed run (nothing in one process)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def end_process_group() -> None:
    """Tear the process group down while every rank is still alive: left to interpreter
    exit, gloo's threads can abort one rank ("terminate called without an active
    exception") after the folder is written, and the launcher then reports a failure."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def save_output(model, tokenizer, out: str | Path, work: Path, *, force: bool,
                merge_lora: bool = False, info: dict | None = None,
                started: float | None = None, seed: int | None = None,
                inputs: dict | None = None, state_dict: dict | None = None) -> Path:
    """Write the final model folder atomically (merged or adapter), with metrics.jsonl,
    alignkit.json (its `base`: {spec, path, sha256}), README.md (the model card) and the
    tracker logs, then remove the work folder. An adapter's base is recorded as the
    absolute path of a plain transformers folder (`base_record`).

    `state_dict`: the full weights gathered from a sharded model (`full_state_dict`; the
    model object itself then holds only this process's shards): they are what is written,
    and `merge_lora` merges the adapter written from them into its base, loaded again."""
    out = Path(out)
    if merge_lora and hasattr(model, "merge_and_unload"):
        if state_dict is None:
            model = model.merge_and_unload()
        else:
            model = _merged_from_state(model, state_dict, work)
            state_dict = None
    info = dict(info or {})
    info["base"] = base_record(model, info.get("base"), work)
    with atomic_dir(out, force=force) as tmp:
        if state_dict is None:
            model.save_pretrained(tmp, safe_serialization=True)
        else:
            model.save_pretrained(tmp, state_dict=_retied(model, state_dict),
                                  safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        data = manifest(inputs=inputs, seed=seed, started=started, **info)
        finish_folder(tmp, work, data, final=out)
    discard_folder(work, out)
    return out


def _retied(model, state_dict: dict) -> dict:
    """The gathered copies of tied weights (lm_head and embed_tokens) made one tensor
    again, as they are in the model's own state dict, so that `save_pretrained` keeps
    one of them as it does for an unsharded model."""
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    state_dict = dict(state_dict)
    for group in names.values():
        present = [n for n in group if n in state_dict]
        for n in present[1:]:
            if state_dict[n].shape == state_dict[present[0]].shape:
                state_dict[n] = state_dict[present[0]]
    return state_dict


def _merged_from_state(model, state_dict: dict, work: Path):
    """A sharded PEFT model's merged weights: its adapter, written from the gathered
    `state_dict` into the work folder, loaded over its base (as any adapter folder is)
    and merged there, on this process alone."""
    from .models import load_causal_lm, load_seq_cls
    cfg = next(iter(model.peft_config.values()))
    task = str(getattr(cfg.task_type, "value", cfg.task_type) or "CAUSAL_LM")
    base_record(model, None, work)  # point the adapter at a plain transformers folder
    folder = work / "adapter-to-merge"
    shutil.rmtree(folder, ignore_errors=True)
    model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    loader = load_seq_cls if task == "SEQ_CLS" else load_causal_lm
    merged, _ = loader(folder, _dtype_name(model))
    merged = merged.merge_and_unload()
    shutil.rmtree(folder, ignore_errors=True)
    # the trained base's name and config (use_cache, pad token, ... as training left
    # them), as `merge_and_unload` of the model itself would have
    import copy
    trained = model.get_base_model()
    merged.name_or_path = trained.name_or_path
    merged.config = copy.deepcopy(trained.config)
    if getattr(trained, "generation_config", None) is not None:
        merged.generation_config = copy.deepcopy(trained.generation_config)
    return merged


def finish_folder(tmp: Path, work: Path, data: dict, final: Path | None = None) -> None:
    """What every output folder gets besides its weights: the run's logs from the work
    folder (metrics.jsonl, samples.jsonl of online methods, the tracker's `runs/`),
    alignkit.json (`data`) and README.md, the model card made from it (replacing PEFT's
    boilerplate). `final`: the path the folder will have (named in the card)."""
    for log in ("metrics.jsonl", "samples.jsonl", "rubrics.jsonl"):  # rubrics: MPO (policy/mpo.py)
        if (work / log).exists():
            shutil.copy2(work / log, tmp / log)
    if (work / "runs").is_dir():
        shutil.copytree(work / "runs", tmp / "runs", dirs_exist_ok=True)
    (tmp / "alignkit.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
    (tmp / "README.md").write_text(model_card(data, tmp, final or tmp), encoding="utf-8")


def base_record(model, given: dict | None, work: Path) -> dict | None:
    """alignkit.json's `base` of the model about to be saved: {spec, path, sha256}.

    For a PEFT adapter the base it was trained on is made a plain transformers folder
    (`models.plain_base`: a relative path made absolute, an embedded name materialised,
    an adapter merged into the cache), and every adapter config is pointed at that
    absolute path, so plain peft loads the folder from any directory. `given`: the
    command's own record ({spec, sha256}) when it keeps one."""
    from .models import model_sha256, plain_base, resolve
    given = dict(given) if isinstance(given, dict) else {}
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        cfg = next(iter(configs.values()))
        recorded = cfg.base_model_name_or_path
        task = getattr(cfg.task_type, "value", cfg.task_type) or "CAUSAL_LM"
        try:
            path = plain_base(recorded, task_type=str(task), dtype=_dtype_name(model))
        except (AlignkitError, OSError) as e:  # a finished run must not be lost
            console.warn(f"the adapter's base {recorded!r} is not a model folder ({e}); "
                         "adapter_config.json keeps it as recorded")
            return {"spec": given.get("spec", recorded), "path": None,
                    "sha256": given.get("sha256")}
        for c in configs.values():
            c.base_model_name_or_path = str(path)
        spec = given.get("spec")
        if not spec or not _same_model(spec, recorded):
            spec = recorded  # the command's spec is not what the adapter sits on
        return {"spec": str(spec), "path": str(path), "sha256": model_sha256(path)}
    spec = given.get("spec") or getattr(model, "name_or_path", None) or None
    if not spec:
        return given or None
    try:
        path = resolve(spec).resolve()
    except AlignkitError:
        path = None
    if path is not None and work.resolve() in (path, *path.parents):
        path = None  # built inside the work folder (a fresh student): gone after the run
    sha = given.get("sha256")
    if sha is None and path is not None:
        try:
            sha = model_sha256(path)
        except OSError:
            sha = None
    return {"spec": str(spec), "path": str(path) if path else None, "sha256": sha}


def _same_model(a, b) -> bool:
    from .models import resolve
    try:
        return resolve(a).resolve() == resolve(b).resolve()
    except (AlignkitError, OSError):
        return False


def _dtype_name(model) -> str:
    import torch
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:
        return "float32"
    return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(dtype, "float32")
