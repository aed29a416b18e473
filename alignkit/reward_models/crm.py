"""`crm`: Collaborative Reward Modeling (arXiv 2505.10597; ALGORITHMS.md Part B §7):
two BT reward models trained together on noisy preferences. TRL has no such trainer
or loss; it is a Trainer subclass here.

Peer review, per batch B: each model computes its per-pair BT loss
ℓ = −log σ(r_c − r_r − m) and hands the ⌈(1 − η_t)|B|⌉ pairs with its *smallest*
losses to the other model, which trains on them (co-teaching, `coteach_loss`):

    L = mean_{i ∈ S_A} ℓ_B(i) + mean_{i ∈ S_B} ℓ_A(i) (+ λ·mean((r_c + r_r)²) per model)

where S_A are A's small-loss picks (B's update sees only them) and S_B are B's (A's
update sees only them). m is the pair's `margin` field only with `--margin` (else 0:
plain Bradley-Terry); alignkit.json records `"margin_used"`.

η_t follows co-teaching's schedule, R(t) = 1 − min(η·t/T_k, η) with η = `--noise-rate`
(a prior estimate of the label-noise rate) and T_k a quarter of the training steps
(UNVERIFIED for CRM: the paper's schedule is not public).

Curriculum, easy → hard (per epoch): from the second epoch on, each epoch visits the
pairs in decreasing order of the two models' mean margin r_c − r_r, measured at the
epoch's start (largest = easiest); the first epoch is in seeded random order, since
untrained models give no difficulty signal. Which model's margin drives the sort is
UNVERIFIED for CRM (no public code); the mean of both is used here. `--no-curriculum`
keeps seeded random order throughout. On `--resume` the order of the interrupted epoch
is recomputed from the checkpointed models.

Measured on the 24-antonym synthetic task (bench/rm_noise.py, clean held-out accuracy):
with minilm-l6 (the default configuration) the curriculum helped a little at 40%
flipped labels (crm 0.91 with it, 0.86 without; bt 0.48); with a randomly initialised
tiny-llama (lr 1e-3, 5 epochs, 20% flipped) it cost accuracy (about 0.72 with it, 0.92
without; bt 0.95): the sorted order puts the pairs neither model has learned, and the
flipped ones, together at the end of each epoch, where the per-batch selection cannot
separate them.

Output: the peer with the better held-out accuracy (`better_peer`; ties, and runs
without held-out pairs, write model A) as a plain AutoModelForSequenceClassification
folder, so `rm:OUT` uses it; the other peer in `peer/`. alignkit.json has
`"rm_method": "crm"`, `"selected": {"peer": "A" | "B", "accuracy_a", "accuracy_b"}`,
`metrics.heldout` (the written peer's) and `metrics.heldout_peer` (the other's). The
written peer was picked on the held-out pairs, so its reported accuracy is optimistic
by that selection; give an independent `--eval-pairs` file when it matters.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from .. import console
from ..errors import UsageError
from .common import (LoggedMetrics, bt_losses, ceil_keep, dataset, evaluate, ids_rewards, now,
                     pair_stats, preference_collator, report, save_seq_cls, seed_everything,
                     split_rewards, tokenize_pairs, train_eval_sets, train_metrics,
                     training_args, use_margin, write_folder)
from .inference import METHOD_KEY, seq_cls_rewards

if TYPE_CHECKING:
    from . import RMConfig

WARMUP_FRACTION = 0.25  # T_k as a share of the training steps


def peer_schedule(step: int, max_steps: int, noise_rate: float) -> float:
    """η_t = min(η·t/T_k, η), T_k = WARMUP_FRACTION·max_steps (co-teaching)."""
    t_k = max(1, round(WARMUP_FRACTION * max(1, max_steps)))
    return noise_rate * min(1.0, step / t_k)


def easy_to_hard(margins: list[float]) -> list[int]:
    """Indices by decreasing margin (ties by index): the curriculum's visiting order."""
    return sorted(range(len(margins)), key=lambda i: (-margins[i], i))


def small_loss(losses, n: int):
    """Indices of the n smallest per-pair losses (ties by index), without gradient."""
    import torch
    return torch.argsort(losses.detach(), stable=True)[:n]


def coteach_loss(loss_a, loss_b, n: int):
    """(L, pick_a, pick_b): the co-teaching exchange of one batch. pick_a are A's n
    small-loss pairs, which *B* trains on; pick_b are B's, which *A* trains on:
    L = mean ℓ_B[pick_a] + mean ℓ_A[pick_b]."""
    pick_a, pick_b = small_loss(loss_a, n), small_loss(loss_b, n)
    return loss_b[pick_a].mean() + loss_a[pick_b].mean(), pick_a, pick_b


PEERS = ("A", "B")


def better_peer(metrics: list[dict | None]) -> int:
    """0 (A) or 1 (B): the peer with the higher held-out accuracy; A on ties and when
    there are no held-out metrics."""
    a, b = metrics
    if a is None or b is None:
        return 0
    return 1 if b["accuracy"] > a["accuracy"] else 0


