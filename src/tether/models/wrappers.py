"""The two ways to look inside a wrapped model; every caller says which one it means.

* :func:`unwrap_distributed` removes the distributed wrappers (DDP, accelerate's ``.module``) and keeps
  a PEFT model as it is: its adapters are part of the model (a LoRA policy, ``disable_adapter``).
* :func:`strip_peft` goes further, to the transformers model itself: the one whose ``config``,
  ``generation_config``, ``get_output_embeddings`` and ``forward`` signature callers read.
* :func:`gathered_weights` makes DeepSpeed ZeRO-3's partitioned parameters whole for a block.
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
