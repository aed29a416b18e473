"""TRL's own trainers: sft (SFTTrainer), simpo (the experimental CPOTrainer with
`loss_type="simpo"`, `cpo_alpha=0`), orpo (the experimental ORPOTrainer) and kto
(KTOTrainer), fed TRL's conversational rows (`data.trl_rows`).

Info fields of these entries: `config_class` and `trainer_class` ("module:attribute"
of TRL's config and trainer) and `trl_fields` (the config fields the method sets; its
own parameters, such as simpo's `simpo_gamma`, are config fields of the same name).
"""
from __future__ import annotations

import time
import warnings
from pathlib import Path

from ..registry import Param
from . import add
from .common import (PolicyRun, check_offline, config, config_overrides, finish, hparams,
                     import_attr, load_policy, load_reference, method_beta, quiet)

SIMPO_GAMMA = Param("simpo_gamma", float, 1.0, "SimPO's target reward margin gamma (the "
                    "paper's recommended gamma/beta = 0.5 at its beta = 2).")

_TRL = f"{__name__}:train_trl"
add("sft", "supervised fine-tuning on prompt+completion (or the chosen side of pairs)", _TRL,
    reads="sft", trl="SFTTrainer", default_lr=2e-5, no_beta="sft has no beta",
    config_class="trl:SFTConfig", trainer_class="trl:SFTTrainer",
    trl_fields={"completion_only_loss": True})
add("simpo", "SimPO (reference-free, length-normalised; --simpo-gamma)", _TRL, reads="pairs",
    params=(SIMPO_GAMMA,), trl="experimental CPOTrainer", default_lr=1e-6, default_beta=2.0,
    config_class="trl.experimental.cpo:CPOConfig",
    trainer_class="trl.experimental.cpo:CPOTrainer",
    trl_fields={"loss_type": "simpo", "cpo_alpha": 0.0})
add("orpo", "ORPO (odds-ratio preference + SFT, no reference)", _TRL, reads="pairs",
    trl="experimental ORPOTrainer", default_lr=1e-6, default_beta=0.1,
    config_class="trl.experimental.orpo:ORPOConfig",
    trainer_class="trl.experimental.orpo:ORPOTrainer", trl_fields={})
add("kto", "KTO on unpaired records {prompt, completion, label}", _TRL, reads="unpaired",
    trl="KTOTrainer", default_lr=1e-6, default_beta=0.1, needs_ref=True,
    config_class="trl:KTOConfig", trainer_class="trl:KTOTrainer", trl_fields={})


@quiet
def train_trl(run: PolicyRun) -> Path:
    """sft, simpo, orpo, kto: the entry's TRL trainer on TRL's rows. A method with a
    reference (kto) computes it in TRL's training loop (the base, or --ref-model)."""
    from datasets import Dataset

    from ..models import load_tokenizer
    from ..training import lora_config, prepare_run
    from .data import trl_rows
    m, opts = run.method, run.opts
    check_offline(run)
    beta = method_beta(run)
    fields = {**m.trl_fields, **run.options}
    if beta is not None:
        fields["beta"] = beta
    config_cls, trainer_cls = import_attr(m.config_class), import_attr(m.trainer_class)
    config_overrides(config_cls, run)
    started = time.time()
    tok = load_tokenizer(run.model, run.trust_remote_code)
    rows = trl_rows(run.data, m.reads, bool(getattr(tok, "chat_template", None)))
    work = prepare_run(run.out, opts)
    model, tok = load_policy(run)
    cfg = config(config_cls, run, work, max_length=opts.max_length, **fields)
    kw = {}
    reference = None
    if m.needs_ref:
        ref_spec = run.ref_model or run.model
        reference = {"spec": str(ref_spec), "computed": "in the training loop (TRL)"}
        if run.ref_model:
            kw["ref_model"], _ = load_reference(run.ref_model, run)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TRL's "experimental" and deprecation notices
        trainer = trainer_cls(model=model, args=cfg, train_dataset=Dataset.from_list(rows),
                              processing_class=tok, peft_config=lora_config(opts), **kw)
    hp = hparams(run, beta, **{k: v for k, v in fields.items() if k != "beta"})
    return finish(trainer, run, work, tok, started, hp, reference,
                  {"records": len(run.data.records), "rows": len(rows)})
