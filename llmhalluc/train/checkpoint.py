"""Checkpoints: written to a temporary folder, moved into place only when every rank has finished, rotated after."""

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

from llmhalluc.config import Config
from llmhalluc.data.batching import GlobalBatchSampler
from llmhalluc.errors import UserError

STATE_FILE = "trainer_state.json"
CONFIG_FILE = "config.yaml"
# What makes two runs the same run: a checkpoint resumes only a run that agrees on all of these.
RUN_IDENTITY_KEYS = (
    "model_name_or_path",
    "template",
    "dataset",
    "dataset_dir",
    "max_length",
    "packing",
    "packing_strategy",
    "train_on_prompt",
    "mask_history",
    "max_samples",
    "abstention_answer",
    "seed",
    "backtrack_token",
    "mask_backtracked",
    "backtrack_position_ids",
    "mix_strategy",
    "interleave_probs",
    "add_special_tokens",
    "add_tokens",
    "new_special_tokens_config",
    "init_special_tokens",
    "finetuning_type",
    "lora_rank",
    "lora_target",
    "additional_target",
)
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


def save_training_state(accelerator: Accelerator, model: Any, folder: Path, lora: bool) -> None:
    """accelerator.save_state; with LoRA only the trainable weights are stored (the base is the base model's)."""
    if not lora:
        accelerator.save_state(str(folder))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.save_state(str(folder), exclude_frozen_parameters=True)
    else:
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}

        def keep_trainable(models: list, weights: list, output_dir: str) -> None:
            weights[:] = [{k: v for k, v in w.items() if k in trainable} for w in weights]

        hook = accelerator.register_save_state_pre_hook(keep_trainable)
        try:
            accelerator.save_state(str(folder))
        finally:
            hook.remove()


def load_training_state(accelerator: Accelerator, folder: Path, lora: bool) -> None:
    """accelerator.load_state; a LoRA checkpoint holds only the trainable weights, so the rest stays as loaded."""
    if not lora:
        accelerator.load_state(str(folder))
    elif accelerator.distributed_type == DistributedType.DEEPSPEED:
        accelerator.load_state(str(folder), load_module_strict=False)
    else:
        accelerator.load_state(str(folder), strict=False)


def check_resumable(checkpoint: Path) -> None:
    """A checkpoint saved with save_only_model holds no optimizer state, so no run resumes from it exactly."""
    saved = yaml.safe_load((checkpoint / CONFIG_FILE).read_text())
    if saved.get("save_only_model"):
        raise UserError(
            f"{checkpoint} was saved with save_only_model: true (weights only, no optimizer, scheduler or RNG "
            "state), so training cannot resume from it exactly; load it as a model (model_name_or_path) instead"
        )


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
        for key in RUN_IDENTITY_KEYS
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


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: Path,
    state: TrainerState,
    config: Config,
    model: Any,
    tokenizer: Any,
) -> Path:
    """Save output_dir/checkpoint-<step>; all ranks call it. It holds the model's config, generation config and
    tokenizer (loadable as a model where the weights are plain: one process or DDP), and either the whole training
    state (model, optimizer, scheduler, every rank's RNG, trainer_state.json) or, with save_only_model, the model
    alone in Hugging Face format."""
    from llmhalluc.models.saving import save_final_model, save_model_metadata

    final = output_dir / f"checkpoint-{state.step}"
    staging = output_dir / f"tmp-checkpoint-{state.step}"
    if accelerator.is_main_process and staging.exists():
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    if config.run.save_only_model:
        save_final_model(accelerator, model, tokenizer, staging, config)
    else:
        save_training_state(accelerator, model, staging, lora=config.model.finetuning_type == "lora")
    if accelerator.is_main_process:
        state.write(staging)
        (staging / CONFIG_FILE).write_text(config.to_yaml())
        if config.model.finetuning_type == "lora":
            tokenizer.save_pretrained(staging)  # the adapter's training state; the base stays the base model's
        else:
            save_model_metadata(accelerator.unwrap_model(model), tokenizer, staging)
    accelerator.wait_for_everyone()  # every rank's shards are on disk before the checkpoint is declared complete
    if accelerator.is_main_process:
        (staging / COMPLETE_MARKER).write_text("")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        if config.run.save_total_limit is not None:
            for _, old in checkpoint_steps(output_dir)[: -config.run.save_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final
