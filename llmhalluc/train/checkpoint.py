"""Checkpoints: written to a temporary folder, moved into place only when every rank has finished, rotated after.

A checkpoint is a model folder (llmhalluc.models.export: the model or adapter as the final save writes it, loadable
on its own) plus what an exact resume needs besides the weights:

    checkpoint-<step>/  the model folder's files
        training_state/   accelerate's save_state: optimizer, scheduler, every rank's RNG (under DeepSpeed its engine
                          checkpoint, fp32 weights included); outside DeepSpeed the weights are the model folder's
        trainer_state.json, config.yaml
        COMPLETE          written last: every file of the checkpoint with its size

With save_only_model the checkpoint is the model folder alone. Resuming checks every listed file, then that the
model folder holds exactly the tensors of the model this config builds, before anything is loaded.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml
from accelerate import Accelerator
from accelerate.utils import DistributedType

from llmhalluc.config import Config, identity_keys
from llmhalluc.data.batching import GlobalBatchSampler
from llmhalluc.errors import UserError
from llmhalluc.models.export import check_model_folder, load_model_weights, save_model

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# What makes two runs the same run: a checkpoint resumes only a run that agrees on all of these.
TRAINING_STATE = "training_state"
COMPLETE_MARKER = "COMPLETE"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands: everything beyond accelerate's state that an exact resume needs."""

    step: int = 0
    epoch: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    trained_tokens_seen: int = 0
    data_seed: int = 0
    global_batch_size: int = 0
    steps_per_epoch: int = 0
    nonfinite_steps: int = 0
    num_processes: int = 0  # 0: a checkpoint written before this was recorded
    train_seconds: float = 0.0  # time spent in training steps (not evaluation or saving)
    best_metric: float | None = None  # metric_for_best_model at its best so far, and the step of that evaluation
    best_step: int | None = None
    evaluations_since_best: int = 0
    final_model_step: int | None = None  # the step the saved final model comes from (the best one, when asked)

    @classmethod
    def start(cls, run: Any) -> TrainerState:
        """The state of a run starting at step 0."""
        sampler = run.data.sampler
        return cls(
            data_seed=run.config.training.seed,
            global_batch_size=sampler.global_batch,
            steps_per_epoch=sampler.steps_per_epoch,
            num_processes=run.accelerator.num_processes,
        )

    def advance(self, applied: bool, seconds: float, global_batch: int) -> None:
        """Count one optimizer step (applied, or skipped for a non-finite gradient) that took `seconds`."""
        self.step += 1
        self.train_seconds += seconds
        self.nonfinite_steps = 0 if applied else self.nonfinite_steps + 1
        self.samples_seen += global_batch

    def count_row(self, row: dict[str, Any]) -> dict[str, Any]:
        """Add a metrics row's tokens to the totals; the row with tokens_seen."""
        self.tokens_seen += row["tokens"]
        self.trained_tokens_seen += row["trained_tokens"]
        return {**row, "tokens_seen": self.tokens_seen}

    def write(self, folder: Path) -> None:
        """Save as folder/trainer_state.json."""
        (folder / STATE_FILE).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def read(cls, folder: Path) -> TrainerState:
        """Load folder/trainer_state.json."""
        return cls(**json.loads((folder / STATE_FILE).read_text()))


