"""ZeRO-3 parameters, in one place: their full shape and size, and a block in which they are whole.

Under ZeRO-3 each rank holds a shard of every parameter; `p.shape` is then empty and the full shape lives in
`p.ds_shape`. Everything that reads or writes whole parameters (new-token rows, saving, parameter counts, the LM
head's vocabulary size) goes through these helpers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch


def is_partitioned(parameter: torch.Tensor) -> bool:
    """Whether ZeRO-3 holds only a shard of this parameter on each rank."""
    return hasattr(parameter, "ds_id")


def full_shape(parameter: torch.Tensor) -> torch.Size:
    """The parameter's whole shape, also under ZeRO-3."""
    return parameter.ds_shape if is_partitioned(parameter) else parameter.shape


def full_numel(parameter: torch.Tensor) -> int:
    """The parameter's whole element count, also under ZeRO-3."""
    return parameter.ds_numel if is_partitioned(parameter) else parameter.numel()


def any_partitioned(model: torch.nn.Module) -> bool:
    """Whether the model's weights are ZeRO-3 shards (loaded under zero.Init or prepared by ZeRO-3)."""
    return any(is_partitioned(p) for p in model.parameters())


def gathered(parameters: Iterable[torch.Tensor], modifier_rank: int | None = None) -> Any:
    """A block in which the ZeRO-3 parameters among `parameters` are whole on every rank (a collective: every rank
    enters it). With `modifier_rank`, what that rank writes into them is broadcast to the others after the block.
    Without ZeRO-3 parameters it does nothing."""
    partitioned = [p for p in parameters if is_partitioned(p)]
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=modifier_rank)
