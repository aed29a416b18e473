"""`alignkit merge-soup`: merge model folders (linear soup, slerp, task arithmetic, TIES, DARE)."""
from __future__ import annotations

from typing import List, Optional

import typer

from alignkit import soup  # light: the registry only (no torch)

from ._common import force_opt, out_dir_opt, seed_opt, with_params


@with_params(params=soup.METHODS)
def merge_soup(
    models: List[str] = typer.Argument(..., help="Model folders, PEFT LoRA adapter folders or "
                                                 "embedded model names to merge."),
    output: str = out_dir_opt("Output model folder (written atomically; loads in plain transformers)."),
    method: str = typer.Option("linear", "--method", "-m",
                               help="Merge method: " + soup.methods_help() + "."),
    base: Optional[str] = typer.Option(
        None, "--base", help="Base model: the origin of the task vectors (task-arithmetic, ties, "
                             "dare-*), the first slerp endpoint, or (linear, uniform) only the "
                             "source of config and tokenizer. Config, tokenizer, chat template "
                             "and generation config come from --base, else the first model."),
    weights: Optional[str] = typer.Option(None, "--weights",
                                          help="Comma-separated weights, one per MODEL (default 1 each)."),
    seed: int = seed_opt(),
    dtype: str = typer.Option("auto", "--dtype", help="Output dtype: auto (the reference model's) | "
                                                      "float32 | bfloat16 | float16. Arithmetic is float32."),
    max_shard_size: str = typer.Option("2GB", "--max-shard-size",
                                       help="Largest output shard (e.g. 2GB, 500MiB); more than one "
                                            "shard gets a model.safetensors.index.json."),
    force: bool = force_opt(),
    params: dict = None,
) -> None:
    """Merge models tensor by tensor into one folder (a model soup), streaming from safetensors.

    Memory stays near one tensor per input plus one output tensor: inputs are read one
    tensor at a time and each merged tensor is written as soon as it is computed.
    Models must share architecture, tensor shapes and vocabulary (else exit 2, naming the
    first offending tensor). A LoRA adapter is merged into its own base first (W + s*B*A)
    and then treated as a full model; adapters are never averaged in adapter space.
    DARE rescales kept entries by 1/density (the paper); --rescale l1 gives mergekit's
    L1-norm rescale. The output's alignkit.json records method, weights, parameters and
    the inputs' sha256.

    Example:  alignkit merge-soup --method linear sft_a sft_b --weights 0.5,0.5 -o soup
    """
    import time

    from alignkit import console
    from alignkit.io import check_output_dir
    started = time.time()
    check_output_dir(output, force)  # before any model is read
    cfg = soup.build_config(method, models, base=base, weights=soup.parse_weights(weights),
                            params=params, seed=seed, dtype=dtype, max_shard_size=max_shard_size)
    soup.merge(cfg, output, force=force)
    console.debug(f"merge-soup took {time.time() - started:.1f}s")


def register(app: typer.Typer) -> None:
    app.command("merge-soup")(merge_soup)
