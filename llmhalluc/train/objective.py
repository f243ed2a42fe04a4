"""Objectives: what a training stage optimises, one micro-batch at a time, and what it reports.

The loop owns the normalisation. Before any backward pass it all-reduces the objective's count over the whole
accumulation window on every rank (trained tokens for SFT, pairs for DPO, completion tokens for GRPO), then
backpropagates each micro-batch's `loss_sum * accumulation * processes / global count`: accelerate (1/GA, or
DeepSpeed's own) and data-parallel averaging (1/processes) leave `sum(loss) / count` over the global batch in the
gradients, whatever the split. An objective therefore only says

- `count(batch)`: its normaliser in one micro-batch, an int read on the host (the collator counted it);
- `loss(model, batch, options)`: the summed loss of the micro-batch (to minimise) and additive sums to report,
  as device tensors (nothing is read on the host here);
- `host_sums(batch)`: additive counts the collator already knows (e.g. trained tokens per source dataset);
- `row(totals, names)` / `eval_row(totals, names)`: a metrics row from the window's sums, reduced over ranks.

The supervised fine-tuning objective below is the example every other stage follows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from llmhalluc.train.loss import cross_entropy_sum

Batch = dict[str, Any]
Sums = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Objective:
    """A stage's micro-batch objective: its normaliser, its summed loss, and its metrics."""

    name: str
    count: Callable[[Batch], int]
    loss: Callable[[Any, Batch, dict[str, Any]], tuple[torch.Tensor, Sums]]
    host_sums: Callable[[Batch], dict[str, list[float]]]
    row: Callable[[dict[str, list[float]], list[str]], dict[str, Any]]
    eval_row: Callable[[dict[str, list[float]], list[str]], dict[str, Any]]


def sft_count(batch: Batch) -> int:
    """Trained tokens of a micro-batch (the positions the collator listed as predicting one)."""
    return batch["targets"].numel()


def sft_loss(model: Any, batch: Batch, options: dict[str, Any]) -> tuple[torch.Tensor, Sums]:
    """Summed next-token cross-entropy over the trained tokens, and the same per source dataset."""
    ce_sum, by_source = cross_entropy_sum(model, batch, options["chunk_tokens"], options["liger"])
    return ce_sum, {"ce": ce_sum.detach(), "ce_by_source": by_source}


def sft_host_sums(batch: Batch) -> dict[str, list[float]]:
    """Trained tokens per source dataset (ordered as the datasets are named)."""
    return {"count_by_source": [float(c) for c in batch["source_counts"]]}


def sft_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """`loss`: the mean cross-entropy over every trained token of the window; with several training datasets
    `loss/<name>` and `trained_tokens/<name>` for each."""
    row: dict[str, Any] = {"loss": totals["ce"][0] / totals["count"][0]}
    if len(names) > 1:
        for name, ce, n in zip(names, totals["ce_by_source"], totals["count_by_source"]):
            row[f"loss/{name}"] = ce / n if n else None
            row[f"trained_tokens/{name}"] = int(n)
    return row


def sft_eval_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """Token-weighted eval loss over the whole eval set, its perplexity, and with several eval datasets
    eval/<name>/loss for each."""
    ce_by, count_by = totals["ce_by_source"], totals["count_by_source"]
    eval_loss = sum(ce_by) / sum(count_by)
    result = {
        "eval_loss": eval_loss,
        "eval_perplexity": math.exp(min(eval_loss, 50.0)),
        "eval_tokens": int(sum(count_by)),
    }
    if len(names) > 1:
        for name, part, tokens in zip(names, ce_by, count_by):
            result[f"eval/{name}/loss"] = part / tokens if tokens else None
    return result


SFT = Objective("sft", sft_count, sft_loss, sft_host_sums, sft_row, sft_eval_row)
