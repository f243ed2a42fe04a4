"""A generation batch as training data (`stage: grpo`): group-relative advantages of the rewards, the micro-batches
of completions the objective trains on (each completion its own source, its tokens' advantages alongside), the
log-probs at generation and under the reference, and the sums the rollout metrics are built from."""

from __future__ import annotations

import math
from typing import Any

import torch

from llmhalluc.data.batching import PaddedCollator, PaddingFreeCollator
from llmhalluc.data.labels import IGNORE_INDEX
from llmhalluc.eval.rewards import Reward
from llmhalluc.train.feed import to_device
from llmhalluc.train.loss import completion_logps


def advantages(rewards: torch.Tensor, group: int, scale: str, accelerator: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(each completion's advantage, each group's reward std): reward minus its group's mean, divided by the
    group's std, the global batch's std or nothing, plus TRL's 1e-4; a completion without reward gets 0."""
    grouped = rewards.view(-1, group)
    mean = grouped.nanmean(dim=1, keepdim=True)
    group_std = _nanstd(grouped)
    if scale == "batch":
        valid = ~torch.isnan(rewards)
        local = torch.tensor([rewards[valid].sum(), (rewards[valid] ** 2).sum(), valid.sum()], dtype=torch.float64)
        total, squares, count = accelerator.reduce(local.to(accelerator.device), "sum").cpu().tolist()
        std = math.sqrt(max(squares - total * total / count, 0.0) / (count - 1)) if count > 1 else 0.0
        spread = torch.full_like(grouped, std)
    else:
        spread = group_std[:, None].expand_as(grouped)
    centred = grouped - mean
    if scale != "none":
        centred = centred / (spread + 1e-4)
    return torch.nan_to_num(centred.reshape(-1), nan=0.0), group_std


def _nanstd(grouped: torch.Tensor) -> torch.Tensor:
    """The unbiased std of each row over its non-NaN values (NaN with fewer than two)."""
    valid = ~torch.isnan(grouped)
    count = valid.sum(dim=1)
    mean = grouped.nanmean(dim=1, keepdim=True)
    squares = torch.where(valid, (grouped - mean) ** 2, torch.zeros_like(grouped)).sum(dim=1)
    return torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), torch.full_like(squares, math.nan))


def build_micro_batches(
    run: Any, scored: dict[str, Any], advantage: torch.Tensor, group_std: torch.Tensor, seconds: float
) -> list[dict[str, Any]]:
    """The rollout as gradient_accumulation_steps micro-batches of per_device_train_batch_size completions, each
    completion its own source (targets grouped by completion), with its tokens' advantages, the objective's count,
    and the rollout's metrics sums on the first."""
    config = run.config
    rl, training = config.rl, config.training
    per_device = training.per_device_train_batch_size
    sequences = []
    for index, (item, (ids, truncated)) in enumerate(zip(scored["owners"], scored["cut"])):
        trained = not (truncated and rl.mask_truncated_completions)
        labels = [IGNORE_INDEX] * len(item["prompt_ids"]) + (ids if trained else [IGNORE_INDEX] * len(ids))
        sequences.append(
            {"input_ids": item["prompt_ids"] + ids, "labels": labels, "source": index % per_device, "index": index}
        )
    if run.data.layout == "padding_free":
        collate = PaddingFreeCollator(run.tokenizer.pad_token_id, per_device)
    else:
        collate = PaddedCollator(run.tokenizer.pad_token_id, config.data.pad_to_multiple_of, per_device)
    batches = []
    for start in range(0, len(sequences), per_device):
        part = sequences[start : start + per_device]
        batch = collate([{k: v for k, v in s.items() if k != "index"} for s in part])
        counts = batch.pop("source_counts")
        batch["sequence_counts"] = counts
        batch["token_advantages"] = torch.repeat_interleave(
            advantage[start : start + per_device].float(), torch.tensor(counts)
        )
        batch["grpo_count"] = {
            "grpo": len(part),
            "dr_grpo": len(part) * rl.max_completion_length,
            "dapo": sum(counts),
        }[rl.loss_type]
        batch["rollout"] = empty_sums(run.rollouts.rewards)
        batches.append(batch)
    batches[0]["rollout"] = rollout_sums(run.rollouts, scored, group_std, seconds)
    return batches


def empty_sums(rewards: list[Reward]) -> dict[str, list[float]]:
    """The rollout metrics' sums of a micro-batch that carries none."""
    keys = ["reward", "reward_squares", "scored", "groups", "zero_std_groups", "completions", "length", "truncated"]
    keys += ["terminated_length", "generation_seconds", "rollout_seconds", "generations"]
    sums = {f"rollout/{key}": [0.0] for key in keys}
    for reward in rewards:
        sums[f"rollout/rewards/{reward.name}"] = [0.0, 0.0]  # sum, count
    return sums


def rollout_sums(rollouts: Any, scored: dict[str, Any], group_std: torch.Tensor, seconds: float) -> dict:
    """This process's additive sums of one generation batch's metrics (TRL's names are built from them)."""
    table = scored["table"]
    weights = torch.tensor(rollouts.weights, dtype=torch.float64)
    unscorable = torch.isnan(table).all(dim=1)
    total = (torch.nan_to_num(table, nan=0.0) * weights).sum(dim=1)[~unscorable]
    lengths = [len(ids) for ids, _ in scored["cut"]]
    truncated = [flag for _, flag in scored["cut"]]
    sums = empty_sums(rollouts.rewards)
    sums |= {
        "rollout/reward": [float(total.sum())],
        "rollout/reward_squares": [float((total**2).sum())],
        "rollout/scored": [float(len(total))],
        "rollout/groups": [float(len(group_std))],
        "rollout/zero_std_groups": [float((torch.nan_to_num(group_std, nan=0.0).abs() < 1e-8).sum())],
        "rollout/completions": [float(len(lengths))],
        "rollout/length": [float(sum(lengths))],
        "rollout/truncated": [float(sum(truncated))],
        "rollout/terminated_length": [float(sum(n for n, t in zip(lengths, truncated) if not t))],
        "rollout/generation_seconds": [seconds],
        "rollout/generations": [1.0],
    }
    for column, reward in enumerate(rollouts.rewards):
        values = table[:, column]
        valid = ~torch.isnan(values)
        sums[f"rollout/rewards/{reward.name}"] = [float(values[valid].sum()), float(valid.sum())]
    return sums


@torch.no_grad()
def attach_logps(run: Any, batches: list[dict[str, Any]]) -> None:
    """Each micro-batch's log-probs at generation (num_iterations > 1: the ratio's denominator) and under the
    reference (beta > 0: under LoRA the model with its adapters off, else the reference model)."""
    rl = run.config.rl
    temperature, chunk = rl.rollout_temperature, run.config.training.loss_chunk_tokens
    device = run.accelerator.device
    for batch in batches:
        on_device = to_device(batch, device)
        if rl.num_iterations > 1:
            batch["old_logps"] = completion_logps(run.model, on_device, temperature, chunk).cpu()
        if rl.beta > 0:
            reference = run.rollouts.reference
            if reference is None:
                network = run.accelerator.unwrap_model(run.model, keep_torch_compile=False)
                with network.disable_adapter():
                    batch["ref_logps"] = completion_logps(run.model, on_device, temperature, chunk).cpu()
            else:
                batch["ref_logps"] = completion_logps(reference, on_device, temperature, chunk).cpu()