def checkpoint_steps(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in output_dir, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = CHECKPOINT_PATTERN.match(path.name)
            if match and (path / COMPLETE_MARKER).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def partial_checkpoints(output_dir: Path) -> list[Path]:
    """Checkpoint folders that were never completed (a crash during a save)."""
    if not output_dir.is_dir():
        return []
    partial = [p for p in output_dir.iterdir() if p.name.startswith("tmp-checkpoint-")]
    partial += [
        p for p in output_dir.iterdir() if CHECKPOINT_PATTERN.match(p.name) and not (p / COMPLETE_MARKER).is_file()
    ]
    return sorted(partial)


def resolve_resume(resume_from_checkpoint: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder to resume from: a path; the `latest` complete one in output_dir; or with `auto` the
    latest if there is one, else None (start fresh). Partial checkpoints are skipped with a warning naming them."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint in ("latest", "auto"):
        for partial in partial_checkpoints(output_dir):
            print(f"warning: skipping incomplete checkpoint {partial} (a save that never finished)", flush=True)
        found = checkpoint_steps(output_dir)
        if found:
            return found[-1][1]
        if resume_from_checkpoint == "auto":
            return None
        raise UserError(f"resume_from_checkpoint: latest, but {output_dir} holds no complete checkpoint")
    path = Path(resume_from_checkpoint)
    if not (path / COMPLETE_MARKER).is_file():
        raise UserError(f"resume_from_checkpoint: {path} is not a complete checkpoint (no {COMPLETE_MARKER} marker)")
    return path


def save_training_state(accelerator: Accelerator, folder: Path, lora: bool) -> None:
    """accelerate's save_state into folder/training_state. Under DeepSpeed that is its engine checkpoint (with LoRA
    only the trainable weights: the base is the base model's); otherwise the weights are left out, as the
    checkpoint's model folder holds them."""
    target = str(folder / TRAINING_STATE)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(target, exclude_frozen_parameters=lora)
        return
    hook = accelerator.register_save_state_pre_hook(lambda models, weights, output_dir: weights.clear())
    try:
        accelerator.save_state(target)
    finally:
        hook.remove()


def load_checkpoint(run: Any, checkpoint: Path | None = None) -> TrainerState:
    """Restore the run from its resume_from checkpoint (every rank calls it): the files are checked against the list
    written when it completed, its model folder against the model this config builds, then weights and training
    state are loaded; returns its TrainerState."""
    resumed = checkpoint is None
    accelerator, model, export = run.accelerator, run.model, run.export
    checkpoint = run.resume_from if resumed else checkpoint
    check_files(checkpoint)
    network = accelerator.unwrap_model(model, keep_torch_compile=False)
    lora = export.kind == "lora"
    state = str(checkpoint / TRAINING_STATE)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        check_model_folder(checkpoint, network, export)
        accelerator.load_state(state, load_module_strict=not lora)  # LoRA: the frozen base was not saved
    else:
        load_model_weights(network, checkpoint, export)
        hook = accelerator.register_load_state_pre_hook(lambda models, input_dir: models.clear())
        try:
            accelerator.load_state(state)
        finally:
            hook.remove()
    state = TrainerState.read(checkpoint)
    if resumed:
        accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    return state


def check_files(checkpoint: Path) -> None:
    """Every file the checkpoint listed in COMPLETE when it was written is there, with its size."""
    listed = (checkpoint / COMPLETE_MARKER).read_text().strip()
    if not listed:
        raise UserError(f"{checkpoint} was written by an older llmhalluc (no file list): it cannot be resumed exactly")
    for name, size in json.loads(listed)["files"].items():
        path = checkpoint / name
        if not path.is_file():
            raise UserError(f"{path} is missing: the checkpoint is damaged (it held this file when it was written)")
        if path.stat().st_size != size:
            raise UserError(f"{path} has {path.stat().st_size} bytes, {size} when it was written: the file is damaged")


def check_resumable(checkpoint: Path) -> None:
    """A checkpoint saved with save_only_model holds no optimizer state, so no run resumes from it exactly."""
    if (checkpoint / TRAINING_STATE).is_dir():
        return
    saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
    if saved.get("save_only_model"):
        raise UserError(
            f"{checkpoint} was saved with save_only_model: true (weights only, no optimizer, scheduler or RNG "
            "state), so training cannot resume from it exactly; load it as a model (model_name_or_path) instead"
        )
    raise UserError(f"{checkpoint / TRAINING_STATE} is missing: the checkpoint cannot be resumed")


def check_output_dir(output_dir: Path, resume_from_checkpoint: str | None) -> Path | None:
    """The checkpoint to resume from; an error if output_dir holds another run and no resume was asked for."""
    if resume_from_checkpoint is None and (checkpoint_steps(output_dir) or (output_dir / "metrics.jsonl").exists()):
        raise UserError(
            f"output_dir {output_dir} already holds a run: set resume_from_checkpoint: latest (or auto) to "
            "continue it, or choose another output_dir"
        )
    return resolve_resume(resume_from_checkpoint, output_dir)


def check_same_run(checkpoint: Path, config: Config, sampler: GlobalBatchSampler, num_processes: int) -> None:
    """A checkpoint resumes only the run it came from: same model, data, data order, global batch, epoch length
    and process count."""
    saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
    current = config.to_flat_dict()
    problems = [
        f"{key}: checkpoint has {saved.get(key)!r}, this run has {current[key]!r}"
        for key in identity_keys()
        if saved.get(key) != current[key]
    ]
    state = TrainerState.read(checkpoint)
    training = config.training
    if state.global_batch_size != sampler.global_batch:
        micro = training.per_device_train_batch_size * num_processes
        hint = (
            f" (gradient_accumulation_steps={state.global_batch_size // micro} gives it with "
            f"per_device_train_batch_size {training.per_device_train_batch_size} on {num_processes} processes)"
            if state.global_batch_size % micro == 0
            else ""
        )
        problems.append(
            f"global batch: checkpoint has {state.global_batch_size}, this run has {sampler.global_batch}{hint}"
        )
    elif state.steps_per_epoch != sampler.steps_per_epoch:
        problems.append(
            f"steps per epoch: checkpoint has {state.steps_per_epoch}, this run has {sampler.steps_per_epoch} (the "
            "data changed under the same dataset names, so the epoch would be split differently)"
        )
    if state.num_processes and state.num_processes != num_processes:
        problems.append(
            f"processes: the checkpoint was written by {state.num_processes}, this run has {num_processes} (optimizer "
            f"shards and per-rank RNG states are per process): resume with {state.num_processes} processes"
        )
    if problems:
        raise UserError(f"{checkpoint} belongs to a different run: " + "; ".join(problems))


def save_checkpoint(run: Any, state: TrainerState) -> Path:
    """Save output_dir/checkpoint-<step>; all ranks call it. It is the model folder (loadable on its own) and,
    unless save_only_model, the training state; COMPLETE lists its files once every rank has written its part."""
    accelerator, config, export, output_dir = run.accelerator, run.config, run.export, run.output_dir
    final = output_dir / f"checkpoint-{state.step}"
    staging = output_dir / f"tmp-checkpoint-{state.step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    if not config.run.save_only_model:
        save_training_state(accelerator, staging, lora=export.kind == "lora")
    save_model(accelerator, run.model, run.tokenizer, export, staging)
    if accelerator.is_main_process:
        state.write(staging)
        (staging / CONFIG_FILE).write_text(config.to_yaml())
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the checkpoint is declared complete
    if accelerator.is_main_process:
        files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / COMPLETE_MARKER).write_text(json.dumps({"files": files}, indent=1) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        if config.run.save_total_limit is not None:
            for step, old in checkpoint_steps(output_dir)[: -config.run.save_total_limit]:
                if step != state.best_step:  # the best checkpoint outlives rotation
                    shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
