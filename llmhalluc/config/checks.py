"""Checks between keys of an experiment config, and between the config and the launch, run once it is read."""

from __future__ import annotations

import os
import re

from llmhalluc.config.schema import OVERLAP_METRICS, REPORTERS, Config
from llmhalluc.config.tokens import token_description_problems


def cross_checks(config: Config) -> list[str]:
    """Problems between keys, and between the config and the launch, found before anything runs."""
    problems = []
    data, training, run = config.data, config.training, config.run
    if run.eval_steps is not None and not data.eval_dataset:
        problems.append("eval_steps is set but eval_dataset is empty: name an eval dataset or drop eval_steps")
    if config.generation.generation_eval_steps is not None and not data.eval_dataset:
        problems.append("generation_eval_steps is set but eval_dataset is empty: name an eval dataset")
    if config.generation.top_p > 1.0:
        problems.append(f"top_p must be at most 1, got {config.generation.top_p}")
    if training.warmup_ratio >= 1.0:
        problems.append(f"warmup_ratio must be below 1, got {training.warmup_ratio}")
    if data.train_on_prompt and data.mask_history:
        problems.append("train_on_prompt and mask_history contradict each other: set at most one")
    if config.model.lora_dropout >= 1.0:
        problems.append(f"lora_dropout must be below 1, got {config.model.lora_dropout}")
    for beta in ("adam_beta1", "adam_beta2"):
        if getattr(training, beta) >= 1.0:
            problems.append(f"{beta} must be below 1, got {getattr(training, beta)}")
    model = config.model
    lora_only = {
        "adapter_name_or_path": model.adapter_name_or_path,
        "merge" if not run.do_merge else "do_merge": model.merge,
        "freeze_new_token_rows": model.freeze_new_token_rows,
    }
    for key, value in lora_only.items():
        if value and model.finetuning_type != "lora":
            problems.append(f"{key} is set but finetuning_type is {model.finetuning_type}: use finetuning_type: lora")
    if (data.mask_backtracked or data.backtrack_position_ids) and not data.backtrack_token:
        wanted = "mask_backtracked" if data.mask_backtracked else "backtrack_position_ids"
        problems.append(f"{wanted} needs backtrack_token (the token that deletes the one before it)")
    if data.interleave_probs is not None:
        probs = data.interleave_probs
        if data.mix_strategy == "concat":
            problems.append(
                "interleave_probs is set but mix_strategy is concat: use interleave_under or interleave_over"
            )
        if len(probs) != len(data.dataset):
            problems.append(
                f"interleave_probs has {len(probs)} values for {len(data.dataset)} datasets ({', '.join(data.dataset)})"
            )
        if any(p <= 0 for p in probs) or abs(sum(probs) - 1.0) > 1e-6:
            problems.append(f"interleave_probs must be positive and sum to 1, got {probs} (sum {sum(probs):.6g})")
    for reporter in run.report_to:
        if reporter not in REPORTERS:
            problems.append(f"report_to: unknown tracker {reporter!r}; choose from {', '.join(REPORTERS)}")
    generation = config.generation
    if generation.engine == "vllm" and generation.generation_eval_steps is not None:
        problems.append(
            "engine: vllm with generation_eval_steps: evaluation during training generates with the model being "
            "trained (engine: hf); vLLM is for train/eval.py on a saved model"
        )
    if training.stage == "dpo" and data.packing:
        problems.append(
            "packing with stage: dpo: pairs are batched padding-free (no padding computed) or padded; drop packing"
        )
    if training.pref_loss == "robust" and not training.dpo_label_smoothing < 0.5:
        problems.append(
            f"dpo_label_smoothing must be below 0.5 for pref_loss robust, got {training.dpo_label_smoothing}"
        )
    if training.dpo_label_smoothing and training.pref_loss not in ("sigmoid", "robust"):
        problems.append(f"dpo_label_smoothing applies to pref_loss sigmoid or robust, not {training.pref_loss}")
    if training.ref_model and training.pref_loss in ("simpo", "orpo"):
        problems.append(f"ref_model is set but pref_loss {training.pref_loss} uses no reference model")
    for name in generation.overlap_metrics:
        if name not in OVERLAP_METRICS:
            problems.append(f"overlap_metrics: unknown metric {name!r}; choose from {', '.join(OVERLAP_METRICS)}")
    if generation.eval_tag is not None and not re.fullmatch(r"[\w.\-]+", generation.eval_tag):
        problems.append(f"eval_tag: {generation.eval_tag!r} must be a folder name (letters, digits, _ . -)")
    if generation.num_fewshot and not (generation.fewshot_dataset or data.dataset):
        problems.append("num_fewshot is set but there is no dataset to draw examples from: set fewshot_dataset")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if generation.engine == "vllm" and processes > 1:
        problems.append(
            f"engine: vllm runs in one process, but {processes} were launched: run train/eval.py without "
            "accelerate launch (vLLM uses every GPU it is given itself)"
        )
    problems += token_description_problems(model, data)
    if training.stage == "grpo":
        problems += rl_problems(config)
    problems += best_model_problems(config)
    return problems


