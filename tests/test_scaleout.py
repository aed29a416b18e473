"""Training across processes with `accelerate launch` and the configs of
examples/accelerate/, on the tiny Llama, CPU processes and gloo:

- every shipped YAML parses with accelerate's own loader and launcher, and names the
  distributed type (and the FSDP / DeepSpeed settings) it promises;
- FSDP2 over 2 processes (examples/accelerate/fsdp_cpu_launch.py: accelerate turns FSDP
  on only on accelerator devices) shards the model, and train-policy --method dpo writes a
  plain transformers folder of full, trained weights;
- a 2-process FSDP2 run stopped by a SIGTERM that reaches one rank only checkpoints on
  both at the same step, and --resume ends with the uninterrupted run's weights;
- 2-process DDP (examples/accelerate/ddp_cpu.yaml) trains the weights 1 process trains
  at the same global batch (and FSDP2 the weights DDP trains), within float tolerance.

DeepSpeed is not installed here (and accelerate never enables it on CPU): its configs are
checked as far as accelerate's launcher and DeepSpeedPlugin take them, without running.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import metrics, write_jsonl
from test_train_policy import pair_records

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "accelerate"
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
STEPS = 4
# fp32 so that the comparisons below measure the launch, not bf16 rounding
ARGS = ["train-policy", "--method", "dpo", "--max-steps", str(STEPS), "--max-length", "64",
        "--lr", "1e-3", "--dtype", "float32", "--seed", "3"]

# A rank-selective SIGTERM: SIGTERM_AT="STEP:RANK" signals that rank alone as it starts
# step STEP+1, then runs the FSDP-on-CPU launcher.
SIGNALLER = """
import os, runpy, signal, sys
at, rank = map(int, os.environ["SIGTERM_AT"].split(":"))
from transformers import Trainer
step = Trainer.training_step
def training_step(self, *a, **kw):
    if self.state.global_step == at and self.args.process_index == rank \\
            and not getattr(self, "_signalled", False):
        self._signalled = True
        os.kill(os.getpid(), signal.SIGTERM)
    return step(self, *a, **kw)
Trainer.training_step = training_step
sys.argv[0] = {launcher!r}
runpy.run_path({launcher!r}, run_name="__main__")
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _rel_diff(a: dict, b: dict, base: dict) -> float:
    """|a - b| / |b - base| over all weights: the gap relative to what training moved."""
    num = sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a) ** 0.5
    den = sum(float(((b[k].double() - base[k].double()) ** 2).sum()) for k in a) ** 0.5
    return num / den



@pytest.fixture(scope="module")
def scale(tmp_path_factory, tiny_model):
    """The pairs, a shared ALIGNKIT_HOME (the reference cache: every run reads the values
    the first computed) and a 2-process launcher."""
    d = tmp_path_factory.mktemp("scaleout")
    pairs = write_jsonl(d / "pairs.jsonl", pair_records(8, prefix="x"))
    env = {**os.environ, "ALIGNKIT_HOME": str(d / "home"), "OMP_NUM_THREADS": "1"}

    def launch(config: str, script: list[str], out: Path, *extra, batch=2, env_extra=None):
        cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / config),
               "--num_processes", "2", "--main_process_port", str(_free_port()), *script,
               *ARGS, "--model", str(tiny_model), str(pairs), "-o", str(out),
               "--batch-size", str(batch), *extra]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**env, **(env_extra or {})})

    return {"dir": d, "pairs": pairs, "launch": launch}


FSDP = ("fsdp2_cpu.yaml", [str(CONFIGS / "fsdp_cpu_launch.py")])
DDP = ("ddp_cpu.yaml", ["-m", "alignkit"])


