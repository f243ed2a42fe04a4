"""The Accelerator for every launch (one process, DDP, DeepSpeed ZeRO; GPU, or gloo on CPU) and its DeepSpeed config."""

from __future__ import annotations

import ast
import difflib
import functools
import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    InitProcessGroupKwargs,
    TorchDynamoPlugin,
)

from llmhalluc.config import Config, TrainingConfig
from llmhalluc.errors import UserError

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)


def build_accelerator(config: Config) -> Accelerator:
    """An Accelerator whose process count matches the launcher's, on NCCL with GPUs and gloo without."""
    # DeepSpeed 0.19 calls torch's renamed collectives on every ZeRO gather: nothing a user can act on, and re-armed
    # whenever a library touches the warning filters, it printed hundreds of times in a 2-step study.
    warnings.filterwarnings(
        "ignore", r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning
    )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_deepspeed = launched_with_deepspeed()
    on_cpu = not torch.cuda.is_available()
    if not on_cpu:
        check_process_count(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), torch.cuda.device_count())
    if use_deepspeed:
        ds_file = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if ds_file:
            check_deepspeed_config(read_deepspeed_json(ds_file), ds_file)
    kwargs_handlers = [process_group_kwargs()]
    bf16 = config.model.bf16
    if bf16 is None:
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    mixed_precision = "bf16" if bf16 else "no"
    dynamo_plugin = None
    if config.model.torch_compile:
        # Dynamic shapes: padded batches and packed rows change length every step.
        dynamo_plugin = TorchDynamoPlugin(backend="inductor", dynamic=True, use_regional_compilation=use_deepspeed)
    accelerator = Accelerator(
        cpu=on_cpu and world_size > 1 and not use_deepspeed,
        dynamo_plugin=dynamo_plugin,
        mixed_precision=mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=config.training.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        step_scheduler_with_optimizer=False,
        kwargs_handlers=kwargs_handlers,
    )
    if accelerator.num_processes != world_size:
        raise UserError(
            f"accelerate started {accelerator.num_processes} process(es) but the launcher started {world_size}: "
            f"check the accelerate config's distributed_type for this host"
        )
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        reconcile_deepspeed_config(accelerator, config)
    return accelerator