def best_model_problems(config: Config) -> list[str]:
    """What metric_for_best_model, load_best_model_at_end and early_stopping_patience need."""
    run, generation = config.run, config.generation
    metric = run.metric_for_best_model
    wanted = [key for key in ("load_best_model_at_end", "early_stopping_patience") if getattr(run, key)]
    if metric is None:
        return [f"{key} needs metric_for_best_model (e.g. eval_loss)" for key in wanted]
    by_generation = metric.startswith("gen/")
    cadence = generation.generation_eval_steps if by_generation else run.eval_steps
    problems = []
    if by_generation and cadence is None:
        problems.append(f"metric_for_best_model {metric} is a generation metric: set generation_eval_steps")
    if not by_generation and not (metric.startswith("eval_") and config.data.eval_dataset):
        problems.append(
            f"metric_for_best_model {metric}: an eval_* key of the eval rows (with eval_dataset) or a "
            "gen/<dataset>/<metric> key (with generation_eval_steps)"
        )
    if run.load_best_model_at_end and run.save_steps != cadence:
        problems.append(
            f"load_best_model_at_end needs a checkpoint at every evaluation of {metric}: set save_steps to "
            f"{'generation_eval_steps' if by_generation else 'eval_steps'} ({cadence})"
        )
    if run.load_best_model_at_end and run.save_only_model:
        problems.append("load_best_model_at_end reads the best checkpoint's full state: drop save_only_model")
    return problems


def rl_problems(config: Config) -> list[str]:
    """What stage grpo needs of the rest of the config."""
    rl, training, data, run = config.rl, config.training, config.data, config.run
    problems = []
    if not rl.reward_funcs:
        problems.append("stage grpo needs reward_funcs: built-ins gsm8k, squad_v2, format, backtrack or import paths")
    if rl.reward_weights is not None and len(rl.reward_weights) != len(rl.reward_funcs):
        problems.append(
            f"reward_weights has {len(rl.reward_weights)} values for {len(rl.reward_funcs)} reward_funcs "
            f"({', '.join(rl.reward_funcs)})"
        )
    per_rank = training.per_device_train_batch_size * training.gradient_accumulation_steps
    if per_rank % rl.num_generations:
        problems.append(
            f"stage grpo: per_device_train_batch_size x gradient_accumulation_steps ({per_rank} completions per "
            f"process and step) must be a multiple of num_generations ({rl.num_generations}): a prompt's group is "
            "generated and scored on one process"
        )
    if rl.rollout_top_p > 1.0:
        problems.append(f"rollout_top_p must be at most 1, got {rl.rollout_top_p}")
    if rl.rollout_engine == "vllm":
        problems.append("rollout_engine: vllm is not built yet; use rollout_engine: hf (the model being trained)")
    if data.packing:
        problems.append("packing with stage: grpo: completions are batched padding-free or padded; drop packing")
    if run.eval_steps is not None:
        problems.append(
            "eval_steps with stage: grpo: there is no eval loss; evaluate with generation_eval_steps on eval_dataset"
        )
    if training.ref_model and rl.beta == 0:
        problems.append("ref_model is set but beta is 0: stage grpo uses a reference model only with beta > 0")
    return problems
