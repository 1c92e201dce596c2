"""Batch sizes that fit the device: start with the whole batch, halve after an out-of-memory error.

PPO's no-grad passes, sampling and the update's micro-batches run best in the largest chunks memory
allows, and how large that is depends on the model, the vocabulary, the sequence lengths and the
device, none of which a fixed default knows. So tether starts from the whole batch (or the size the
user set) and lets the device say no.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import torch

logger = logging.getLogger("tether")
T = TypeVar("T")


def _several_processes() -> bool:
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def run_fitting_memory(step: Callable[[int], T], size: int, what: str) -> tuple[T, int]:
    """``step(size)``, retried with half the size after an out-of-memory error until it fits.

    accelerate decides what counts as out of memory (``should_reduce_batch_size``: CUDA, XPU, MPS and
    CPU-allocator errors) and empties the device cache between tries (``clear_device_cache``). Its
    ``find_executable_batch_size`` is not used as is: it runs a full garbage collection before every
    call, which costs more than a small model's forward pass on this hot path, and it empties the
    cache while the failed try's tensors are still held by the exception. Sizes halve (not ×0.9) so
    they keep dividing power-of-two batches. Returns ``step``'s result and the size that ran, which
    the caller keeps as the next call's starting size.

    Under several processes the error is raised (naming ``what``, which names the option): the
    others would wait forever in their next collective (FSDP and ZeRO-3 forwards gather weights)
    while one process retried alone. A single row that does not fit raises too.
    """
    from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size

    while True:
        try:
            return step(size), size
        except Exception as exc:  # noqa: BLE001  (only out-of-memory errors are retried)
            if not should_reduce_batch_size(exc):
                raise
            if _several_processes():
                raise RuntimeError(
                    f"{what}: out of memory at {size} rows per process; several processes cannot "
                    "shrink it on their own: set the size lower"
                ) from exc
            if size <= 1:
                raise RuntimeError(
                    f"{what}: out of memory with a single row; lower --max_new_tokens, "
                    "--max_prompt_length or the model's size"
                ) from exc
        # outside the except block: the failed try's frames (and their tensors) are gone by now
        clear_device_cache(garbage_collection=True)
        size //= 2
        logger.warning("tether: %s ran out of memory; retrying in chunks of %d rows", what, size)
