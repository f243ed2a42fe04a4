"""Generation evaluation end to end: prompts from the eval datasets, generations, scores, predictions files and
results; used by train/eval.py and, on a fixed subset, during training."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from transformers import PreTrainedTokenizerBase

from llmhalluc.config import Config
from llmhalluc.data.facts import TokenFacts
from llmhalluc.eval.generation import Generation, generate_hf, generate_vllm, meant_text, render_prompts
from llmhalluc.eval.metrics import aggregate, overlap_scores, score
from llmhalluc.eval.references import EvalSet, load_eval_set

RESULTS_FILE = "results.json"


def load_eval_sets(config: Config, samples: int | None = None) -> list[EvalSet]:
    """Every eval dataset's items; with `samples`, a fixed subset of that many per dataset (seeded, in order)."""
    seed, generation = config.training.seed, config.generation
    sets = [load_eval_set(name, config.data, seed, generation) for name in config.data.eval_dataset]
    if samples is not None:
        for eval_set in sets:
            if len(eval_set.items) > samples:
                chosen = sorted(random.Random(config.training.seed).sample(range(len(eval_set.items)), samples))
                eval_set.items = [eval_set.items[i] for i in chosen]
    return sets


def evaluate_generations(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    facts: TokenFacts,
    config: Config,
    accelerator: Accelerator,
    eval_sets: list[EvalSet],
    out_dir: Path | None = None,
    model_path: str | None = None,
    progress: bool = True,
    about: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Metrics per eval dataset (on every rank); with out_dir, predictions.jsonl per dataset and results.json
    (the metrics under "results", after what `about` says of the evaluation)."""
    settings = config.generation
    results = {}
    was_training = getattr(model, "training", False)
    model.eval()
    # Sampling draws from the global generator; training's dropout and data order must not see it.
    devices = [accelerator.device] if accelerator.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(config.training.seed)
        for eval_set in eval_sets:
            prompts = render_prompts(tokenizer, [item.prompt for item in eval_set.items])
            if settings.engine == "vllm":
                generations = generate_vllm(model_path, tokenizer, prompts, settings, facts)
            else:
                generations = generate_hf(model, tokenizer, prompts, settings, accelerator, facts, progress)
            # References written with backtracks are scored as they read, like the generations (idempotent: the
            # evaluation during training reuses its sets).
            for item in eval_set.items:
                item.references = [meant_text(tokenizer, text, facts) for text in item.references]
            metrics, records = score_set(eval_set, prompts, generations, config, facts.backtrack_id is not None)
            results[eval_set.name] = metrics
            if out_dir is not None and accelerator.is_main_process:
                write_predictions(out_dir / eval_set.name / "predictions.jsonl", records)
    if was_training:
        model.train()
    if out_dir is not None and accelerator.is_main_process:
        write_whole(out_dir / RESULTS_FILE, json.dumps({**(about or {}), "results": results}, indent=1) + "\n")
    return results


def score_set(
    eval_set: EvalSet,
    prompts: list[str],
    generations: list[Generation],
    config: Config,
    with_backtracks: bool,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dataset's metrics and one record per example, in dataset order."""
    abstention, markers = config.data.abstention_answer, eval_set.markers
    scores, records, before = [], [], []
    for item, prompt, generation in zip(eval_set.items, prompts, generations):
        scored = score(eval_set.metric, generation.prediction, item.references, item.answerable, abstention, markers)
        scores.append(scored)
        if with_backtracks:  # the raw output with the backtrack tokens dropped, not applied
            unapplied = generation.unapplied
            before.append(
                score(eval_set.metric, unapplied, item.references, item.answerable, abstention, markers).correct
            )
        records.append(
            {
                "index": item.index,
                "prompt": prompt,
                "prediction": generation.prediction,
                "raw_prediction": generation.raw,
                "references": item.references,
                "answerable": item.answerable,
                "correct": scored.correct,
                "abstained": scored.abstained,
                "backtracks": generation.backtracks,
                **({"shots": item.shots} if item.shots is not None else {}),
            }
        )
    metrics = aggregate(eval_set.metric, scores, [item.answerable for item in eval_set.items])
    if config.generation.overlap_metrics:  # against the first reference, on the predictions after backtracks
        predictions = [g.prediction for g in generations]
        references = [item.references[0] for item in eval_set.items]
        metrics |= overlap_scores(config.generation.overlap_metrics, predictions, references)
    if with_backtracks:
        metrics["backtrack_rate"] = sum(g.backtracks > 0 for g in generations) / len(generations)
        metrics["backtracks_per_output"] = sum(g.backtracks for g in generations) / len(generations)
        metrics["correct_before_backtracks"] = sum(before) / len(before)
        metrics["correct_after_backtracks"] = sum(s.correct for s in scores) / len(scores)
    return metrics, records


def write_predictions(path: Path, records: list[dict[str, Any]]) -> None:
    """predictions.jsonl, written whole or not at all."""
    write_whole(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_whole(path: Path, text: str) -> None:
    """A file written whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(text)
    temporary.replace(path)


def metric_rows(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    """`gen/<dataset>/<metric>` values for a metrics row."""
    return {
        f"gen/{name}/{metric}": value
        for name, metrics in results.items()
        for metric, value in metrics.items()
        if isinstance(value, int | float) and value is not None
    }


def results_table(results: dict[str, dict[str, Any]]) -> str:
    """The printed table: one line per dataset and metric."""
    lines = ["| dataset | metric | value |", "| --- | --- | --- |"]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            shown = "n/a" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)
            lines.append(f"| {name} | {metric} | {shown} |")
    return "\n".join(lines)
