"""The two ways to look inside a wrapped model; every caller says which one it means.

* :func:`unwrap_distributed` removes the distributed wrappers (DDP, accelerate's ``.module``) and keeps
  a PEFT model as it is: its adapters are part of the model (a LoRA policy, ``disable_adapter``).
* :func:`strip_peft` goes further, to the transformers model itself: the one whose ``config``,
  ``generation_config``, ``get_output_embeddings`` and ``forward`` signature callers read.
* :func:`gathered_weights` makes DeepSpeed ZeRO-3's partitioned parameters whole for a block;
  :func:`unsharded` does the same for FSDP2's sharded ones, kept whole through every forward of the block.
* :func:`adapters_disabled` is PEFT's ``disable_adapter`` made safe for FSDP2's sharded units.
"""

from __future__ import annotations

import contextlib

import torch


def unwrap_distributed(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP/accelerate wrappers (a PEFT model is kept: its adapters matter)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def strip_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside DDP/accelerate and PEFT wrappers."""
    model = unwrap_distributed(model)
    get_base = getattr(model, "get_base_model", None)  # peft.PeftModel
    return get_base() if callable(get_base) else model


@contextlib.contextmanager
def gathered_weights(*models, modifier_rank: int | None = None):
    """Under DeepSpeed ZeRO-3 (``zero3_init_flag``: parameters partitioned as they are loaded) every
    process holds the whole parameters of ``models`` inside this block (``deepspeed.zero.GatheredParameters``;
    with ``modifier_rank`` that process's changes are kept). A collective: every process must enter it.
    Anywhere else it does nothing."""
    from transformers.integrations import is_deepspeed_zero3_enabled

    models = [m for m in models if m is not None]
    if not models or not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    params = [p for m in models for p in m.parameters()]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank):
        yield


def fsdp_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of ``model`` that FSDP2's ``fully_shard`` made sharded units (none outside FSDP2)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without FSDP2
        return []
    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def unsharded(model: torch.nn.Module):
    """Under FSDP2 every process holds the whole parameters of ``model`` inside this block: each
    sharded unit is all-gathered once on entering (``FSDPModule.unshard``), kept whole through every
    forward of the block (``set_reshard_after_forward(False)``, as torch's documentation suggests for
    evaluation) and resharded on leaving, each unit back to its own setting.

    For generation: each process decodes its own prompts for as many steps as its responses need, a
    different number of forwards on each process, which FSDP's gathers at every forward would
    deadlock (and one gather per rollout instead of one per token). Costs the whole model's memory
    for the block, as DeepSpeed ZeRO-3's gathered generation does. A collective: every process
    must enter it. Anywhere else it does nothing."""
    units = fsdp_units(model)
    if not units:
        yield
        return
    # whether each unit reshards after its forward (accelerate: the transformer blocks yes, the root
    # and the embedding/head tail no); FSDP2 keeps it as the presence of a post-forward mesh
    resharding = [
        any(g.post_forward_mesh_info is not None for g in u._get_fsdp_state()._fsdp_param_groups) for u in units
    ]
    # FSDP2 takes the first unit to run forward for the root; generate calls the embedding (a unit of
    # its own) before the model's forward, so the root is settled here (a no-op after the first time)
    units[0]._get_fsdp_state()._lazy_init()
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    try:
        yield
    finally:
        for unit, reshard in zip(units, resharding):
            unit.reshard()
            unit.set_reshard_after_forward(reshard, recurse=False)


def _units_with_adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units of ``model`` that own (not through a unit inside them) a PEFT layer whose
    ``requires_grad`` PEFT switches: an adapter layer (LoRA's) or a wrapper such as
    ``modules_to_save``'s."""
    units = fsdp_units(model)
    if not units:
        return []
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    owners: list[torch.nn.Module] = []

    def visit(module: torch.nn.Module, owner: torch.nn.Module | None) -> None:
        owner = module if any(module is unit for unit in units) else owner
        if isinstance(module, (BaseTunerLayer, AuxiliaryTrainingWrapper)) and owner is not None:
            if not any(owner is seen for seen in owners):
                owners.append(owner)
        for child in module.children():
            visit(child, owner)

    visit(model, None)
    return owners


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The network under a PEFT model's adapters (PEFT's ``disable_adapter``): the reference of a LoRA
    policy, the reward model under a LoRA critic started from it.

    PEFT switches ``requires_grad`` as it goes: off, the adapter weights are frozen and a
    ``modules_to_save`` layer's original is made trainable; back on, the reverse. FSDP2 keeps two
    parameter objects per weight, the shard (which the optimizer holds) and the whole copy a forward
    uses, and copies the shard's flag onto the whole copy at every gather. A unit that keeps its
    weights whole after a forward (accelerate's root and tail units: the embedding, the heads) has its
    whole copies registered on the module, so PEFT's switch would land on them and be lost at the
    next gather: a LoRA critic whose first forward ran with its adapters off then never trains its
    head copy again. So under FSDP2 each unit holding a PEFT layer is resharded (its shards
    registered; no communication) before each switch. Anywhere else this is ``disable_adapter`` alone."""
    units = _units_with_adapter_layers(model)
    for unit in units:
        unit.reshard()
    with unwrap_distributed(model).disable_adapter():
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()
