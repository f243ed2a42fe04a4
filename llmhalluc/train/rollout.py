"""Rollouts of `stage: grpo`: prompts from the data registry, num_generations completions sampled per prompt with the
model being trained, their rewards, group-relative advantages, and the micro-batches the objective trains on.

Each process samples the completions of its own prompts, so a prompt's group is generated and scored on one process;
only `scale_rewards: batch` reduces across processes (the global std). The sampling RNG is seeded by the seed, the
generation batch and the process, so a resumed run samples exactly what an uninterrupted one did. With
num_iterations > 1 a generation batch trains several optimizer steps; its micro-batches (with the log-probs at
generation) are kept in output_dir/rollouts/ so a run resumed between those steps trains on the same rollout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from transformers import GenerationConfig

from llmhalluc.config import Config
from llmhalluc.data.pipeline import DatasetStats
from llmhalluc.data.registry import load_rows
from llmhalluc.data.template import render
from llmhalluc.errors import UserError
from llmhalluc.eval.generation import decode, left_padded_ids, meant_text
from llmhalluc.eval.references import load_eval_set
from llmhalluc.eval.rewards import Reward, Scoring, build_rewards
from llmhalluc.runtime.dist import data_preparation_turns
from llmhalluc.runtime.tracking import drop_rows_after
from llmhalluc.train.feed import TrainData, accumulation_windows, seeded_loader
from llmhalluc.train.rollout_batch import advantages, attach_logps, build_micro_batches, empty_sums

COMPLETIONS_FILE = "completions.jsonl"
ROLLOUTS_DIR = "rollouts"


def load_prompts(config: Config, tokenizer: Any) -> tuple[list[dict[str, Any]], DatasetStats]:
    """Every training dataset's prompts (the chat up to its final assistant turn, rendered with the generation
    prompt and tokenized) with their references and row; prompts too long for a completion are dropped and
    counted."""
    data, training, rl = config.data, config.training, config.rl
    items, stats = [], DatasetStats()
    for source, name in enumerate(data.dataset):
        eval_set = load_eval_set(name, data, training.seed)
        _, rows = load_rows(name, data.dataset_dir, training.seed, data.max_samples)
        part = DatasetStats(rows=len(rows), dropped=Counter(eval_set.dropped))
        for item in eval_set.items:
            prompt_ids = tokenizer(render(tokenizer, item.prompt, True), add_special_tokens=False)["input_ids"]
            if len(prompt_ids) + rl.max_completion_length > data.max_length:
                part.dropped["prompt_too_long"] += 1
                continue
            items.append(
                {
                    "source": source,
                    "row": item.index,
                    "prompt": item.prompt,
                    "prompt_ids": prompt_ids,
                    "references": item.references,
                    "answerable": item.answerable,
                    "metric": eval_set.metric,
                    "markers": list(eval_set.markers),
                    "columns": json.loads(json.dumps(rows[item.index], default=str)),
                }
            )
            part.examples += 1
            part.tokens += len(prompt_ids)
        stats.sources[name] = part
        stats.rows += part.rows
        stats.examples += part.examples
        stats.tokens += part.tokens
        stats.dropped.update(part.dropped)
    if not items:
        raise UserError(
            f"stage grpo: no prompts left in {', '.join(data.dataset)} (dropped: {dict(stats.dropped)}); a prompt "
            f"must fit max_length ({data.max_length}) with max_completion_length ({rl.max_completion_length})"
        )
    return items, stats


def prompts_summary(config: Config, stats: DatasetStats, processes: int) -> str:
    """One line: prompts kept, dropped, and what a step samples."""
    training, rl = config.training, config.rl
    completions = training.per_device_train_batch_size * training.gradient_accumulation_steps * processes
    return (
        f"grpo prompts: {stats.examples} of {stats.rows} rows ({dict(stats.dropped) or 'none dropped'}); each step "
        f"{completions // rl.num_generations} prompts x {rl.num_generations} completions = {completions} completions "
        f"over {processes} process(es), each generation batch trained {rl.num_iterations} step(s)"
    )


def prepare_prompts(config: Config, tokenizer: Any, accelerator: Any, layout: str) -> TrainData:
    """The prompts in seeded global batches of prompts for this process."""
    training, rl = config.training, config.rl
    with data_preparation_turns(accelerator):  # one process fills the datasets cache first, as for SFT data
        items, stats = load_prompts(config, tokenizer)
    accelerator.print(prompts_summary(config, stats, accelerator.num_processes))
    per_rank = training.per_device_train_batch_size * training.gradient_accumulation_steps // rl.num_generations
    by_prompt = dataclasses.replace(training, per_device_train_batch_size=per_rank, gradient_accumulation_steps=1)
    loader, sampler = seeded_loader(items, list, by_prompt, accelerator, workers=0, what="prompts")
    return TrainData(loader, sampler, layout, stats, {"datasets": {}, "warnings": []})


def generation_seed(seed: int, generation: int, process: int) -> int:
    """The sampling seed of one process's share of one generation batch."""
    return (seed * 1_000_003 + generation * 65_537 + process) % 2**63


