"""The two ways to look inside a wrapped model; every caller says which one it means.

* :func:`unwrap_distributed` removes the distributed wrappers (DDP, accelerate's ``.module``) and keeps
  a PEFT model as it is: its adapters are part of the model (a LoRA policy, ``disable_adapter``).
* :func:`strip_peft` goes further, to the transformers model itself: the one whose ``config``,
  ``generation_config``, ``get_output_embeddings`` and ``forward`` signature callers read.
"""

from __future__ import annotations

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
