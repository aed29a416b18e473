"""Run alignkit with FSDP over CPU processes, to try the sharded code paths without a GPU.

accelerate turns FSDP on only on accelerator devices: on a CPU-only machine its state
says MULTI_CPU (DDP) even when the config asks for FSDP, and the model is never sharded.
This launcher marks accelerate's state as FSDP when the launcher asked for it
(ACCELERATE_USE_FSDP=true), then runs alignkit's CLI unchanged; torch's fully_shard
(FSDP2) then shards the parameters over the gloo process group. Each rank says on stderr
how much of the first parameter it holds, so a run shows that it was sharded:

    OMP_NUM_THREADS=1 accelerate launch --config_file examples/accelerate/fsdp2_cpu.yaml \\
        examples/accelerate/fsdp_cpu_launch.py train-policy --method dpo --model tiny-llama \\
        pairs.jsonl -o out

A testing aid (tests/test_scaleout.py uses it), not a way to train faster: on GPUs use
`accelerate launch --config_file examples/accelerate/fsdp2.yaml -m alignkit ...`.
"""
import os
import runpy
import sys

import accelerate.accelerator as _accelerator
import accelerate.state as _state
from accelerate.utils import DistributedType

_init = _state.AcceleratorState.__init__


def _fsdp_on_cpu(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    # every AcceleratorState() re-reads the process state (MULTI_CPU): set it again each time
    if (os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
            and self.distributed_type == DistributedType.MULTI_CPU):
        plugin = kwargs.get("fsdp_plugin") or self.__dict__.get("fsdp_plugin")
        if plugin is not None:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin


_prepare = _accelerator.fsdp2_prepare_model


def _prepare_and_report(accelerator, model):
    model = _prepare(accelerator, model)
    name, p = next(iter(model.named_parameters()))
    local = tuple(p.to_local().shape) if hasattr(p, "to_local") else tuple(p.shape)
    print(f"fsdp2: rank {accelerator.process_index} holds {local} of {name} {tuple(p.shape)}",
          file=sys.stderr, flush=True)
    return model


_state.AcceleratorState.__init__ = _fsdp_on_cpu
_accelerator.fsdp2_prepare_model = _prepare_and_report

if __name__ == "__main__":
    sys.argv[0] = "alignkit"
    runpy.run_module("alignkit", run_name="__main__", alter_sys=True)
