"""Optimizer and learning-rate schedule: AdamW (no decay on biases and norms) or the DeepSpeed json's own, prepared
for the launch, and who steps the schedule (the loop after each applied step, or DeepSpeed inside its own step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import DummyOptim, DummyScheduler
from transformers import get_scheduler

from llmhalluc.config import TrainingConfig
from llmhalluc.runtime.dist import deepspeed_config_of


@dataclass
class OptimizerSetup:
    """The optimizer, its schedule, and whether the loop steps the schedule (DeepSpeed steps its own)."""

    optimizer: Any
    scheduler: Any
    loop_steps_scheduler: bool


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups of the trainable parameters: decayed weights, and undecayed biases and normalization weights."""
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.LayerNorm) or "norm" in type(module).__name__.lower():
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    for name, param in model.named_parameters():
        if name.endswith("bias"):
            no_decay.add(id(param))
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if id(p) not in no_decay], "weight_decay": weight_decay},
        {"params": [p for p in trainable if id(p) in no_decay], "weight_decay": 0.0},
    ]
    # An empty group (LoRA trains no norm weight) would be dropped by DeepSpeed and desynchronise the schedule.
    return [group for group in groups if group["params"]]


def warmup_steps_for(training: TrainingConfig, total_steps: int) -> int:
    """warmup_steps if set, else warmup_ratio of the total, rounded up."""
    return training.warmup_steps if training.warmup_steps > 0 else math.ceil(training.warmup_ratio * total_steps)


def build_optimizer(
    model: torch.nn.Module, training: TrainingConfig, total_steps: int, deepspeed_config: dict | None = None
) -> OptimizerSetup:
    """AdamW and the configured schedule, or DeepSpeed placeholders when its json defines them."""
    groups = parameter_groups(model, training.weight_decay)
    warmup = warmup_steps_for(training, total_steps)
    betas = (training.adam_beta1, training.adam_beta2)
    if deepspeed_config is not None and "optimizer" in deepspeed_config:
        optimizer = DummyOptim(groups, lr=training.learning_rate, weight_decay=training.weight_decay)
    else:
        optimizer = torch.optim.AdamW(
            groups,
            lr=training.learning_rate,
            betas=betas,
            eps=training.adam_epsilon,
            fused=True,  # one kernel for all parameters; on CPU too (4x faster there than the default loop)
        )
    if deepspeed_config is not None and "scheduler" in deepspeed_config:
        scheduler = DummyScheduler(optimizer, total_num_steps=total_steps, warmup_num_steps=warmup)
        return OptimizerSetup(optimizer, scheduler, loop_steps_scheduler=False)
    if isinstance(optimizer, DummyOptim):
        # DeepSpeed builds the optimizer; our schedule is handed to it as a callable on the real optimizer.
        scheduler = DummyScheduler(
            optimizer,
            lr_scheduler_callable=lambda real: get_scheduler(
                training.lr_scheduler_type, real, num_warmup_steps=warmup, num_training_steps=total_steps
            ),
        )
        return OptimizerSetup(optimizer, scheduler, loop_steps_scheduler=False)
    scheduler = get_scheduler(
        training.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps
    )
    return OptimizerSetup(optimizer, scheduler, loop_steps_scheduler=True)


@dataclass
class Schedule:
    """The learning-rate schedule of a prepared run and who steps it."""

    scheduler: Any
    optimizer: Any
    loop_steps: bool  # False under DeepSpeed with its own scheduler or optimizer: it steps the schedule itself

    def current_lr(self) -> float:
        """The rate the next optimizer step uses."""
        return self.optimizer.param_groups[0]["lr"]

    def step(self, applied: bool) -> None:
        """Advance after an optimizer step that was applied (a skipped non-finite step leaves the schedule)."""
        if self.loop_steps and applied:
            self.scheduler.step()


def prepare_optimizer(
    accelerator: Any, model: Any, training: TrainingConfig, total_steps: int
) -> tuple[Any, Any, Schedule]:
    """(model, optimizer, schedule) prepared by accelerate for the launch. A schedule the loop steps is registered
    for checkpointing but not prepared: DeepSpeed would step a prepared scheduler itself, on top of the loop."""
    setup = build_optimizer(model, training, total_steps, deepspeed_config_of(accelerator))
    if setup.loop_steps_scheduler:
        model, optimizer = accelerator.prepare(model, setup.optimizer)
        accelerator.register_for_checkpointing(setup.scheduler)
        return model, optimizer, Schedule(setup.scheduler, optimizer, loop_steps=True)
    model, optimizer, scheduler = accelerator.prepare(model, setup.optimizer, setup.scheduler)
    return model, optimizer, Schedule(scheduler, optimizer, loop_steps=False)
