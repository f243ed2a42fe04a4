"""The training loop: train() runs an experiment; train_step() is one exact optimizer step; evaluate() is eval loss.

The loss of an optimizer step is the mean cross-entropy over every trained token of the global batch (all
micro-batches of the accumulation window, on every rank). The trained-token count of the whole window is
all-reduced before any backward pass, and each micro-batch backpropagates `ce_sum * GA * processes / count`:
accelerate (1/GA, or DeepSpeed's own 1/GA) and data-parallel averaging (1/processes) then leave exactly
`sum(ce) / count` in the gradients, whatever the split.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.data_loader import skip_first_batches
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from llmhalluc.config import Config
from llmhalluc.data.batching import (
    GlobalBatchSampler,
    PackedCollator,
    PackedRows,
    PaddedCollator,
    eval_batches,
    pack_rows,
    packing_efficiency,
    should_pack,
)
from llmhalluc.data.chat import IGNORE_INDEX
from llmhalluc.data.pipeline import column, prepare_dataset
from llmhalluc.errors import Diverged, UserError
from llmhalluc.models.attention import use_packed_sdpa
from llmhalluc.models.loading import load_model, load_tokenizer
from llmhalluc.train.checkpoint import (
    TrainerState,
    check_same_run,
    checkpoint_steps,
    resolve_resume,
    save_checkpoint,
)
from llmhalluc.train.dist import (
    build_accelerator,
    data_preparation_turns,
    deepspeed_config_of,
    quiet_other_ranks,
    zero_stage,
)
from llmhalluc.train.metrics import MetricsLogger, mfu, training_flops
from llmhalluc.train.optim import build_optimizer
from llmhalluc.train.preemption import PREEMPTED_MARKER, Preempted, PreemptionWatch

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")  # batch keys the model sees; the rest is metadata


def train(config: Config) -> Path:
    """Run the experiment described by `config`; returns the output_dir holding the final model."""
    accelerator = build_accelerator(config)
    quiet_other_ranks(accelerator)
    training, run = config.training, config.run
    output_dir = Path(run.output_dir)
    set_seed(training.seed)
    tokenizer = load_tokenizer(config.model)
    train_data = build_train_loader(config, tokenizer, accelerator)
    eval_set = None
    if config.data.eval_dataset:
        eval_set, eval_stats = prepare_dataset(
            config.data.eval_dataset,
            config.data,
            tokenizer,
            training.seed,
            partial(data_preparation_turns, accelerator),
        )
        train_data.summary["eval_data"] = eval_stats.to_dict()
    sampler = train_data.sampler
    total_steps = training.max_steps or math.ceil(training.num_train_epochs * sampler.steps_per_epoch)
    resume_dir = check_output_dir(output_dir, run.resume_from_checkpoint, config, sampler.global_batch)

    model = load_model(config.model)
    if packed_sdpa_pays(config, train_data, accelerator):
        use_packed_sdpa(model)
    train_data.summary["attention"] = model.config._attn_implementation
    train_data.summary["loaded_sharded"] = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 init
    if torch.cuda.is_available():
        train_data.flops_model = flops_model_of(model)
    setup = build_optimizer(model, training, total_steps, deepspeed_config_of(accelerator))
    if setup.loop_steps_scheduler:
        # Not prepared: DeepSpeed would step a prepared scheduler itself, on top of the loop's own step.
        model, optimizer = accelerator.prepare(model, setup.optimizer)
        scheduler = setup.scheduler
        accelerator.register_for_checkpointing(scheduler)
    else:
        model, optimizer, scheduler = accelerator.prepare(model, setup.optimizer, setup.scheduler)
    summary = run_summary(accelerator, config, train_data, total_steps)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(config.to_yaml())
        (output_dir / "run_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (output_dir / PREEMPTED_MARKER).unlink(missing_ok=True)
        print(f"config:\n{config.to_yaml()}\nrun: {json.dumps(summary, indent=1)}", flush=True)

    state = TrainerState(
        data_seed=training.seed, global_batch_size=sampler.global_batch, steps_per_epoch=sampler.steps_per_epoch
    )
    if resume_dir is not None:
        accelerator.load_state(str(resume_dir))
        state = TrainerState.read(resume_dir)
        accelerator.print(f"resumed from {resume_dir} at step {state.step}")
    logger = MetricsLogger(config, output_dir, accelerator.is_main_process, total_steps, state.step, summary)
    windows = accumulation_windows(train_data.loader, sampler, state.step, training.gradient_accumulation_steps)
    meter = WindowMeter(accelerator)
    watch = PreemptionWatch()
    model.train()
    while state.step < total_steps:
        state.epoch, micro_batches = next(windows)
        result = train_step(model, optimizer, micro_batches, accelerator, training.max_grad_norm)
        if setup.loop_steps_scheduler and result.applied:
            scheduler.step()
        state.step += 1
        state.nonfinite_steps = 0 if result.applied else state.nonfinite_steps + 1
        diverged = state.nonfinite_steps >= training.max_nonfinite_steps
        state.samples_seen += sampler.global_batch
        meter.add(result, lr=optimizer.param_groups[0]["lr"])
        last = state.step == total_steps
        saving = run.save_steps is not None and state.step % run.save_steps == 0
        stopping = watch.agreed(accelerator) and not last
        # A row at every checkpoint too, so a resumed run's rows cover the same steps as an uninterrupted run's.
        if state.step % run.logging_steps == 0 or last or saving or stopping or diverged:
            logger.log(meter.row(state, train_data.flops_model))
        if diverged:
            logger.close()
            raise Diverged(
                f"{state.nonfinite_steps} optimizer steps in a row had a non-finite loss or gradient norm (up to "
                f"step {state.step}) and were skipped; stopping. Weights were not updated by them; the newest "
                f"checkpoint in {output_dir} is intact. Lower learning_rate or check the data and model."
            )
        if eval_set is not None and ((run.eval_steps and state.step % run.eval_steps == 0) or last):
            logger.log({"step": state.step, **evaluate(model, eval_set, tokenizer, accelerator, config)})
        if saving or stopping:
            save_checkpoint(accelerator, output_dir, state, run.save_total_limit, config)
        if stopping:
            logger.close()
            stop_for_preemption(accelerator, output_dir, state, watch)
        logger.advance()
    watch.restore()
    save_final_model(accelerator, model, tokenizer, output_dir)
    logger.close()
    # The DeepSpeed engine is torn down while the process group still exists: left to the garbage collector at
    # interpreter exit, its cleanup can run after the group is gone (DeepSpeed's own order: engine, then group).
    accelerator.free_memory()
    accelerator.end_training()
    return output_dir


def stop_for_preemption(accelerator: Accelerator, output_dir: Path, state: TrainerState, watch: Any) -> None:
    """Mark the run as preempted (the SLURM script requeues it) and stop every rank."""
    signal_name = signal.Signals(watch.received).name if watch.received else "a signal on another rank"
    message = f"stopped by {signal_name} after step {state.step}; checkpoint-{state.step} saved, resume with latest"
    if accelerator.is_main_process:
        (output_dir / PREEMPTED_MARKER).write_text(json.dumps({"step": state.step, "signal": signal_name}) + "\n")
    accelerator.wait_for_everyone()
    raise Preempted(message)


@dataclass
class StepResult:
    """What one optimizer step measured, kept on the device until a log row needs it."""

    ce_sum: torch.Tensor  # this rank's summed cross-entropy
    trained_tokens: torch.Tensor  # global trained-token count of the step
    tokens: int  # this rank's non-pad tokens
    sum_squared_lengths: int  # this rank's sum of example length^2 (attention FLOPs)
    grad_norm: torch.Tensor | float
    applied: bool  # False when the step was skipped for a non-finite gradient


def train_step(
    model: Any,
    optimizer: Any,
    micro_batches: list[dict[str, torch.Tensor]],
    accelerator: Accelerator,
    max_grad_norm: float,
) -> StepResult:
    """Forward and backward over the accumulation window, then one optimizer step on the exact global mean."""
    on_device = [to_device(mb, accelerator.device) for mb in micro_batches]
    # Counted and reduced on the device: exact normalisation without waiting for the host.
    local_count = sum((mb["labels"][:, 1:] != IGNORE_INDEX).sum() for mb in on_device).float()
    global_count = accelerator.reduce(local_count, "sum")
    scale = accelerator.gradient_accumulation_steps * accelerator.num_processes / global_count
    ce_total = torch.zeros((), device=accelerator.device)
    for micro_batch in on_device:
        with accelerator.accumulate(model):
            ce_sum = cross_entropy_sum(model, micro_batch)
            accelerator.backward(ce_sum * scale)
        ce_total += ce_sum.detach()
    # Under DeepSpeed the step already ran inside backward and this returns its (pre-clipping) norm; DeepSpeed
    # skips a step with non-finite gradients itself. Otherwise the norm is global (gradients are all-reduced),
    # so every rank takes the same decision here, before the optimizer step.
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), max_grad_norm or math.inf)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        applied = model.was_step_applied()
    else:
        applied = bool(torch.isfinite(torch.as_tensor(grad_norm)))
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = sum(int(mb["lengths"].sum()) for mb in micro_batches)
    squares = sum(int((mb["lengths"] ** 2).sum()) for mb in micro_batches)
    return StepResult(ce_total, global_count, tokens, squares, grad_norm, applied)


def cross_entropy_sum(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over trained tokens; the LM head runs only where a token is predicted."""
    labels = batch["labels"]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    logits = model(**model_inputs(batch), logits_to_keep=predicts, use_cache=False).logits
    targets = labels[:, 1:][predicts[:, :-1]]
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def model_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The model's arguments for a batch: ids, mask or positions, and for packed rows the segment boundaries."""
    inputs = {k: v for k, v in batch.items() if k in MODEL_INPUTS}
    if "cu_seq_lens" in batch:  # flash-attention's varlen arguments; packed_sdpa_attention reads them too
        bounds, longest = batch["cu_seq_lens"], batch["max_seq_len"]
        inputs.update(cu_seq_lens_q=bounds, cu_seq_lens_k=bounds, max_length_q=longest, max_length_k=longest)
    return inputs


