"""Optimizer and schedule: no weight decay on norms and biases, warmup, and each schedule's learning rates."""

from __future__ import annotations

import math

import pytest
import torch
from accelerate.utils import DummyOptim, DummyScheduler

from llmhalluc.config import TrainingConfig
from llmhalluc.models.tiny import build_model, build_tokenizer
from llmhalluc.train.optim import build_optimizer, parameter_groups, warmup_steps_for


@pytest.fixture(scope="module")
def model():
    return build_model(build_tokenizer(), hidden_size=32, num_layers=2)


def test_no_decay_on_norm_weights_and_biases(model):
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(model.config.vocab_size))
    decayed, undecayed = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decayed["weight_decay"] == 0.1 and undecayed["weight_decay"] == 0.0
    assert {names[id(p)] for p in undecayed["params"]} == {
        n for n in names.values() if "norm" in n or n.endswith("bias")
    }
    assert all(p.ndim == 2 for p in decayed["params"])
    assert len(decayed["params"]) + len(undecayed["params"]) == len(list(model.parameters()))
    del model.lm_head.bias


def test_warmup_from_steps_or_ratio():
    assert warmup_steps_for(TrainingConfig(warmup_steps=5, warmup_ratio=0.5), 100) == 5
    assert warmup_steps_for(TrainingConfig(warmup_ratio=0.1), 95) == 10  # rounded up
    assert warmup_steps_for(TrainingConfig(), 100) == 0


def learning_rates(model, schedule: str, total: int, warmup: int) -> list[float]:
    training = TrainingConfig(learning_rate=1.0, lr_scheduler_type=schedule, warmup_steps=warmup)
    setup = build_optimizer(model, training, total)
    assert setup.loop_steps_scheduler
    rates = []
    for _ in range(total):
        rates.append(setup.optimizer.param_groups[0]["lr"])
        setup.optimizer.step()
        setup.scheduler.step()
    return rates


def test_schedules(model):
    total, warmup = 10, 2
    ramp = [0.0, 0.5]
    assert learning_rates(model, "constant", total, 0) == [1.0] * total
    assert learning_rates(model, "constant_with_warmup", total, warmup) == ramp + [1.0] * 8
    linear = learning_rates(model, "linear", total, warmup)
    assert linear[:2] == ramp and linear[2:] == pytest.approx([(total - s) / (total - warmup) for s in range(2, 10)])
    cosine = learning_rates(model, "cosine", total, warmup)
    expected = [0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) for s in range(2, 10)]
    assert cosine[:2] == ramp and cosine[2:] == pytest.approx(expected)


def test_adamw_hyperparameters_come_from_the_config(model):
    training = TrainingConfig(learning_rate=3e-4, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.01)
    optimizer = build_optimizer(model, training, 10).optimizer
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["betas"] == (0.8, 0.95) and optimizer.defaults["eps"] == 1e-6
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.01, 0.0]


def test_deepspeed_json_optimizer_and_scheduler_are_placeholders(model):
    training = TrainingConfig()
    setup = build_optimizer(model, training, 10, deepspeed_config={"optimizer": {"type": "AdamW"}})
    assert isinstance(setup.optimizer, DummyOptim) and isinstance(setup.scheduler, DummyScheduler)
    assert not setup.loop_steps_scheduler  # DeepSpeed steps the schedule, built from our config
    assert setup.scheduler.lr_scheduler_callable is not None
    setup = build_optimizer(model, training, 10, deepspeed_config={"scheduler": {"type": "WarmupLR"}})
    assert isinstance(setup.optimizer, torch.optim.AdamW) and isinstance(setup.scheduler, DummyScheduler)
    assert setup.scheduler.total_num_steps == 10