def make_trainer(a, b, args, rows: list[dict], pad_id: int, cfg: RMConfig, seed: int):
    import torch
    from transformers import Trainer, TrainerCallback

    class Peers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = a, b

    class Order(torch.utils.data.Sampler):
        """The visiting order of the current epoch (set at each epoch's start)."""

        def __init__(self):
            g = torch.Generator().manual_seed(seed)
            self.order = torch.randperm(len(rows), generator=g).tolist()

        def __iter__(self):
            return iter(list(self.order))

        def __len__(self):
            return len(rows)

    order = Order()

    class CRMTrainer(LoggedMetrics, Trainer):
        """Co-teaching BT loss over two peer reward models with an easy→hard
        curriculum (TRL has no collaborative / co-teaching reward-model loss)."""

        loss_is_scaled_for_ga = False

        def _get_train_sampler(self, train_dataset=None):
            return order

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            margin = inputs.get("margin")
            ac, ar = split_rewards(model.a, inputs)
            bc, br = split_rewards(model.b, inputs)
            la, lb = bt_losses(ac, ar, margin), bt_losses(bc, br, margin)
            eta = peer_schedule(self.state.global_step, self.state.max_steps, cfg.noise_rate)
            n = ceil_keep(la.shape[0], eta)
            loss, pick_a, pick_b = coteach_loss(la, lb, n)
            if cfg.center_rewards:
                loss = loss + cfg.center_rewards * (((ac + ar) ** 2).mean() + ((bc + br) ** 2).mean())
            sa, sb = pair_stats(ac.detach(), ar.detach()), pair_stats(bc.detach(), br.detach())
            agree = len(set(pick_a.tolist()) & set(pick_b.tolist())) / n
            self.note(eta=eta, accuracy_a=sa["accuracy"], accuracy_b=sb["accuracy"],
                      margin_a=sa["margin"], margin_b=sb["margin"], selection_agreement=agree)
            return (loss, {"a": (ac, ar), "b": (bc, br)}) if return_outputs else loss

    class Curriculum(TrainerCallback):
        def on_epoch_begin(self, args_, state, control, **kw):
            if not cfg.curriculum or int((state.epoch or 0) + 1e-6) == 0:
                return
            seqs_c = [r["chosen_ids"] for r in rows]
            seqs_r = [r["rejected_ids"] for r in rows]
            margins = [0.0] * len(rows)
            for m in (a, b):
                c, r = ids_rewards(m, seqs_c, pad_id), ids_rewards(m, seqs_r, pad_id)
                margins = [x + (ci - ri) / 2 for x, ci, ri in zip(margins, c, r)]
            order.order = easy_to_hard(margins)

    trainer = CRMTrainer(model=Peers(), args=args, train_dataset=dataset(rows),
                         data_collator=preference_collator(pad_id), callbacks=[Curriculum()])
    return trainer


def train(pairs: str, model_spec: str, out: str | Path, opts, cfg: RMConfig) -> dict:
    """Train two peer BT models with co-teaching; write the one with the better held-out
    accuracy (ties and no held-out pairs: A), the other in peer/."""
    if not 0.0 <= cfg.noise_rate < 1.0:
        raise UsageError(f"--noise-rate must be in [0, 1), got {cfg.noise_rate}")
    from trl.trainer.utils import disable_dropout_in_model

    from ..models import load_seq_cls
    from ..training import lora_config, prepare_run, refuse_sharded, run_trainer

    refuse_sharded("train-rm --method crm")  # two peers, scored outside the Trainer
    started = now()
    data, train_recs, eval_recs, inputs = train_eval_sets(pairs, cfg, opts.seed)
    work = prepare_run(out, opts)
    peers = []
    for j in range(2):
        seed_everything(opts.seed + j)  # two different fresh heads
        m, tok = load_seq_cls(model_spec, opts.dtype)
        disable_dropout_in_model(m)
        peft = lora_config(opts, "SEQ_CLS")
        if peft is not None:
            from peft import get_peft_model
            m = get_peft_model(m, peft)
        peers.append(m)
    margin = use_margin(cfg, train_recs)
    rows = tokenize_pairs(tok, train_recs, opts.max_length, margin=margin)
    seed_everything(opts.seed)
    trainer = make_trainer(peers[0], peers[1], training_args(opts, work), rows,
                           tok.pad_token_id, cfg, opts.seed)
    run_trainer(trainer, work, opts.resume)
    peers = [m.merge_and_unload() if hasattr(m, "merge_and_unload") else m
             for m in (trainer.model.a, trainer.model.b)]
    scored = [evaluate(lambda p, c, u, m=m: seq_cls_rewards(m, tok, p, c,
                                                           max_length=opts.max_length), eval_recs)
              for m in peers]
    report(scored[0], "held-out (model A)")
    if scored[1]:
        report(scored[1], "held-out (model B)")
    best = better_peer(scored)
    other = 1 - best
    acc = [m["accuracy"] if m else None for m in scored]
    if scored[0]:
        console.info(f"crm: writing model {PEERS[best]} (held-out accuracy A {acc[0]:.4f}, "
                     f"B {acc[1]:.4f}; ties: A); model {PEERS[other]} goes to peer/")
    else:
        console.info("crm: no held-out pairs: writing model A; model B goes to peer/")
    info = {METHOD_KEY: cfg.method, "backbone": model_spec, "margin_used": margin,
            "selected": {"peer": PEERS[best], "accuracy_a": acc[0], "accuracy_b": acc[1],
                         "rule": "higher held-out accuracy; ties and no held-out pairs: A"},
            "rm_options": cfg.as_dict(), "train_options": opts.as_dict(),
            "metrics": {"heldout": scored[best], "heldout_peer": scored[other],
                        "train": train_metrics(trainer)},
            "counts": {"pairs": len(data.records), "train": len(rows), "heldout": len(eval_recs)}}

    def write(tmp: Path) -> None:
        save_seq_cls(peers[best], tok, tmp)
        save_seq_cls(peers[other], tok, tmp / "peer")

    write_folder(out, work, force=opts.force, write=write, info=info, started=started,
                 seed=opts.seed, inputs=inputs)
    return {"heldout": scored[best], "heldout_peer": scored[other], "selected": PEERS[best]}