@torch.no_grad()
def evaluate(model: Any, eval_set: Any, tokenizer: Any, accelerator: Accelerator, config: Config) -> dict[str, float]:
    """Token-weighted eval loss over the whole eval set across ranks, and its perplexity."""
    model.eval()
    collate = PaddedCollator(tokenizer.pad_token_id, config.data.pad_to_multiple_of)
    ce = torch.zeros((), device=accelerator.device)
    count = torch.zeros((), device=accelerator.device)
    batches = eval_batches(
        len(eval_set), config.training.per_device_eval_batch_size, accelerator.num_processes, accelerator.process_index
    )
    for indices in batches:
        # A rank with no rows left still runs a (discarded) forward so ZeRO-3's collectives stay in step.
        batch = to_device(collate([eval_set[i] for i in (indices or [0])]), accelerator.device)
        weight = 1.0 if indices else 0.0
        ce += cross_entropy_sum(model, batch) * weight
        count += (batch["labels"][:, 1:] != IGNORE_INDEX).sum() * weight
    ce, count = accelerator.reduce(ce, "sum"), accelerator.reduce(count, "sum")
    model.train()
    eval_loss = (ce / count).item()
    return {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 50.0)), "eval_tokens": int(count)}


@dataclass
class TrainData:
    """The training DataLoader, its sampler, and what the run summary says about the data."""

    loader: DataLoader
    sampler: GlobalBatchSampler
    summary: dict[str, Any]
    flops_model: Any = None


