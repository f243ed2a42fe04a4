"""Stages: what a training stage adds to the one run core. A stage is an objective, the data format it trains on
(how training and eval data are prepared, how optimizer steps' micro-batches are drawn), and nothing else: the
loop, checkpoints, resume, launch, metrics plumbing and export are shared."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from llmhalluc.train.feed import accumulation_windows, build_train_loader, prepare_eval_set
from llmhalluc.train.objective import SFT, Objective

# (epoch, the micro-batches of one optimizer step)
Window = tuple[int, list[dict[str, Any]]]


@dataclass(frozen=True)
class Stage:
    """A training stage: its name (the config's `stage`), objective, and data."""

    name: str
    objective: Objective
    prepare: Callable[..., Any]  # (config, tokenizer, accelerator, layout) -> TrainData
    prepare_eval: Callable[..., Any]  # (config, tokenizer, accelerator) -> EvalData | None
    windows: Callable[[Any, int], Iterator[Window]]  # (run, start step) -> windows, forever
    start: Callable[[Any], None] = lambda run: None  # (run) once set up, before the first step (DPO: references)


def sft_windows(run: Any, start_step: int) -> Iterator[Window]:
    """The training data's seeded global batches, one accumulation window per optimizer step."""
    data = run.data
    return accumulation_windows(data.loader, data.sampler, start_step, run.config.training.gradient_accumulation_steps)


SFT_STAGE = Stage("sft", SFT, build_train_loader, prepare_eval_set, sft_windows)