@pytest.fixture(scope="module")
def fsdp_run(scale):
    out = scale["dir"] / "fsdp"
    p = scale["launch"](*FSDP, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out, p.stderr


@pytest.fixture(scope="module")
def ddp_run(scale):
    out = scale["dir"] / "ddp"
    p = scale["launch"](*DDP, out)
    assert p.returncode == 0, p.stderr[-3000:]
    return out


# --- the configs ----------------------------------------------------------------------------

EXPECTED = {  # config -> (distributed type, launcher environment it must produce)
    "ddp.yaml": ("MULTI_GPU", {}),
    "ddp_cpu.yaml": ("MULTI_GPU", {}),
    "fsdp2.yaml": ("FSDP", {"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                            "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP",
                            "FSDP_RESHARD_AFTER_FORWARD": "true",
                            "FSDP_CPU_RAM_EFFICIENT_LOADING": "false"}),
    "fsdp2_cpu.yaml": ("FSDP", {"FSDP_VERSION": "2", "FSDP_STATE_DICT_TYPE": "FULL_STATE_DICT",
                                "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}),
    "deepspeed_zero2.yaml": ("DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}),
    "deepspeed_zero3.yaml": ("DEEPSPEED", {"ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                                           "ACCELERATE_DEEPSPEED_ZERO3_SAVE_16BIT_MODEL": "true",
                                           "ACCELERATE_DEEPSPEED_ZERO3_INIT": "false"}),
}


def test_every_config_parses_and_names_its_distributed_type(monkeypatch):
    from unittest import mock

    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(EXPECTED)
    for name, (kind, want) in EXPECTED.items():
        path = str(CONFIGS / name)
        cfg = load_config_from_file(path)
        assert str(cfg.distributed_type).rsplit(".", 1)[-1] == kind, name
        assert cfg.num_machines == 1 and cfg.machine_rank == 0, name
        assert cfg.use_cpu == (name == "fsdp2_cpu.yaml"), name
        # what `accelerate launch --config_file` makes of it: the processes' environment
        args = launch_command_parser().parse_args(
            ["--config_file", path, "--num_processes", "2", "-m", "alignkit", "train-policy"])
        args, defaults, _ = _validate_launch_command(args)
        if kind == "DEEPSPEED":
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            _, env = prepare_deepspeed_cmd_env(args)
        else:
            env = prepare_multi_gpu_env(args)
        assert env.get("ACCELERATE_USE_FSDP", "false") == ("true" if kind == "FSDP" else "false")
        assert {k: env.get(k) for k in want} == want, name
        with mock.patch.dict(os.environ, env, clear=True):  # the plugins built from it
            if kind == "FSDP":
                plugin = FullyShardedDataParallelPlugin()
                assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
                assert str(plugin.state_dict_type).endswith("FULL_STATE_DICT")
            elif kind == "DEEPSPEED":
                zero = DeepSpeedPlugin().deepspeed_config["zero_optimization"]
                assert zero["stage"] == int(want["ACCELERATE_DEEPSPEED_ZERO_STAGE"])
                assert zero["stage3_gather_16bit_weights_on_model_save"] is (zero["stage"] == 3)


def test_readme_commands_name_shipped_configs():
    text = (CONFIGS / "README.md").read_text()
    for cmd in ("train-policy --method dpo", "train-policy --method grpo", "train-rm",
                "distill", "--num_machines", "--machine_rank", "--main_process_ip"):
        assert cmd in text, cmd
    for name in EXPECTED:
        assert f"examples/accelerate/{name}" in text, name


# --- FSDP2 ----------------------------------------------------------------------------------

@pytest.mark.distributed
def test_fsdp2_two_processes_write_full_trained_weights(fsdp_run, tiny_model):
    from transformers import AutoModelForCausalLM
    out, err = fsdp_run
    # both ranks held half of the first parameter: the model really was sharded
    # (the two ranks write their line at the same moment: they may share one line of err)
    shards = re.findall(r"fsdp2: rank (\d+) holds (\(\d+, \d+\)) of model\.embed_tokens\.weight "
                        r"\(512, 64\)", err)
    assert sorted(shards) == [("0", "(256, 64)"), ("1", "(256, 64)")], err[-2000:]
    assert err.count("wrote ") == 1  # one process writes the one folder
    man = json.loads((out / "alignkit.json").read_text())
    assert man["processes"] == 2
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    # the full weights, as a plain save writes them (the tied lm_head kept once)
    base, got = _weights(Path(tiny_model)), _weights(out)
    assert got.keys() == base.keys()
    assert all(got[k].shape == base[k].shape for k in base)
    assert _max_diff(got, base) > 1e-3  # trained
    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no alignkit
    assert model.model.embed_tokens.weight.shape == (512, 64)
    assert (model.lm_head.weight == model.model.embed_tokens.weight).all()
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith("fsdp")) == ["fsdp"]


@pytest.mark.distributed
def test_fsdp2_sigterm_to_one_rank_checkpoints_both_then_resume_matches(scale, fsdp_run):
    """Rank 1 alone gets the signal, during step 2; both ranks must stop after step 2
    (a rank stopping alone would leave the other waiting in step 3's collectives)."""
    full, _ = fsdp_run
    out = scale["dir"] / "stopped"
    signaller = scale["dir"] / "signal_rank.py"
    signaller.write_text(SIGNALLER.format(launcher=str(CONFIGS / "fsdp_cpu_launch.py")))
    p = scale["launch"](FSDP[0], [str(signaller)], out, env_extra={"SIGTERM_AT": "1:1"})
    assert p.returncode != 0 and re.search(r"exitcode\s*:\s*130", p.stderr), p.stderr[-3000:]
    assert p.stderr.count("checkpoint saved in") == 1, p.stderr[-3000:]  # said once
    assert not out.exists()
    partial = scale["dir"] / "stopped.partial"
    assert sorted(c.name for c in partial.glob("checkpoint-*")) == ["checkpoint-2"]
    ckpt = partial / "checkpoint-2"  # complete, with both ranks' RNG states
    assert {"trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"} <= {
        f.name for f in ckpt.iterdir()}, sorted(f.name for f in ckpt.iterdir())
    p = scale["launch"](*FSDP, out, "--resume")
    assert p.returncode == 0, p.stderr[-3000:]
    assert not partial.exists()
    assert [r["step"] for r in metrics(out) if "loss" in r] == list(range(1, STEPS + 1))
    # the same weights as the uninterrupted run (fp32; seen: identical)
    assert _max_diff(_weights(out), _weights(full)) <= 1e-6


# --- DDP against one process ----------------------------------------------------------------

@pytest.mark.distributed
def test_ddp_two_processes_match_one_process_at_the_same_global_batch(scale, ddp_run, fsdp_run,
                                                                      tiny_model, cli):
    """2 processes x batch 2 (DDP averages the two ranks' gradients) against 1 process x
    batch 4: the same pairs in each step, the same mean loss. What differs is float
    rounding: each rank pads its 2 pairs to their own longest (1 process: all 4), the
    gradients are summed in another order, and 1 process runs alignkit's CPU head instead
    of TRL's, all ~1e-7 relative. Adam divides every update by the gradient's running
    RMS, so such noise moves a weight by a small fraction of lr per step: the tolerance is
    1e-4 per weight (a tenth of one step at lr 1e-3; seen: 1.3e-6) and 1e-3 of the total
    change training made (seen: 4e-6), while training moved the weights by up to 2.5e-3."""
    one = scale["dir"] / "one"
    r = cli([*ARGS, "--model", tiny_model, scale["pairs"], "-o", one, "--batch-size", "4"])
    assert r.code == 0, r.err
    base = _weights(Path(tiny_model))
    ddp, single = _weights(ddp_run), _weights(one)
    assert _max_diff(single, base) > 1e-3
    assert _max_diff(ddp, single) <= 1e-4
    assert _rel_diff(ddp, single, base) <= 1e-3
    losses = [[r["loss"] for r in metrics(f) if "loss" in r] for f in (ddp_run, one)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    # FSDP2 (reduce-scatter of the same gradients) against DDP: seen 1.2e-7
    assert _max_diff(_weights(fsdp_run[0]), ddp) <= 1e-5
    assert json.loads((ddp_run / "alignkit.json").read_text())["processes"] == 2


@pytest.mark.distributed
def test_fsdp2_online_grpo_samples_from_the_sharded_policy(tmp_path, tiny_model):
    """Online methods sample from the FSDP2-sharded policy (gathered under no_grad, not
    inference mode, so the training step can update the parameters afterwards)."""
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"id": f"q{i}", "prompt": p} for i, p in
                                                  enumerate(["hello", "Write", "Say", "Name"])])
    out = tmp_path / "grpo"
    cmd = [ACCELERATE, "launch", "--config_file", str(CONFIGS / "fsdp2_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           str(CONFIGS / "fsdp_cpu_launch.py"), "train-policy", "--method", "grpo",
           "--model", str(tiny_model), str(prompts), "-o", str(out), "--reward", "length:8:4",
           "--max-new-tokens", "8", "--num-generations", "4", "--batch-size", "4",
           "--max-steps", "2", "--lr", "1e-2"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert "rank 1 holds (256, 64)" in p.stderr
    trained, base = _weights(out), _weights(tiny_model)
    assert set(trained) == set(base) and _max_diff(trained, base) > 1e-4
