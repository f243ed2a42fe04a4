"""setup(config, stage): everything a training run is made of, built once and in the order it must happen, as one
record (Run) that the loop, the objective, checkpoints, the report and the run summary read."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from transformers import PreTrainedTokenizerBase

from llmhalluc.config import Config
from llmhalluc.data.facts import TokenFacts, token_facts
from llmhalluc.eval.references import EvalSet
from llmhalluc.eval.runner import load_eval_sets
from llmhalluc.models.attention import per_example_sdpa, use_packed_sdpa
from llmhalluc.models.export import ModelExport, plan_export
from llmhalluc.models.loading import load_dtype, load_model, load_tokenizer, resolve_attention
from llmhalluc.models.lora import parameter_counts, wrap_lora
from llmhalluc.models.tokens import NewTokens, add_tokens, embed_new_tokens
from llmhalluc.runtime.dist import build_accelerator, deepspeed_config_of, quiet_other_ranks, zero_stage
from llmhalluc.runtime.zero import any_partitioned
from llmhalluc.train.checkpoint import check_output_dir, check_resumable, check_same_run
from llmhalluc.train.feed import EvalData, TrainData, batch_layout
from llmhalluc.train.meter import FlopsModel, flops_model_of
from llmhalluc.train.optim import Schedule, prepare_optimizer
from llmhalluc.train.stage import Stage


@dataclass
class Run:
    """One training run: the launch, the tokenizer and its token facts, the prepared model, optimizer and schedule,
    the data, and what the run summary reports about them."""

    config: Config
    stage: Stage
    accelerator: Accelerator
    tokenizer: PreTrainedTokenizerBase
    facts: TokenFacts
    new_tokens: NewTokens
    export: ModelExport
    model: Any
    optimizer: Any
    schedule: Schedule
    data: TrainData
    eval_data: EvalData | None
    generation_sets: list[EvalSet]
    total_steps: int
    resume_from: Path | None
    attention: str
    parameters: dict[str, int]
    loaded_sharded: bool
    flops: FlopsModel | None
    rollouts: Any = None  # stage grpo: reward functions, reference model, completions log (set by its start)

    @property
    def output_dir(self) -> Path:
        """Where everything of the run is written."""
        return Path(self.config.run.output_dir)

    @property
    def loss_options(self) -> dict[str, Any]:
        """How the LM head and cross-entropy run (chunk size, Liger), and the objective's settings."""
        training = self.config.training
        return {
            "chunk_tokens": training.loss_chunk_tokens,
            "liger": self.config.model.use_liger_kernel,
            "training": training,
            "rl": self.config.rl,
        }

    def summary(self) -> dict[str, Any]:
        """What kind of run this is: machines, processes, distribution, precision, batch layout, global batch, steps,
        the data and its mask audit, new tokens, parameters, attention."""
        accelerator, data = self.accelerator, self.data
        ds_config = deepspeed_config_of(accelerator) or {}
        zero = ds_config.get("zero_optimization", {})
        packed = data.layout == "packed"
        examples_per_item = data.stats.examples / data.packing["rows"] if packed else 1.0
        processes_per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
        summary = {
            "stage": self.stage.name,
            "machines": accelerator.num_processes // processes_per_machine,
            "processes": accelerator.num_processes,
            "distributed_type": str(accelerator.distributed_type).split(".")[-1],
            "zero_stage": zero_stage(accelerator),
            "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") if ds_config else "none",
            "offload_param": zero.get("offload_param", {}).get("device", "none") if ds_config else "none",
            "mixed_precision": str(accelerator.mixed_precision),
            "global_batch_sequences": round(data.sampler.global_batch * examples_per_item),
            "global_batch_packed_rows": data.sampler.global_batch if packed else None,
            "global_batch_tokens": round(
                data.sampler.global_batch * examples_per_item * data.stats.tokens / max(data.stats.examples, 1)
            ),
            "steps_per_epoch": data.sampler.steps_per_epoch,
            "total_steps": self.total_steps,
            **data.summary(),
            **({"eval_data": self.eval_data.stats.to_dict()} if self.eval_data is not None else {}),
            "new_tokens": self.new_tokens.summary(),
            "parameters": self.parameters,
            "attention": self.attention,
            "loaded_sharded": self.loaded_sharded,
        }
        if ds_config:
            summary["deepspeed_config"] = ds_config  # as DeepSpeed received it, every "auto" filled in
        return summary


def setup(config: Config, stage: Stage) -> Run:
    """Build the run: accelerator, tokenizer and new tokens, data (before the model: bad data fails in seconds),
    model (+ new rows, + LoRA), optimizer and schedule, prepared for the launch."""
    accelerator = build_accelerator(config)
    quiet_other_ranks(accelerator)
    model_config, training, run = config.model, config.training, config.run
    set_seed(training.seed)
    resume_from = check_output_dir(Path(run.output_dir), run.resume_from_checkpoint)  # before data preparation
    if resume_from is not None:
        check_resumable(resume_from)
    tokenizer = load_tokenizer(model_config)
    new_tokens = add_tokens(tokenizer, config)  # before the data: a new token is one token wherever it appears
    on_gpu = accelerator.device.type == "cuda"
    attention = resolve_attention(model_config)
    layout = batch_layout(config.data, attention, on_gpu, model_config.torch_compile)
    data = stage.prepare(config, tokenizer, accelerator, layout)
    eval_data = stage.prepare_eval(config, tokenizer, accelerator)
    facts = token_facts(
        tokenizer, config.data.backtrack_target(), new_tokens.ids, config.data.token_aliases
    )  # after the data's own named errors
    generation = config.generation
    generation_sets = (
        load_eval_sets(config, generation.generation_eval_samples) if generation.generation_eval_steps else []
    )
    total_steps = training.max_steps or math.ceil(training.num_train_epochs * data.sampler.steps_per_epoch)
    if resume_from is not None:
        check_same_run(resume_from, config, data.sampler, accelerator.num_processes)

    deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
    model = load_model(model_config, attention, load_dtype(accelerator.mixed_precision == "bf16", deepspeed))
    embed_new_tokens(model, tokenizer, new_tokens, training.seed, model_config.resize_vocab_to_multiple_of)
    export = plan_export(model_config, new_tokens, facts)
    if model_config.finetuning_type == "lora":
        model = wrap_lora(model, model_config, new_tokens, training.seed)
    parameters = parameter_counts(model)
    if layout != "padded" and per_example_sdpa(attention, on_gpu, model_config.torch_compile):
        use_packed_sdpa(model)  # per-example causal sdpa: 2.6x faster on CPU than a block mask over the row
    attention = model.config._attn_implementation
    loaded_sharded = any_partitioned(model)  # ZeRO-3 init
    flops = flops_model_of(model) if on_gpu else None
    model, optimizer, schedule = prepare_optimizer(accelerator, model, training, total_steps)
    return Run(
        config=config,
        stage=stage,
        accelerator=accelerator,
        tokenizer=tokenizer,
        facts=facts,
        new_tokens=new_tokens,
        export=export,
        model=model,
        optimizer=optimizer,
        schedule=schedule,
        data=data,
        eval_data=eval_data,
        generation_sets=generation_sets,
        total_steps=total_steps,
        resume_from=resume_from,
        attention=attention,
        parameters=parameters,
        loaded_sharded=loaded_sharded,
        flops=flops,
    )
