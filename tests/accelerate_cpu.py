"""Run a training script through accelerate's FSDP or DeepSpeed code path on CPU processes (gloo), for
tests/test_fsdp.py and tests/test_deepspeed.py.

Usage: accelerate launch --config_file examples/accelerate_fsdp2.yaml tests/accelerate_cpu.py SCRIPT ARGS...
       python -m torch.distributed.run --nproc_per_node 2 tests/accelerate_cpu.py SCRIPT ... --deepspeed CONFIG.json

accelerate enables its FSDP and DeepSpeed plugins only on accelerators: on a CPU machine its state says MULTI_CPU and
the script silently trains with DDP. This launcher lets the plugin stand when accelerate chose CPU processes, so that
``fsdp2_prepare_model`` (fully_shard of every decoder layer and of the root, the memory-efficient loading through the
meta device) or ``deepspeed.initialize`` (DeepSpeed's CPU accelerator, DS_ACCELERATOR=cpu), and the Trainer's saving
and resuming under them, run as they do on GPUs, over gloo. For DeepSpeed it also starts DeepSpeed's communication
first, as accelerate does on GPUs, so that ZeRO-3 can partition the weights while they load. Nothing else changes.

After training, each rank writes ``<output_dir>/engine_rank<r>.json``: which engine wrapped the model and a digest of
the generator, so that the tests can check that the engine ran and that the ranks agree.
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


def _state_init(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None, fsdp_plugin=None,
                *args, **kwargs):
    _original_state_init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
    if self.distributed_type != DistributedType.MULTI_CPU:
        return
    if fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
    elif deepspeed_plugin is not None and not isinstance(deepspeed_plugin, dict):
        # what AcceleratorState does for DeepSpeed on an accelerator
        self.distributed_type = DistributedType.DEEPSPEED
        deepspeed_plugin.set_mixed_precision(self._mixed_precision)
        deepspeed_plugin.select(_from_accelerator_state=True)
        self.deepspeed_plugins = deepspeed_plugin
    else:
        return
    accelerate_state.PartialState._shared_state["distributed_type"] = self.distributed_type


_original_train = transformers.Trainer.train


def _train(self, *args, **kwargs):
    output = _original_train(self, *args, **kwargs)
    from torch.distributed.fsdp import FSDPModule

    tuner = self.accelerator.unwrap_model(self.model).base_model
    generator = tuner.get_generator()
    params = torch.cat([p.detach().double().reshape(-1) for p in generator.parameters()])
    report = {
        "fsdp_enabled": bool(self.is_fsdp_enabled),
        "fsdp_version": getattr(getattr(self.accelerator.state, "fsdp_plugin", None), "fsdp_version", None),
        "fsdp_modules": sum(isinstance(m, FSDPModule) for m in self.model.modules()),
        "deepspeed_enabled": bool(self.is_deepspeed_enabled),
        "zero_stage": self.accelerator.state.deepspeed_plugin.zero_stage if self.is_deepspeed_enabled else None,
        "generator_sharded": any(type(p).__name__ == "DTensor" or getattr(p, "ds_tensor", None) is not None
                                 and not getattr(p, "ds_persist", True) for p in generator.parameters()),
        "gradients_synced": tuner.generated_cache().syncs_gradients,
        "generator": hashlib.sha256(params.numpy().tobytes()).hexdigest()[:16],
    }
    path = os.path.join(self.args.output_dir, f"engine_rank{self.accelerator.process_index}.json")
    with open(path, "w") as f:
        json.dump(report, f)
    return output


if __name__ == "__main__":
    accelerate_state.AcceleratorState.__init__ = _state_init
    transformers.Trainer.train = _train
    if "--deepspeed" in sys.argv:
        from deepspeed import comm

        comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
