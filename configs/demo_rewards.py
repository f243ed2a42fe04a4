"""Reward functions of configs/demo_grpo.yaml, written as for TRL's GRPOTrainer: f(prompts, completions, **columns)."""


def digits_only(prompts, completions, **columns):
    """The share of the answer's non-space characters that are digits (0 for an empty answer): the toy task of
    answering with a number and nothing else."""
    rewards = []
    for completion in completions:
        text = "".join(completion[0]["content"].split())
        rewards.append(sum(ch.isdigit() for ch in text) / len(text) if text else 0.0)
    return rewards
