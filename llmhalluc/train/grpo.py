"""Online reinforcement learning with verifiable rewards (`stage: grpo`): GRPO and its normalisations as a third
objective on the one run core; rollouts are llmhalluc.train.rollout's.

Per trained completion token, with logp its log-prob under the policy (at the sampling temperature), old the same
at generation (num_iterations > 1; else logp itself, detached), ref the reference's, A the completion's advantage,
r = exp(logp - old), e/e_h epsilon/epsilon_high (TRL's formulas):

    l = -min(r A, clip(r, 1 - e, 1 + e_h) A) + beta (exp(ref - logp) - (ref - logp) - 1)

and the loss of a global batch (every completion of the step, on every process and micro-batch):
dapo: sum(l) / completion tokens; grpo: mean over completions of each one's token mean; dr_grpo: sum(l) /
(completions x max_completion_length). The objective's count is that normaliser, so the loop's exact
normalisation gives these values at any split of the batch.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch

from llmhalluc.errors import UserError
from llmhalluc.models.loading import load_model, resolve_attention
from llmhalluc.models.tokens import embed_new_tokens
from llmhalluc.runtime.dist import zero3_init_disabled
from llmhalluc.train.loss import completion_logps
from llmhalluc.train.objective import Batch, Objective, Sums
from llmhalluc.train.rollout import Rollouts, grpo_windows, prepare_prompts
from llmhalluc.train.stage import Stage


def grpo_count(batch: Batch) -> int:
    """The loss's normaliser in a micro-batch (completions, completion tokens, or completions x max length)."""
    return batch["grpo_count"]


def token_losses(
    logps: torch.Tensor, batch: Batch, rl: Any
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(each token's loss, its KL to the reference or None, the ratio, the advantages)."""
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()
    ratio = torch.exp(logps - old)
    advantage = batch["token_advantages"]
    high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
    clipped = torch.clamp(ratio, 1 - rl.epsilon, 1 + high)
    losses = -torch.min(ratio * advantage, clipped * advantage)
    kl = None
    if rl.beta > 0:
        delta = batch["ref_logps"] - logps
        kl = torch.exp(delta) - delta - 1
        losses = losses + rl.beta * kl
    return losses, kl, ratio, advantage


def grpo_loss(model: Any, batch: Batch, options: dict[str, Any]) -> tuple[torch.Tensor, Sums]:
    """The micro-batch's summed loss (as its loss_type sums it) and sums of TRL's metrics."""
    rl = options["rl"]
    logps = completion_logps(model, batch, rl.rollout_temperature, options["chunk_tokens"])
    losses, kl, ratio, advantage = token_losses(logps, batch, rl)
    if rl.loss_type == "grpo":
        counts = batch["sequence_counts"]
        loss_sum = sum((part.sum() / max(n, 1) for part, n in zip(losses.split(counts), counts)), losses.new_zeros(()))
    else:
        loss_sum = losses.sum()
    high = rl.epsilon if rl.epsilon_high is None else rl.epsilon_high
    low_clipped = (ratio < 1 - rl.epsilon) & (advantage < 0)
    high_clipped = (ratio > 1 + high) & (advantage > 0)
    sums = {
        "policy_loss": loss_sum.detach(),
        "kl": kl.detach().sum() if kl is not None else losses.new_zeros(()),
        "clip_low": low_clipped.float().sum(),
        "clip_high": high_clipped.float().sum(),
        "clip_region": (low_clipped | high_clipped).float().sum(),
    }
    return loss_sum, sums


def grpo_host_sums(batch: Batch) -> dict[str, list[float]]:
    """The rollout's metric sums (on the first micro-batch of a generation batch's first step)."""
    return batch["rollout"]


def grpo_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """`loss` over the window's global batches, and TRL's GRPO metrics."""
    tokens = totals["trained_tokens"][0]
    row: dict[str, Any] = {"loss": totals["policy_loss"][0] / totals["count"][0]}
    row |= {
        "kl": totals["kl"][0] / tokens if tokens else None,
        "clip_ratio/low_mean": totals["clip_low"][0] / tokens if tokens else None,
        "clip_ratio/high_mean": totals["clip_high"][0] / tokens if tokens else None,
        "clip_ratio/region_mean": totals["clip_region"][0] / tokens if tokens else None,
    }
    scored, completions = totals["rollout/scored"][0], totals["rollout/completions"][0]
    if not completions:  # steps that train on an earlier generation batch
        return row
    total, squares = totals["rollout/reward"][0], totals["rollout/reward_squares"][0]
    terminated = completions - totals["rollout/truncated"][0]
    row |= {
        "reward": total / scored if scored else None,
        "reward_std": math.sqrt(max(squares - total * total / scored, 0.0) / (scored - 1)) if scored > 1 else None,
        "frac_reward_zero_std": totals["rollout/zero_std_groups"][0] / totals["rollout/groups"][0],
        "completions/mean_length": totals["rollout/length"][0] / completions,
        "completions/mean_terminated_length": (
            totals["rollout/terminated_length"][0] / terminated if terminated else None
        ),
        "completions/clipped_ratio": totals["rollout/truncated"][0] / completions,
        "completions": int(completions),
        "generation_time": totals["rollout/generation_seconds"][0] / totals["rollout/generations"][0],
        "rollout_time": totals["rollout/rollout_seconds"][0] / totals["rollout/generations"][0],
    }
    for key in sorted(k for k in totals if k.startswith("rollout/rewards/")):
        value, count = totals[key]
        row[f"rewards/{key.removeprefix('rollout/rewards/')}/mean"] = value / count if count else None
    return row


def grpo_eval_row(totals: dict[str, list[float]], names: list[str]) -> dict[str, Any]:
    """Stage grpo has no eval loss (generation evaluation scores it)."""
    return {}


GRPO = Objective("grpo", grpo_count, grpo_loss, grpo_host_sums, grpo_row, grpo_eval_row)


def start_grpo(run: Any) -> None:
    """Build the reward functions and, with beta > 0 outside LoRA, load the reference model."""
    run.rollouts = Rollouts(run)
    config = run.config
    if config.rl.beta == 0 or (config.model.finetuning_type == "lora" and not config.training.ref_model):
        return
    named = config.training.ref_model
    model_config = dataclasses.replace(config.model, model_name_or_path=named or config.model.model_name_or_path)
    with zero3_init_disabled(run.accelerator):  # the reference loads whole on each rank, beside the policy
        reference = load_model(model_config, resolve_attention(model_config))
    if named:
        rows = reference.get_input_embeddings().weight.shape[0]
        if rows < len(run.tokenizer):
            raise UserError(
                f"ref_model {named}: {rows} embedding rows for a tokenizer of {len(run.tokenizer)} tokens; name a "
                "model that has the added tokens"
            )
    else:  # the model training starts from: the same new-token rows, from the same seed
        embed_new_tokens(
            reference,
            run.tokenizer,
            copy.deepcopy(run.new_tokens),
            config.training.seed,
            config.model.resize_vocab_to_multiple_of,
        )
    reference.to(run.accelerator.device).eval()
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    run.rollouts.reference = reference


def no_eval_set(config: Any, tokenizer: Any, accelerator: Any) -> None:
    """Stage grpo evaluates by generation (generation_eval_steps), not by a loss on eval data."""
    return None


GRPO_STAGE = Stage("grpo", GRPO, prepare_prompts, no_eval_set, grpo_windows, start_grpo)
