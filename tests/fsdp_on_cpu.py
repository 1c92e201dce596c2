"""Let accelerate's own FSDP2 code run on CPU processes (gloo), for the tests only.

accelerate shards with FSDP on GPUs only: on CPU processes ``AcceleratorState`` keeps the run as
MULTI_CPU (plain data parallel) and drops the FSDP plugin it was given, whatever the config says.
PyTorch's ``fully_shard`` itself works on CPU tensors over gloo. Importing this module lifts that
one gate: when an FSDP plugin is given (``accelerate launch`` with an FSDP config) on CPU
processes, the state becomes FSDP with that plugin, so ``Trainer``/``Accelerator.prepare``,
``get_state_dict`` and the sharded checkpoint code are accelerate's and transformers' own, unchanged.
Nothing of tether is replaced.
"""

from __future__ import annotations

import accelerate.state
from accelerate.utils import DistributedType

_original_init = accelerate.state.AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


accelerate.state.AcceleratorState.__init__ = _init