def build_train_loader(config: Config, tokenizer: Any, accelerator: Accelerator) -> TrainData:
    """Tokenized training data as padded examples or packed rows, in seeded global batches for this rank."""
    data, training = config.data, config.training
    examples, stats = prepare_dataset(
        data.dataset, data, tokenizer, training.seed, partial(data_preparation_turns, accelerator)
    )
    lengths = column(examples, "length").tolist()
    examples = examples.select_columns(["input_ids", "labels"])
    summary: dict[str, Any] = {"train_data": stats.to_dict()}
    accelerator.print(stats.summary("train"))
    packing = should_pack(lengths, data.max_length, data.packing)
    summary["packing"] = {"enabled": packing, "decided_by": "config" if data.packing is not None else "auto"}
    if packing:
        bins = pack_rows(lengths, data.max_length, data.packing_strategy, training.seed)
        efficiency = packing_efficiency(lengths, bins, data.max_length)
        summary["packing"].update(rows=len(bins), efficiency=round(efficiency, 4))
        accelerator.print(f"packing: {len(lengths)} examples into {len(bins)} rows, efficiency {efficiency:.1%}")
        items, collate = PackedRows(examples, bins), PackedCollator(tokenizer.pad_token_id, data.pad_to_multiple_of)
    else:
        items, collate = examples, PaddedCollator(tokenizer.pad_token_id, data.pad_to_multiple_of)
    sampler = GlobalBatchSampler(
        len(items),
        training.per_device_train_batch_size,
        training.gradient_accumulation_steps,
        accelerator.num_processes,
        accelerator.process_index,
        training.seed,
    )
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"the training set has {len(items)} {'packed rows' if packing else 'examples'}, fewer than one "
            f"global batch of {sampler.global_batch}: lower the batch size or add data"
        )
    loader = DataLoader(
        items,
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=data.dataloader_num_workers,
        pin_memory=torch.cuda.is_available(),
        # Its own generator, so iterating never consumes the global RNG that dropout uses.
        generator=torch.Generator().manual_seed(training.seed),
    )
    return TrainData(loader, sampler, summary)