def generate_completions(run: Any, prompt_ids: list[list[int]], generation: int) -> list[list[int]]:
    """Sampled continuations of each prompt (ids after the prompt, padded after the end), generation_batch_size
    sequences per call; the RNG seeded by the generation batch and process, the global RNG left as it was."""
    config, accelerator, facts = run.config, run.accelerator, run.facts
    rl = config.rl
    network = accelerator.unwrap_model(run.model, keep_torch_compile=False)
    settings = GenerationConfig(
        do_sample=True,
        temperature=rl.rollout_temperature,
        top_p=rl.rollout_top_p,
        top_k=0,  # TRL's: the log-probs of the loss know nothing of a top-k cut
        max_new_tokens=rl.max_completion_length,
        eos_token_id=facts.stop_ids,
        pad_token_id=facts.pad_id,
        use_cache=True,
    )
    size = config.generation.generation_batch_size
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    completions: list[list[int]] = []
    network.eval()
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(generation_seed(config.training.seed, generation, accelerator.process_index))
        for start in range(0, len(prompt_ids), size):
            chunk = prompt_ids[start : start + size]
            inputs = left_padded_ids(chunk, facts.pad_id, accelerator.device)
            output = network.generate(**inputs, generation_config=settings)
            completions += output[:, inputs["input_ids"].shape[1] :].tolist()
    network.train()
    return completions


def cut_completion(ids: list[int], stops: set[int], max_length: int) -> tuple[list[int], bool]:
    """(the completion up to and including its first stop token, whether it was truncated before one)."""
    for position, token in enumerate(ids[:max_length]):
        if token in stops:
            return ids[: position + 1], False
    return ids[:max_length], True


class Rollouts:
    """What stage grpo keeps between steps: its reward functions, the reference model (if one is loaded) and the
    completions log."""

    def __init__(self, run: Any):
        config = run.config
        rl, data = config.rl, config.data
        self.rewards: list[Reward] = build_rewards(
            rl.reward_funcs, data.abstention_answer, rl.format_pattern, run.facts.backtrack_id, rl.max_backtracks
        )
        self.weights = rl.reward_weights or [1.0] * len(self.rewards)
        self.reference: Any = None
        self.log_path = Path(config.run.output_dir) / COMPLETIONS_FILE
        if run.accelerator.is_main_process:
            drop_rows_after(self.log_path, 0 if run.resume_from is None else _step_of(run.resume_from))

    def score(self, run: Any, items: list[dict[str, Any]], generated: list[list[int]], step: int) -> dict[str, Any]:
        """Rewards of every completion (rows: completions, columns: functions; NaN where a function returned None)
        and what the log and metrics need."""
        tokenizer, facts, rl = run.tokenizer, run.facts, run.config.rl
        stops = set(facts.stop_ids)
        owners = [item for item in items for _ in range(rl.num_generations)]
        cut = [cut_completion(ids, stops, rl.max_completion_length) for ids in generated]
        decoded = [decode(tokenizer, ids, facts) for ids, _ in cut]
        references = [[meant_text(tokenizer, text, facts) for text in item["references"]] for item in owners]
        scoring = Scoring(
            prompts=[item["prompt"] for item in owners],
            meant=[g.prediction for g in decoded],
            raw=[g.raw for g in decoded],
            ids=[[t for t in ids if t not in stops] for ids, _ in cut],
            references=references,
            reference_ids=[reference_ids(tokenizer, item["references"][0], facts) for item in owners],
            answerable=[item["answerable"] for item in owners],
            metrics=[item["metric"] for item in owners],
            markers=[tuple(item["markers"]) for item in owners],
            columns=[item["columns"] for item in owners],
            step=step,
            max_steps=run.total_steps,
        )
        table = torch.full((len(cut), len(self.rewards)), math.nan, dtype=torch.float64)
        for column, reward in enumerate(self.rewards):
            values = reward.function(scoring)
            table[:, column] = torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float64)
        return {"owners": owners, "cut": cut, "decoded": decoded, "table": table}


def reference_ids(tokenizer: Any, text: str, facts: Any) -> list[int]:
    """The reference's ids with its backtracks applied (aliases read as their tokens)."""
    return tokenizer(meant_text(tokenizer, text, facts), add_special_tokens=False)["input_ids"]


