"""`bt`: a Bradley-Terry reward model through TRL's RewardTrainer (ALGORITHMS.md Part B §4).

L = −mean log σ(r_c − r_r − m) + λ·mean((r_c + r_r)²), with λ = `--center-rewards`
(TRL's `center_rewards_coefficient`; 0.01 is the recommended value) and m the per-pair
`margin` field **only with `--margin`**: by default m = 0 (plain Bradley-Terry) even when
the pairs carry `margin` (relabel writes score_chosen − score_rejected on every pair, and
TRL's RewardTrainer would otherwise train the margin loss). alignkit.json records
`"margin_used"`. Any backbone: an encoder (`minilm-l6`) or a causal LM (SmolLM2,
tiny-llama), which gets a fresh one-output score head. With `--lora-r` the output is a
PEFT adapter folder (`--merge-lora` writes full weights).

The output is a plain AutoModelForSequenceClassification folder (num_labels=1) that
`alignkit score --scorer rm:OUT` and plain transformers load.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .common import (dataset, evaluate, now, report, reward_config, seed_everything,
                     tokenize_pairs, train_eval_sets, train_metrics, use_margin)
from .inference import METHOD_KEY, seq_cls_rewards

if TYPE_CHECKING:
    from . import RMConfig


def train(pairs: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Train a BT reward model on `pairs` into `out`; return the held-out metrics."""
    from trl import RewardTrainer

    from ..models import load_seq_cls, resolve
    from ..training import lora_config, prepare_run, run_trainer, save_trained

    started = now()
    data, train_recs, eval_recs, inputs = train_eval_sets(pairs, cfg, opts.seed)
    work = prepare_run(out, opts)
    seed_everything(opts.seed)  # the fresh score head is drawn from the seeded RNG
    model, tok = load_seq_cls(model_spec, opts.dtype)
    margin = use_margin(cfg, train_recs)
    rows = tokenize_pairs(tok, train_recs, opts.max_length, margin=margin)
    peft = lora_config(opts, "SEQ_CLS")
    trainer = RewardTrainer(model=model, args=reward_config(opts, work, cfg),
                            train_dataset=dataset(rows), processing_class=tok, peft_config=peft)
    if peft is not None:  # the adapter names its base the way the user did (embedded name)
        trainer.model.peft_config["default"].base_model_name_or_path = (
            model_spec if not Path(model_spec).is_dir() else str(resolve(model_spec)))
    run_trainer(trainer, work, opts.resume)
    model = trainer.model  # every rank scores (a sharded model's forward is collective)
    metrics = evaluate(lambda p, c, u: seq_cls_rewards(model, tok, p, c,
                                                       max_length=opts.max_length), eval_recs)
    if trainer.accelerator.is_main_process:
        report(metrics)
    info = {METHOD_KEY: cfg.method, "backbone": model_spec, "margin_used": margin,
            "rm_options": cfg.as_dict(),
            "train_options": opts.as_dict(),
            "metrics": {"heldout": metrics, "train": train_metrics(trainer)},
            "counts": {"pairs": len(data.records), "train": len(rows),
                       "heldout": len(eval_recs)}}
    save_trained(trainer, tok, out, work, force=opts.force, merge_lora=opts.merge_lora,
                 info=info, started=started, seed=opts.seed, inputs=inputs)
    return {"heldout": metrics}
