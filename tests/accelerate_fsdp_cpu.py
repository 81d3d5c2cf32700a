"""Run a training script through accelerate's FSDP code path on CPU processes (gloo), for tests/test_fsdp.py.

Usage: accelerate launch --config_file examples/accelerate_fsdp2.yaml tests/accelerate_fsdp_cpu.py SCRIPT ARGS...

accelerate enables its FSDP plugin only on accelerators: on a CPU machine its state says MULTI_CPU and the
script would silently train with DDP. This launcher lets the FSDP plugin stand when accelerate chose CPU processes,
so that ``fsdp2_prepare_model`` (fully_shard of every decoder layer and of the root, the memory-efficient loading
through the meta device), the Trainer's FSDP saving and resuming all run as they do on GPUs, on gloo. Nothing else
changes. After training, each rank writes ``<output_dir>/fsdp_rank<r>.json``: whether FSDP wrapped the model and a
digest of the generator, so that the test can check that FSDP ran and that the ranks agree.
"""

import hashlib
import json
import os
import runpy
import sys

import accelerate.state as accelerate_state
import torch
import transformers
from accelerate.utils import DistributedType

_original_state_init = accelerate_state.AcceleratorState.__init__


def _state_init(self, *args, fsdp_plugin=None, **kwargs):
    _original_state_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate_state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


_original_train = transformers.Trainer.train


def _train(self, *args, **kwargs):
    output = _original_train(self, *args, **kwargs)
    from torch.distributed.fsdp import FSDPModule

    tuner = self.accelerator.unwrap_model(self.model).base_model
    generator = tuner.get_generator()
    params = torch.cat([p.detach().double().reshape(-1) for p in generator.parameters()])
    report = {
        "fsdp_enabled": bool(self.is_fsdp_enabled),
        "fsdp_version": getattr(self.accelerator.state.fsdp_plugin, "fsdp_version", None),
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in self.model.modules()),
        "generator_sharded": any(type(p).__name__ == "DTensor" for p in generator.parameters()),
        "gradients_synced": tuner.generated_cache().syncs_gradients,
        "generator": hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16],
    }
    path = os.path.join(self.args.output_dir, f"fsdp_rank{self.accelerator.process_index}.json")
    with open(path, "w") as f:
        json.dump(report, f)
    return output


if __name__ == "__main__":
    accelerate_state.AcceleratorState.__init__ = _state_init
    transformers.Trainer.train = _train
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