def _step_of(checkpoint: Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def log_completions(run: Any, scored: dict[str, Any], advantage: torch.Tensor, step: int) -> None:
    """Every process's completions of a generation batch, with their rewards, to completions.jsonl (and wandb)."""
    names = [reward.name for reward in run.rollouts.rewards]
    records = []
    for index, (item, generation, (ids, truncated)) in enumerate(
        zip(scored["owners"], scored["decoded"], scored["cut"])
    ):
        values = scored["table"][index].tolist()
        records.append(
            {
                "step": step,
                "process": run.accelerator.process_index,
                "dataset": run.config.data.dataset[item["source"]],
                "row": item["row"],
                "prompt": item["prompt"][-1]["content"],
                "completion": generation.raw,
                "completion_tokens": len(ids),
                "truncated": truncated,
                "rewards": {n: (None if math.isnan(v) else v) for n, v in zip(names, values)},
                "advantage": float(advantage[index]),
            }
        )
    if run.accelerator.num_processes > 1:
        records = gather_object(records)
    if not run.accelerator.is_main_process:
        return
    with run.rollouts.log_path.open("a", encoding="utf-8") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    with contextlib.suppress(ImportError):
        import wandb

        if wandb.run is not None:
            columns = ["step", "dataset", "row", "prompt", "completion", *names, "advantage"]
            rows = [[*(r[k] for k in columns[:5]), *r["rewards"].values(), r["advantage"]] for r in records]
            wandb.run.log({"completions": wandb.Table(columns=columns, data=rows)}, step=step)


def rollout(run: Any, items: list[dict[str, Any]], generation: int) -> list[dict[str, Any]]:
    """Sample, score and batch one generation batch of this process's prompts."""
    rl = run.config.rl
    step = generation * rl.num_iterations + 1  # the first optimizer step that trains on it
    started = time.perf_counter()
    prompt_ids = [item["prompt_ids"] for item in items for _ in range(rl.num_generations)]
    generated = generate_completions(run, prompt_ids, generation)
    seconds = time.perf_counter() - started
    scored = run.rollouts.score(run, items, generated, step)
    weights = torch.tensor(run.rollouts.weights, dtype=torch.float64)
    table = scored["table"]
    rewards = (torch.nan_to_num(table, nan=0.0) * weights).sum(dim=1)
    rewards[torch.isnan(table).all(dim=1)] = math.nan
    advantage, group_std = advantages(rewards, rl.num_generations, rl.scale_rewards, run.accelerator)
    batches = build_micro_batches(run, scored, advantage, group_std, seconds)
    attach_logps(run, batches)
    log_completions(run, scored, advantage, step)
    batches[0]["rollout"]["rollout/rollout_seconds"] = [time.perf_counter() - started]
    return batches


def rollout_file(run: Any, generation: int) -> Path:
    """Where this process keeps a generation batch's micro-batches (num_iterations > 1)."""
    return run.output_dir / ROLLOUTS_DIR / f"batch-{generation:07d}-process-{run.accelerator.process_index}.pt"


def keep_rollout(run: Any, generation: int, batches: list[dict[str, Any]]) -> None:
    """Save a generation batch's micro-batches (atomically); drop those no checkpoint on disk can resume into."""
    path = rollout_file(run, generation)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    torch.save(batches, temporary)
    temporary.replace(path)
    checkpoints = [_step_of(p) for p in run.output_dir.glob("checkpoint-*") if p.name.split("-")[-1].isdigit()]
    oldest = min(checkpoints, default=generation * run.config.rl.num_iterations) // run.config.rl.num_iterations
    suffix = f"-process-{run.accelerator.process_index}.pt"
    for old in path.parent.glob(f"batch-*{suffix}"):
        if int(old.name.split("-")[1]) < min(oldest, generation):
            old.unlink(missing_ok=True)


def grpo_windows(run: Any, start_step: int) -> Iterator[tuple[int, list[dict[str, Any]]]]:
    """One window per optimizer step: a generation batch of completions, trained num_iterations steps in a row."""
    iterations = run.config.rl.num_iterations
    first, done = divmod(start_step, iterations)
    prompts = accumulation_windows(run.data.loader, run.data.sampler, first, 1)
    generation = first
    while True:
        epoch, (items,) = next(prompts)
        if done:  # resumed inside a generation batch: train on the rollout it was sampled as
            path = rollout_file(run, generation)
            if not path.is_file():
                raise UserError(f"{path}: the rollout this resumed run trains on is missing; resume another checkpoint")
            batches = torch.load(path, weights_only=False)
        else:
            batches = rollout(run, items, generation)
            if iterations > 1:
                keep_rollout(run, generation, batches)
        for iteration in range(done, iterations):
            if iteration:  # the rollout's metrics count once, at its first step
                batches = [batch | {"rollout": empty_sums(run.rollouts.rewards)} for batch in batches]
            yield epoch, batches
        generation, done = generation + 1, 0