def launched_with_deepspeed() -> bool:
    """Whether accelerate launched this process with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def process_group_kwargs() -> InitProcessGroupKwargs:
    """How every launch starts its process group: our timeout, and gloo on a CUDA-less host (without it accelerate
    there silently runs N independent single-process jobs)."""
    if not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return InitProcessGroupKwargs(backend="gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)


def start_process_group() -> None:
    """Start a multi-process launch's group as build_accelerator would, for code that needs it before any run has
    built its Accelerator (a study's barriers; lm-eval would otherwise start it with a 52-week timeout)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or torch.distributed.is_initialized():
        return
    from accelerate import PartialState

    on_cpu = not torch.cuda.is_available()
    PartialState(cpu=on_cpu and not launched_with_deepspeed(), **process_group_kwargs().to_kwargs())


def check_process_count(local_processes: int, devices: int) -> None:
    """One process per GPU: more processes on a machine than it has GPUs is an error."""
    if local_processes > devices:
        raise UserError(
            f"{local_processes} processes were started on this machine but it has {devices} GPU(s): set "
            f"num_processes in the accelerate config to at most {devices} per machine"
        )


def read_deepspeed_json(path: str) -> dict[str, Any]:
    """The DeepSpeed json file, or a UserError naming it and the line of a syntax error."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"DeepSpeed config not found: {path}") from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path}:{err.lineno}: malformed JSON: {err.msg}") from None


@functools.cache
def deepspeed_config_keys() -> frozenset[str]:
    """Every top-level key DeepSpeed's config understands: the string constants of its config modules."""
    import deepspeed

    names = set(EXTRA_DEEPSPEED_KEYS)
    for path in Path(deepspeed.__file__).parent.rglob("*.py"):
        if path.name in ("constants.py", "config.py") or path.name.endswith("_config.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
                    value = node.value.value
                    if isinstance(value, str) and value.isidentifier() and value.islower():
                        names.add(value)
    return frozenset(names)


# Documented top-level sections whose names live outside DeepSpeed's config modules.
EXTRA_DEEPSPEED_KEYS = (
    "amp",
    "elasticity",
    "compression_training",
    "sparse_attention",
    "pipeline",
    "nebula",
    "compile",
    "weight_quantization",
    "hybrid_engine",
    "eigenvalue",
    "sparse_gradients",
    "quantize_training",
)


def check_deepspeed_config(ds_config: dict[str, Any], source: str) -> None:
    """Unknown keys and an invalid ZeRO section are errors here, before DeepSpeed would ignore or choke on them."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    known = deepspeed_config_keys()
    problems = [
        f"{source}: unknown key {key!r} (closest: {difflib.get_close_matches(key, known, n=1, cutoff=0)[0]!r})"
        for key in ds_config
        if key not in known
    ]
    zero = ds_config.get("zero_optimization", {})
    try:
        # "auto" values are filled later from the model; any number stands in for them here.
        DeepSpeedZeroConfig(**{k: (1 if v == "auto" else v) for k, v in zero.items()})
    except ValidationError as err:
        for error in err.errors():
            field = ".".join(str(part) for part in error["loc"])
            problems.append(f"{source}: zero_optimization.{field}: {error['msg']} (got {error.get('input')!r})")
    if problems:
        raise UserError("\n".join(problems))


def quiet_other_ranks(accelerator: Accelerator) -> None:
    """Only the main process shows progress bars and library warnings; the others would repeat them."""
    if accelerator.is_main_process:
        return
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


@contextmanager
def data_preparation_turns(accelerator: Accelerator) -> Iterator[None]:
    """Rank 0 prepares data first (filling a cache other machines may share), then the first rank of every other
    machine (filling its local cache), then all the rest, who find the cache ready. Every rank passes 2 barriers."""
    if not accelerator.is_main_process:
        accelerator.wait_for_everyone()
    if not accelerator.is_local_main_process:
        accelerator.wait_for_everyone()
    yield
    if accelerator.is_main_process:
        accelerator.wait_for_everyone()
    if accelerator.is_local_main_process:
        accelerator.wait_for_everyone()


def deepspeed_config_of(accelerator: Accelerator) -> dict[str, Any] | None:
    """The DeepSpeed config dict accelerate will hand to deepspeed.initialize, or None without DeepSpeed."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return accelerator.state.deepspeed_plugin.deepspeed_config


def reconcile_deepspeed_config(accelerator: Accelerator, config: Config) -> None:
    """Fill the DeepSpeed json's "auto" values from the experiment, in the dict accelerate hands to DeepSpeed."""
    source = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "the DeepSpeed config")
    resolve_deepspeed_config(deepspeed_config_of(accelerator), config.training, accelerator.num_processes, source)


def resolve_deepspeed_config(
    ds_config: dict[str, Any], training: TrainingConfig, num_processes: int, source: str
) -> None:
    """Set every "auto" value the experiment decides (batch, accumulation, clipping, the json's own optimizer);
    a hard-coded value that disagrees is an error naming both."""
    wanted = {
        "train_micro_batch_size_per_gpu": ("per_device_train_batch_size", training.per_device_train_batch_size),
        "gradient_accumulation_steps": ("gradient_accumulation_steps", training.gradient_accumulation_steps),
        "train_batch_size": (
            "per_device_train_batch_size x gradient_accumulation_steps x processes",
            training.per_device_train_batch_size * training.gradient_accumulation_steps * num_processes,
        ),
        # One source of truth for clipping: DeepSpeed clips, with the experiment's max_grad_norm.
        "gradient_clipping": ("max_grad_norm", training.max_grad_norm),
    }
    if "optimizer" in ds_config:  # DeepSpeed builds the optimizer (e.g. its CPU AdamW for offload)
        ds_config["optimizer"].setdefault("params", {})
        optimizer_wanted = {
            "lr": ("learning_rate", training.learning_rate),
            "betas": ("adam_beta1, adam_beta2", [training.adam_beta1, training.adam_beta2]),
            "eps": ("adam_epsilon", training.adam_epsilon),
            "weight_decay": ("weight_decay", training.weight_decay),
        }
        wanted.update({f"optimizer.params.{k}": v for k, v in optimizer_wanted.items()})
    problems = []
    for dotted, (ours, value) in wanted.items():
        *parents, key = dotted.split(".")
        section = ds_config
        for parent in parents:
            section = section[parent]
        given = section.get(key, "auto")
        if given == "auto":
            section[key] = value
        elif (list(given) if isinstance(given, tuple | list) else given) != value:
            problems.append(f"{source}: {dotted} is {given} but the experiment's {ours} is {value}")
    if problems:
        raise UserError("\n".join(problems) + '\n(set these to "auto" in the json to follow the experiment)')


@contextmanager
def zero3_init_disabled(accelerator: Accelerator) -> Iterator[None]:
    """A block in which models load whole on one process: under a ZeRO-3 launch transformers would otherwise build
    them sharded (deepspeed.zero.Init), a collective that only this rank enters (a merge on the main process)."""
    from transformers.integrations.deepspeed import set_hf_deepspeed_config, unset_hf_deepspeed_config

    held = getattr(accelerator.state.deepspeed_plugin, "dschf", None) if accelerator.state.deepspeed_plugin else None
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is not None:
            set_hf_deepspeed_config(held)


@contextmanager
def deepspeed_off() -> Iterator[None]:
    """A block in which an Accelerator built by other code (lm-eval's) is a plain one on a DeepSpeed launch, and
    models load whole: lm-eval replicates the model on every process and splits the requests between them. The
    environment is restored after; transformers' ZeRO-3 setting is not (each later run's Accelerator sets it again)."""
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    held = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "false"
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if held is None:
            os.environ.pop("ACCELERATE_USE_DEEPSPEED")
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = held


def zero_stage(accelerator: Accelerator) -> int | None:
    """The ZeRO stage, or None without DeepSpeed."""
    ds_config = deepspeed_config_of(accelerator)
    return None if ds_config is None else int(ds_config.get("zero_optimization", {}).get("stage", 0))