def accumulation_windows(
    loader: DataLoader, sampler: GlobalBatchSampler, start_step: int, accumulation: int
) -> Iterator[tuple[int, list[dict[str, torch.Tensor]]]]:
    """(epoch, the micro-batches of one optimizer step), forever, starting at optimizer step `start_step`."""
    epoch, done = divmod(start_step, sampler.steps_per_epoch)
    while True:
        sampler.set_epoch(epoch)
        epoch_loader = skip_first_batches(loader, done * accumulation) if done else loader
        micro_batches = iter(epoch_loader)
        for _ in range(sampler.steps_per_epoch - done):
            yield epoch, [next(micro_batches) for _ in range(accumulation)]
        epoch, done = epoch + 1, 0


@dataclass
class WindowMeter:
    """Accumulates step results between log rows and reduces them across ranks once per row."""

    accelerator: Accelerator
    results: list[StepResult] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)

    def add(self, result: StepResult, lr: float) -> None:
        """Remember one optimizer step."""
        self.results.append(result)
        self.lrs.append(lr)

    def row(self, state: TrainerState, flops_model: Any) -> dict[str, Any]:
        """The metrics row for the steps since the last row (the window's only host-device sync); it also
        advances the token counters of `state`."""
        device = self.accelerator.device
        local = torch.stack(
            [
                sum(r.ce_sum for r in self.results),
                torch.tensor(float(sum(r.tokens for r in self.results)), device=device),
            ]
        )
        ce_sum, tokens = self.accelerator.reduce(local, "sum").tolist()
        trained = float(sum(r.trained_tokens for r in self.results))
        grad_norms = [float(r.grad_norm) for r in self.results]
        seconds = time.perf_counter() - self.started
        state.tokens_seen += int(tokens)
        state.trained_tokens_seen += int(trained)
        row = {
            "step": state.step,
            "epoch": round(state.step / state.steps_per_epoch, 4),
            "loss": ce_sum / trained,
            "grad_norm": sum(grad_norms) / len(grad_norms),
            "lr": self.lrs[-1],
            "tokens": int(tokens),
            "trained_tokens": int(trained),
            "tokens_per_second": tokens / seconds,
            "trained_tokens_per_second": trained / seconds,
            "step_time": seconds / len(self.results),
            "skipped_steps": sum(not r.applied for r in self.results),
            "tokens_seen": state.tokens_seen,
        }
        if torch.cuda.is_available():
            row["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if flops_model is not None:
                squares = float(sum(r.sum_squared_lengths for r in self.results))
                flops = training_flops(
                    *flops_model,
                    tokens=int(tokens),
                    trained_tokens=int(trained),
                    sum_squared_lengths=int(squares) * self.accelerator.num_processes,
                )
                utilization = mfu(flops, seconds, self.accelerator.num_processes)
                if utilization is not None:
                    row["mfu"] = utilization
        self.results, self.lrs, self.started = [], [], time.perf_counter()
        return row


def flops_model_of(model: Any) -> tuple[Any, int, int]:
    """(model config, parameter count, LM-head parameter count) for the MFU estimate; ZeRO-3 shards counted whole."""

    def numel(p: torch.nn.Parameter) -> int:
        return p.ds_numel if hasattr(p, "ds_numel") else p.numel()

    head = model.get_output_embeddings()
    return model.config, sum(numel(p) for p in model.parameters()), sum(numel(p) for p in head.parameters())


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move every tensor of a batch to the device (non-blocking from pinned memory); plain ints stay."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def packed_sdpa_pays(config: Config, train_data: TrainData, accelerator: Accelerator) -> bool:
    """Per-example sdpa for packed rows: on CPU it beats sdpa's block-diagonal mask over the whole row (measured
    2.6x on the attention); on GPU sdpa keeps the mask, and flash_attention_2/3 do varlen attention themselves.
    Not under torch_compile: a segment loop that changes every step would recompile every step."""
    packing = train_data.summary["packing"]["enabled"]
    plain_sdpa = config.model.attn_implementation == "sdpa" and not config.model.torch_compile
    return packing and plain_sdpa and accelerator.device.type == "cpu"


def check_output_dir(
    output_dir: Path, resume_from_checkpoint: str | None, config: Config, global_batch: int
) -> Path | None:
    """The checkpoint to resume from, after checking it belongs to this run; an error if output_dir holds another
    run and no resume was asked for."""
    if resume_from_checkpoint is None and (checkpoint_steps(output_dir) or (output_dir / "metrics.jsonl").exists()):
        raise UserError(
            f"output_dir {output_dir} already holds a run: set resume_from_checkpoint: latest (or auto) to "
            "continue it, or choose another output_dir"
        )
    resume_dir = resolve_resume(resume_from_checkpoint, output_dir)
    if resume_dir is not None:
        check_same_run(resume_dir, config, global_batch)
    return resume_dir


def run_summary(accelerator: Accelerator, config: Config, train_data: TrainData, total_steps: int) -> dict[str, Any]:
    """What kind of run this is: machines, processes, distribution, precision, global batch, steps."""
    ds_config = deepspeed_config_of(accelerator) or {}
    zero = ds_config.get("zero_optimization", {})
    sampler = train_data.sampler
    stats = train_data.summary["train_data"]
    packing = train_data.summary["packing"]["enabled"]
    tokens_per_item = (
        config.data.max_length * train_data.summary["packing"]["efficiency"]
        if packing
        else stats["tokens"] / max(stats["examples"], 1)
    )
    processes_per_machine = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    summary = {
        "machines": accelerator.num_processes // processes_per_machine,
        "processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type).split(".")[-1],
        "zero_stage": zero_stage(accelerator),
        "offload_optimizer": zero.get("offload_optimizer", {}).get("device", "none") if ds_config else "none",
        "offload_param": zero.get("offload_param", {}).get("device", "none") if ds_config else "none",
        "mixed_precision": str(accelerator.mixed_precision),
        "global_batch_sequences": (
            round(sampler.global_batch * stats["examples"] / train_data.summary["packing"]["rows"])
            if packing
            else sampler.global_batch
        ),
        "global_batch_packed_rows": sampler.global_batch if packing else None,
        "global_batch_tokens": round(sampler.global_batch * tokens_per_item),
        "steps_per_epoch": sampler.steps_per_epoch,
        "total_steps": total_steps,
        **train_data.summary,
    }
    if ds_config:
        summary["deepspeed_config"] = ds_config  # as DeepSpeed received it, every "auto" filled in
    return summary


def save_final_model(accelerator: Accelerator, model: Any, tokenizer: Any, output_dir: Path) -> None:
    """Full weights (gathered from ZeRO-3 shards on every rank), config, generation config and tokenizer."""
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        # torch.compile's wrapper prefixes every key; the saved model must load into the plain architecture.
        state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        unwrapped.config.use_cache = True
        unwrapped.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(output_dir)
    accelerator.wait_for_everyone()
