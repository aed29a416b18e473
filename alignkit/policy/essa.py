"""ESSA: evolutionary strategies on the singular values of a LoRA adapter,
`train-policy --method essa` (arXiv 2507.04453; ALGORITHMS.md Part B §13, Part D §14).

ESSA aligns without gradients. It starts from an SFT LoRA adapter: either `--model`
is a peft adapter folder, or `--model` is its base and `--init-adapter DIR` the
adapter. No adapter is a UsageError that says to run `train-policy --method sft --lora-r
...` first. For each adapted linear module ΔW = c·B·A (c = alpha/r, peft's scaling), the
SVD ΔW = U diag(s) Vᵀ (rank r) is taken once, and U and V are frozen. The search vector
is every module's s concatenated (n = r × modules), searched in relative space s' =
s ⊙ (1 + z) from z = 0 (es.py has the formulas).

Each generation g:
1. Mini-batch. `--fitness-batch` prompt records are drawn without replacement with a
   stream keyed by (--seed, g). If there are fewer records, all of them are used. All
   members of the generation see the same batch and the same sampler seed (common random
   numbers).
2. Population. There are λ = `--popsize` members z ± σ·ε_k (antithetic pairs). The
   default is CMA-ES's 4 + ⌊3 ln n⌋, rounded up to even. The noise is keyed by
   (--seed, g).
3. Fitness. Each member's B' = U diag(s')/c and A' = Vᵀ are written into the adapter in
   place. One completion per prompt is drawn with the shared sampler
   (`alignkit.generation.sample`: `--temperature`, `--max-new-tokens`, streams keyed by
   prompt id), under `torch.no_grad()`. The completions are scored by the `--reward`
   scorers, built and combined exactly as for the online methods (`online.reward_fn`,
   `--reward-weights`, the shared scorer options). The fitness is the mean combined
   reward (unscored rows are skipped).
4. Update (OpenAI-ES). The fitness values are shaped into centred ranks
   u_i = rank_i/(λ−1) − ½ (ties share a rank), and z ← z + α/(λσ) Σ u_i ε_i, with
   α = `--es-lr` and σ = `--sigma0` held constant.

Nothing calls backward. No optimizer exists, and every weight has requires_grad off.

Simplified vs the paper. The paper optimises with CMA-ES (a covariance matrix, step-size
adaptation and log-rank recombination). Here it is antithetic OpenAI-ES with centred
ranks and a constant σ, the alternative ALGORITHMS.md Part D §14 gives. It is
O(n) per generation with no n×n matrix. The paper's own population, σ₀ and batch sizes
are UNVERIFIED. The defaults are ALGORITHMS.md's: λ auto, σ₀ 0.05 (relative), 128
prompts, 200 generations. α = 0.05 (= σ₀) is our choice: the step is then the
rank-weighted mean of the noise directions. The folder holds the final mean z, not the
best member: a member's fitness on one mini-batch is a noisy, selection-biased estimate.

Output. A normal peft LoRA folder is written with the same config (r, alpha, targets),
so `PeftModel.from_pretrained(base, OUT)` loads it. `--merge-lora` writes merged
weights instead. The folder also holds the tokenizer, alignkit.json (the method, the ES
settings, the data, the base, the initial adapter) and README.md, written by
`training.save_output` like every other method. metrics.jsonl has one line per
generation: fitness_mean, fitness_best, fitness_worst, fitness_std, sigma, update_norm,
z_norm. Progress goes to stderr. There are no checkpoints (no --resume); a failed run
removes OUT.partial/. Flags that only gradient training reads (--lora-r, --lr, --beta,
--ref-model, --opt, --resume) are refused; --epochs, --max-steps, --batch-size and
--grad-accum are not read.

Nothing heavy is imported at module level (the registry imports this module).
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import time
from pathlib import Path

from .. import console
from ..errors import UsageError
from ..registry import Param
from . import add
from .common import PolicyRun, method_beta, quiet
from .online import MAX_NEW_TOKENS, TEMPERATURE

DEFAULT_LR = 0.05  # α, also the entry's default_lr (so a given --lr can be told apart)

INIT_ADAPTER = Param("init_adapter", str, None, "ESSA: the SFT LoRA adapter folder to start "
                     "from, with --model its base (default: --model itself must be a peft "
                     "adapter folder).", metavar="DIR")
POPSIZE = Param("popsize", int, None, "ESSA: population per generation, even (antithetic "
                "pairs; default: CMA-ES's 4 + floor(3 ln n), n = searched singular values, "
                "rounded up to even).", low=2)
SIGMA0 = Param("sigma0", float, 0.05, "ESSA: noise scale in relative space s' = s(1 + z), "
               "held constant (OpenAI-ES, not the paper's CMA-ES).", low=0.0, low_open=True)
ES_LR = Param("es_lr", float, DEFAULT_LR, "ESSA: step size alpha of z <- z + alpha/(popsize "
              "sigma) sum_i u_i eps_i (u: centred ranks).", low=0.0, low_open=True)
FITNESS_BATCH = Param("fitness_batch", int, 128, "ESSA: prompts per generation (one "
                      "completion each, the same for every member).", low=1)
GENERATIONS = Param("generations", int, 200, "ESSA: ES generations.", low=1)

add("essa", "ESSA: gradient-free ES on the singular values of an SFT LoRA adapter (U, V "
    "frozen); fitness = mean --reward on a prompt mini-batch; antithetic OpenAI-ES with "
    "centred ranks (the paper: CMA-ES)", f"{__name__}:train_essa", reads="prompts",
    params=(INIT_ADAPTER, POPSIZE, SIGMA0, ES_LR, FITNESS_BATCH, GENERATIONS, MAX_NEW_TOKENS,
            TEMPERATURE),
    online=True, default_lr=DEFAULT_LR, default_beta=None,
    no_beta="essa has no KL term (no --beta)", trainer="alignkit ES (no gradients)")


def key_seed(*parts) -> int:
    """A 63-bit seed from the parts (the same on every machine and Python)."""
    h = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(h[:8], "little") >> 1


# --- checks ---------------------------------------------------------------------------------

def check_flags(run: PolicyRun) -> None:
    """The flags gradient training reads do not apply (UsageError, before any work)."""
    method_beta(run)
    o, opts = run.options, run.opts
    if opts.lora_r > 0:
        raise UsageError("--lora-r does not apply to essa: it searches the singular values of "
                         "the given adapter (its rank is the adapter's)")
    if opts.lr is not None and opts.lr != run.method.default_lr:
        raise UsageError("--lr does not apply to essa (no gradients); its step size is --es-lr")
    if run.ref_model:
        raise UsageError("essa uses no reference model (drop --ref-model)")
    if run.config:
        raise UsageError("--opt does not apply to essa (no TRL config)")
    if opts.resume:
        raise UsageError("essa keeps no checkpoints: --resume cannot continue it")
    if o["popsize"] is not None and o["popsize"] % 2:
        raise UsageError(f"--popsize must be even (antithetic pairs), got {o['popsize']}")


def adapter_source(run: PolicyRun) -> tuple[str | None, str]:
    """(the base to load the adapter on, or None when --model is the adapter; the adapter
    folder). No adapter anywhere is a UsageError saying to run SFT with LoRA first."""
    from ..models import adapter_base, resolve
    init = run.options["init_adapter"]
    model_is_adapter = adapter_base(resolve(run.model)) is not None
    if init:
        if not (Path(init) / "adapter_config.json").is_file():
            raise UsageError(f"--init-adapter {init}: not a peft adapter folder (no "
                             "adapter_config.json)")
        if model_is_adapter:
            raise UsageError(f"--model {run.model} is an adapter folder already: with "
                             "--init-adapter, --model is the adapter's base")
        return str(run.model), str(init)
    if not model_is_adapter:
        raise UsageError(f"essa searches the singular values of a LoRA adapter, and --model "
                         f"{run.model} is a full model with no --init-adapter. Train one "
                         f"first: alignkit train-policy --method sft --lora-r 16 --model "
                         f"{run.model} SFT.jsonl -o sft-lora, then pass --model sft-lora (or "
                         f"--model {run.model} --init-adapter sft-lora)")
    return None, str(run.model)


# --- the search space -----------------------------------------------------------------------

class SingularValues:
    """The LoRA modules of a peft model as U diag(s(1 + z)) Vᵀ (es.py): `base` is the
    concatenated s, `apply(z)` writes B' and A' into the model in place."""

    def __init__(self, model):
        import torch
        from peft.tuners.lora import LoraLayer

        from .es import lora_svd
        self.model = model
        name = model.active_adapter if isinstance(model.active_adapter, str) else \
            model.active_adapter[0]
        cfg = model.peft_config[name]
        if str(getattr(cfg.peft_type, "value", cfg.peft_type)) != "LORA":
            raise UsageError(f"essa needs a LoRA adapter, got {cfg.peft_type}")
        if getattr(cfg, "use_dora", False):
            raise UsageError("essa cannot search a DoRA adapter (its magnitude vector is not "
                             "part of B A); use a plain LoRA adapter")
        self.modules = []  # (name, B param, scaling, U, Vh)
        parts = []
        for mname, mod in model.named_modules():
            if not isinstance(mod, LoraLayer) or name not in getattr(mod, "lora_A", {}):
                continue
            A, B = mod.lora_A[name].weight, mod.lora_B[name].weight
            if A.dim() != 2 or B.dim() != 2:
                raise UsageError(f"essa supports linear LoRA modules only ({mname})")
            c = float(mod.scaling[name])
            U, s, Vh = lora_svd(B, A, c)
            with torch.no_grad():
                A.copy_(Vh.to(A.dtype))  # A' = Vᵀ is fixed; B' carries s
            self.modules.append((mname, B, c, U, Vh))
            parts.append(s)
        if not parts:
            raise UsageError("the adapter has no LoRA modules")
        self.base = torch.cat(parts)
        if float(self.base.abs().max()) == 0.0:
            raise UsageError("the adapter's update B A is zero (a fresh, untrained adapter): "
                             "train it first with train-policy --method sft --lora-r ...")
        self.r = [int(p.numel()) for p in parts]
        self.apply(torch.zeros_like(self.base))  # B' = U diag(s)/c: the same ΔW as loaded

    @property
    def n(self) -> int:
        return int(self.base.numel())

    def apply(self, z) -> None:
        """Write B' = U diag(s (1 + z))/c into every module (A' = Vᵀ is already there)."""
        import torch

        from .es import lora_factors
        s_all = self.base * (1.0 + z)
        at = 0
        with torch.no_grad():
            for (_, B, c, U, Vh), r in zip(self.modules, self.r):
                b, _ = lora_factors(U, s_all[at:at + r], Vh, c)
                B.copy_(b.to(B.dtype))
                at += r


# --- the run --------------------------------------------------------------------------------

def load_adapter(run: PolicyRun, base: str | None, adapter: str):
    """(the peft model, its tokenizer), frozen, on the GPU when there is one."""
    import torch

    from ..models import load_causal_lm, resolve, torch_dtype
    weights = {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(
        torch_dtype(run.opts.dtype), "float32")
    kw = dict(allow_pickle=run.allow_pickle, trust_remote_code=run.trust_remote_code)
    if base is None:
        model, tok = load_causal_lm(adapter, weights, **kw)
    else:
        from peft import PeftModel
        plain, tok = load_causal_lm(base, weights, **kw)
        model = PeftModel.from_pretrained(plain, adapter, is_trainable=False)
        for cfg in model.peft_config.values():  # the folder sits on --model
            cfg.base_model_name_or_path = str(resolve(base).resolve())
    if not hasattr(model, "peft_config"):
        raise UsageError(f"{adapter}: not a peft adapter")
    for p in model.parameters():
        p.requires_grad_(False)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    return model, tok


def fitness(model, tok, reward, records: list[dict], idx: list[int], params) -> float:
    """The mean combined reward of one completion per prompt (unscored rows skipped;
    NaN when none is scored)."""
    from ..generation import sample
    recs = [records[i] for i in idx]
    out = sample(model, tok, [r["prompt"] for r in recs], params,
                 keys=[str(r["id"]) for r in recs], progress=console.NullTask())
    scores = reward(None, [o[0]["text"] for o in out], idx)
    vals = [float(v) for v in scores if v is not None and v == v]
    return sum(vals) / len(vals) if vals else float("nan")


@quiet
def train_essa(run: PolicyRun) -> Path:
    """ESSA (see the module docstring): checks, then the ES loop, then the folder."""
    from ..models import load_tokenizer
    from ..scorers.options import ScorerOptions
    from ..training import prepare_run
    from . import reward_blend
    from .online import check_rules, prompt_rows, reward_fn, reward_specs
    started = time.time()
    check_flags(run)
    base, adapter = adapter_source(run)
    specs = reward_specs(run.rewards)
    scoring = run.scoring if run.scoring is not None else ScorerOptions()
    reward_blend.check(run.method, run.options, run.reward_weights, specs, scoring)
    scorer = scoring.build(specs, run.reward_weights, dtype="auto",
                           allow_pickle=run.allow_pickle, trust_remote_code=run.trust_remote_code)
    check_rules(run.data, scorer)
    o = run.options
    rows, dropped = prompt_rows(run.data, load_tokenizer(base or adapter, run.trust_remote_code),
                                 o["max_new_tokens"], run.opts.max_length)
    work = prepare_run(run.out, run.opts)
    try:
        model, tok = load_adapter(run, base, adapter)
        z, space, history = search(run, model, tok, reward_fn(scorer, run.data.records),
                                   [r["row"] for r in rows], work)
        space.apply(z)
        return write(run, model, tok, work, started, space, history, specs, scoring,
                     {"records": len(run.data.records), "prompts": len(rows),
                      "dropped": dropped}, adapter)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def search(run: PolicyRun, model, tok, reward, pool: list[int], work: Path):
    """The ES loop; returns (the final z, the search space, the per-generation rows)."""
    import torch

    from ..generation import SampleParams
    from .es import antithetic_noise, auto_popsize, centered_ranks, es_update
    o, seed = run.options, run.opts.seed
    with torch.no_grad():
        space = SingularValues(model)
    n = space.n
    lam = o["popsize"] or auto_popsize(n)
    sigma, lr, gens = o["sigma0"], o["es_lr"], o["generations"]
    size = min(o["fitness_batch"], len(pool))
    console.info(f"essa: {len(space.modules)} LoRA modules, n = {n} singular values, "
                 f"population {lam}, {size} prompts x {gens} generations")
    z = torch.zeros(n, dtype=torch.float64)
    history = []
    t0 = time.time()
    every = max(1, gens // 20)
    with torch.no_grad(), console.progress("essa", total=gens) as task:
        for g in range(gens):
            idx = sorted(random.Random(key_seed(seed, "batch", g)).sample(pool, size))
            params = SampleParams(n=1, temperature=o["temperature"],
                                  max_new_tokens=o["max_new_tokens"],
                                  seed=key_seed(seed, "sample", g) % (2 ** 31))
            noise = antithetic_noise(n, lam, key_seed(seed, "noise", g))
            fit = []
            for i in range(lam):
                space.apply(z + sigma * noise[i])
                fit.append(fitness(model, tok, reward, run.data.records, idx, params))
            new = es_update(z, noise, centered_ranks(fit), lr, sigma)
            finite = [f for f in fit if f == f]
            mean = sum(finite) / len(finite) if finite else None
            std = (sum((f - mean) ** 2 for f in finite) / len(finite)) ** 0.5 if finite else None
            row = {"step": g + 1, "generation": g + 1, "fitness_mean": mean,
                   "fitness_best": max(finite) if finite else None,
                   "fitness_worst": min(finite) if finite else None, "fitness_std": std,
                   "sigma": sigma, "update_norm": float((new - z).norm()),
                   "z_norm": float(new.norm()), "time_s": round(time.time() - t0, 2)}
            z = new
            history.append(row)
            with open(work / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            task.advance(1)
            if (g + 1) % every == 0 or g + 1 == gens:
                console.info(f"essa generation {g + 1}/{gens}: fitness mean "
                             f"{_fmt(mean)}, best {_fmt(row['fitness_best'])}")
    return z, space, history


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def write(run: PolicyRun, model, tok, work: Path, started: float, space, history, specs,
          scoring, counts: dict, adapter: str) -> Path:
    """The output folder: the adapter (peft's save_pretrained), tokenizer, alignkit.json,
    README.md and metrics.jsonl (`training.save_output`)."""
    from ..training import save_output
    from .common import sha_or_none, hparams
    o = run.options
    hp = hparams(run, None, rewards=specs, reward_weights=run.reward_weights,
                 hybrid=bool(scoring.hybrid), calibrate=scoring.calibrate,
                 transform=scoring.transform, es="openai-es (antithetic, centred ranks)",
                 search_dim=space.n, lora_modules=len(space.modules),
                 popsize=o["popsize"] or _auto(space.n), sigma0=o["sigma0"], es_lr=o["es_lr"],
                 fitness_batch=o["fitness_batch"], generations=o["generations"],
                 max_new_tokens=o["max_new_tokens"], temperature=o["temperature"],
                 written="final mean")
    for k in ("lr", "lora_r"):
        hp.pop(k, None)
    info = {"method": "essa", "trainer": run.method.trainer, "hyperparameters": hp,
            "data": {"path": run.data.path, "sha256": run.data.sha256, "kind": run.data.kind,
                     **counts},
            "base": {"spec": str(run.model), "sha256": sha_or_none(run.model)},
            "init_adapter": {"path": str(Path(adapter).resolve()),
                             "sha256": sha_or_none(adapter)},
            "reference": None, "final_metrics": history[-1] if history else {}}
    save_output(model, tok, run.out, work, force=run.opts.force, merge_lora=run.opts.merge_lora,
                info=info, started=started, seed=run.opts.seed,
                inputs={"data": run.data.sha256})
    last = history[-1]["fitness_mean"] if history else None
    console.info(f"wrote {run.out} (essa, final generation fitness mean {_fmt(last)})")
    return Path(run.out)


def _auto(n: int) -> int:
    from .es import auto_popsize
    return auto_popsize(n)
