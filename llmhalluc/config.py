"""Experiment configuration: flat YAML keys owned by typed dataclasses, `base:` inheritance, key=value overrides."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from llmhalluc.errors import ConfigError

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")
REPORTERS = ("none", "wandb")

# Keys that configs written for other trainers carry, with what to do instead.
FOREIGN_KEYS = {
    "deepspeed": "DeepSpeed is chosen by the accelerate config: accelerate launch --config_file "
    "accelerate_configs/zero3.yaml train/sft.py ...",
    "fsdp": "FSDP is not supported; use a DeepSpeed ZeRO-3 accelerate config",
    "local_rank": "ranks come from accelerate launch",
    "cutoff_len": "use max_length",
    "fp16": "fp16 is not supported; use bf16",
    "stage": "llmhalluc only does supervised fine-tuning",
    "do_train": "train/sft.py always trains",
    "val_size": "name a held-out set with eval_dataset",
    "overwrite_cache": "the cache is keyed by every setting that changes the data",
    "model_name": "use model_name_or_path",
}


PURPOSES = ("train", "eval")  # what a config is loaded for: train/sft.py, or train/eval.py


def option(
    default: Any = None,
    help: str = "",
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    required: tuple[str, ...] = (),
    identity: bool = False,
    default_factory: Any = None,
) -> Any:
    """A config field: default, help text for the docs, the smallest allowed value, the purposes (train, eval) it
    is required for, and whether it is part of a run's identity (a checkpoint resumes only a run that agrees on
    every identity key)."""
    metadata = {"help": help, "minimum": minimum, "exclusive": exclusive, "required": required, "identity": identity}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    model_name_or_path: str = option(
        "", "Hub id or local folder of the model and tokenizer.", required=PURPOSES, identity=True
    )
    template: str | None = option(
        None,
        "Chat template: null = the tokenizer's own; a built-in name (chatml, qwen, llama3, mistral, gemma, phi3); "
        "or a path to a .jinja file.",
        identity=True,
    )
    trust_remote_code: bool = option(False, "Run modelling code shipped with the checkpoint (logged loudly).")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = option(
        None,
        "Attention kernel passed to transformers; null = flash_attention_3 or _2 on a GPU when installed, else sdpa.",
    )
    bf16: bool | None = option(
        None, "bf16 mixed precision; null = on for GPUs that support it (Ampere and newer), off on CPU."
    )
    gradient_checkpointing: bool = option(False, "Recompute activations in backward to save memory.")
    torch_compile: bool = option(False, "Compile the model with torch.compile (inductor, dynamic shapes).")
    use_liger_kernel: bool = option(
        False,
        "Liger's Triton kernels for RMSNorm, RoPE and SwiGLU, and its fused linear cross-entropy (CUDA only; pip "
        "install liger-kernel).",
    )
    add_special_tokens: list[str] = option(
        help="Special tokens to add (a list or comma-separated): never split, stripped or normalised.",
        default_factory=list,
        identity=True,
    )
    add_tokens: list[str] = option(help="Ordinary (non-special) tokens to add.", default_factory=list, identity=True)
    new_special_tokens_config: str | None = option(
        None,
        "YAML file mapping new special tokens to descriptions (relative to the config file); the descriptions drive "
        "desc_init.",
        identity=True,
    )
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise"] = option(
        "noise_init",
        "New rows: mean of the original vocabulary's rows + seeded noise N(0, 1/sqrt(hidden)); or the mean of the "
        "description's token rows (desc_init), plus the same noise (desc_init_w_noise).",
        identity=True,
    )
    finetuning_type: Literal["full", "lora"] = option(
        "full", "Train every weight, or LoRA adapters (with PEFT).", identity=True
    )
    lora_rank: int = option(8, "LoRA rank r.", minimum=1, identity=True)
    lora_alpha: int | None = option(None, "LoRA alpha; null = 2 x lora_rank.", minimum=1, identity=True)
    lora_dropout: float = option(0.0, "Dropout on the LoRA path.", minimum=0.0, identity=True)
    lora_target: list[str] = option(
        help="Modules LoRA wraps: all (every linear layer but the output head) or their names (q_proj, v_proj, ...).",
        default_factory=lambda: ["all"],
        identity=True,
    )
    additional_target: list[str] = option(
        help="Modules trained in full and saved with the adapter (e.g. embed_tokens, lm_head).",
        default_factory=list,
        identity=True,
    )
    use_rslora: bool = option(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).", identity=True)
    use_dora: bool = option(False, "DoRA: weight-decomposed LoRA.", identity=True)
    adapter_name_or_path: str | None = option(
        None, "An existing LoRA adapter of this model to keep training.", identity=True
    )
    merge: bool = option(
        False, "After LoRA training, also write base + adapter merged into output_dir/merged (loads without peft)."
    )
    resize_vocab_to_multiple_of: int | None = option(
        None,
        "When new ids do not fit the embedding matrix, grow it to a multiple of this; null = the model's own padding "
        "(the largest power of two up to 128 dividing its rows).",
        minimum=1,
        identity=True,
    )


@dataclass
class DataConfig:
    """Which data, and how it becomes batches."""

    dataset: list[str] = option(
        help="Training dataset name(s) from dataset_info.json; a list or comma-separated names are concatenated.",
        default_factory=list,
        required=("train",),
        identity=True,
    )
    eval_dataset: list[str] = option(
        help="Evaluation dataset name(s), same format as dataset.", default_factory=list, required=("eval",)
    )
    dataset_dir: str = option("data", "Folder holding dataset_info.json and the local data files.", identity=True)
    max_length: int = option(
        2048, "Longest sequence in tokens; longer chats are truncated at the end.", minimum=2, identity=True
    )
    packing: bool = option(
        False,
        "Pack examples into rows of max_length (restarting position_ids, no padding inside a row); the batch size "
        "then counts rows, not sequences.",
        identity=True,
    )
    packing_strategy: Literal["best_fit_decreasing", "shuffled_best_fit"] = option(
        "best_fit_decreasing",
        "How packed rows are filled: best fit longest-first (tightest, 98-99% on GSM8K-shaped chats, but a row holds "
        "examples of similar length), or best fit in a seeded random order (rows mix lengths; 2-4% looser).",
        identity=True,
    )
    padding_free: bool | None = option(
        None,
        "Concatenate each micro-batch's sequences without padding (restarting position_ids, per-example attention) "
        "instead of padding them; null = where it is exact and fast: flash_attention_2/3 on GPU, sdpa on CPU. "
        "Changes speed only, never the examples in a step or the numbers.",
    )
    pad_to_multiple_of: int | None = option(None, "Pad padded batches to a multiple of this length.", minimum=1)
    train_on_prompt: bool = option(False, "Train on every token, not only the assistant's.", identity=True)
    mask_history: bool = option(False, "Train only on the last assistant turn of each chat.", identity=True)
    max_samples: int | None = option(
        None, "Use at most this many examples of each dataset (first rows).", minimum=1, identity=True
    )
    abstention_answer: str = option(
        "I don't know.",
        "Assistant answer for unanswerable questions (squad_v2 converter).",
        identity=True,
    )
    backtrack_token: str | None = option(
        None,
        "Token that deletes the token before it (e.g. <|BACKTRACK|>); added as a special token when missing.",
        identity=True,
    )
    mask_backtracked: bool = option(
        False,
        "Masked SFT: the k tokens before each run of k backtrack tokens are input, never targets.",
        identity=True,
    )
    backtrack_position_ids: bool = option(
        False,
        "Position ids follow the text after deletions: a backtrack token rewinds the position.",
        identity=True,
    )
    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = option(
        "concat",
        "How several training datasets mix: concatenated, or sampled with interleave_probs until the first "
        "dataset is exhausted (under) or until every dataset is (over, repeating the smaller ones).",
        identity=True,
    )
    interleave_probs: list[float] | None = option(
        None,
        "Share of each training dataset in the mix (one per dataset, summing to 1) for interleave_*.",
        identity=True,
    )
    preprocessing_num_workers: int | None = option(None, "Processes for tokenization (datasets.map).", minimum=1)
    dataloader_num_workers: int | None = option(
        None, "DataLoader worker processes per rank; null = 2 on GPU (collation overlaps compute), 0 on CPU.", minimum=0
    )


@dataclass
class TrainingConfig:
    """Batch, steps, optimizer and schedule."""

    per_device_train_batch_size: int = option(1, "Sequences (or packed rows) per micro-batch per process.", minimum=1)
    per_device_eval_batch_size: int = option(1, "Sequences per evaluation batch per process.", minimum=1)
    gradient_accumulation_steps: int = option(1, "Micro-batches per optimizer step per process.", minimum=1)
    learning_rate: float = option(1e-5, "Peak learning rate.", minimum=0.0, exclusive=True)
    weight_decay: float = option(0.0, "AdamW weight decay (never applied to biases and norm weights).", minimum=0.0)
    adam_beta1: float = option(0.9, "AdamW beta1.", minimum=0.0)
    adam_beta2: float = option(0.999, "AdamW beta2.", minimum=0.0)
    adam_epsilon: float = option(1e-8, "AdamW epsilon.", minimum=0.0, exclusive=True)
    max_grad_norm: float = option(1.0, "Clip the global gradient norm to this; 0 disables clipping.", minimum=0.0)
    num_train_epochs: float = option(3.0, "Epochs to train when max_steps is not set.", minimum=0.0, exclusive=True)
    max_steps: int | None = option(None, "Optimizer steps to train; overrides num_train_epochs.", minimum=1)
    lr_scheduler_type: Literal["linear", "cosine", "constant", "constant_with_warmup"] = option(
        "linear", "Learning-rate schedule after warmup."
    )
    warmup_ratio: float = option(
        0.0, "Fraction of total steps spent warming up (ignored if warmup_steps > 0).", minimum=0.0
    )
    warmup_steps: int = option(0, "Optimizer steps of linear warmup.", minimum=0)
    seed: int = option(42, "Seed for weight init, data order and dropout.", minimum=0, identity=True)
    loss_chunk_tokens: int | None = option(
        None,
        "Trained positions per chunk of the LM head and cross-entropy; null = as many as keep a chunk's fp32 logits "
        "at 1 GiB (2,048 for a 128k vocabulary).",
        minimum=1,
    )
    max_nonfinite_steps: int = option(
        5,
        "Stop (exit code 3) after this many optimizer steps in a row skipped for a non-finite loss or gradient.",
        minimum=1,
    )


@dataclass
class RunConfig:
    """Where results go, how often, and where they are reported."""

    output_dir: str = option(
        "",
        "Folder for config.yaml, metrics.jsonl, checkpoints and the final model; train/eval.py writes eval/ there "
        "(with no output_dir: outputs/eval/<model folder name>).",
        required=("train",),
    )
    logging_steps: int = option(10, "Optimizer steps between metric rows.", minimum=1)
    eval_steps: int | None = option(None, "Optimizer steps between evaluations (needs eval_dataset).", minimum=1)
    save_steps: int | None = option(None, "Optimizer steps between checkpoints; null = final model only.", minimum=1)
    save_total_limit: int | None = option(
        None,
        "Keep only this many newest checkpoints (they stay after the run; the final model is separate).",
        minimum=1,
    )
    save_only_model: bool = option(
        False,
        "Checkpoints hold only the model (a loadable Hugging Face folder), without optimizer, scheduler or RNG "
        "state (AdamW keeps two moments per weight), so a run cannot resume from them.",
    )
    resume_from_checkpoint: str | None = option(
        None, "A checkpoint folder; 'latest' (the newest in output_dir, an error if none); 'auto' (latest if any)."
    )
    report_to: list[str] = option(help="Trackers: none or wandb.", default_factory=lambda: ["none"])
    run_name: str | None = option(None, "Run name for wandb; default: the output_dir's name.")
    wandb_project: str = option("llmhalluc", "wandb project.")


@dataclass
class GenerationEvalConfig:
    """Generation evaluation: settings of train/eval.py and of the evaluation during training."""

    max_new_tokens: int = option(512, "Longest generation, in tokens.", minimum=1)
    temperature: float = option(0.0, "Sampling temperature; 0 = greedy decoding.", minimum=0.0)
    top_p: float = option(1.0, "Nucleus sampling mass (with temperature > 0).", minimum=0.0, exclusive=True)
    generation_batch_size: int = option(8, "Prompts per generation batch per process.", minimum=1)
    engine: Literal["hf", "vllm"] = option(
        "hf", "Generation engine: transformers' generate, or vLLM (GPU, standalone)."
    )
    generation_eval_steps: int | None = option(
        None, "Optimizer steps between generation evaluations during training (and at the end); null = none.", minimum=1
    )
    generation_eval_samples: int = option(
        64, "Examples per eval dataset generated during training (a fixed, seeded subset).", minimum=1
    )


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "run": RunConfig,
    "generation": GenerationEvalConfig,
}


@dataclass
class Config:
    """The whole experiment: one dataclass per concern, every YAML key owned by exactly one field."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    run: RunConfig
    generation: GenerationEvalConfig

    def to_flat_dict(self) -> dict[str, Any]:
        """The flat key -> value mapping a YAML config file holds."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def to_yaml(self) -> str:
        """The resolved config as YAML that load_config reads back to an equal Config."""
        return yaml.safe_dump(self.to_flat_dict(), sort_keys=False, allow_unicode=True)


@functools.cache
def all_fields() -> dict[str, tuple[str, dataclasses.Field, Any]]:
    """Every config key -> (section name, dataclass field, resolved type annotation)."""
    owners: dict[str, tuple[str, dataclasses.Field, Any]] = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert f.name not in owners, f"config key {f.name} is owned twice"
            owners[f.name] = (section, f, hints[f.name])
    return owners


# Path keys resolved relative to the config file that sets them (like base:), and saved absolute, so that
# output_dir/config.yaml still finds them.
RELATIVE_TO_FILE = ("new_special_tokens_config",)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = (), purpose: str = "train") -> Config:
    """Read a YAML experiment config (following `base:`), apply key=value overrides, validate for `purpose` (train:
    train/sft.py, eval: train/eval.py, which needs no training dataset)."""
    values, sources = _read_yaml_with_bases(Path(path), seen=())
    for override in overrides:
        key, value = parse_override(override)
        values[key] = value
        sources[key] = "command line"
    for key in RELATIVE_TO_FILE:
        if isinstance(values.get(key), str) and values[key]:
            folder = Path(sources[key]).parent if sources[key] != "command line" else Path.cwd()
            values[key] = str((folder / values[key]).resolve())
    return build_config(values, sources, purpose)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as a YAML scalar or list."""
    key, sep, raw = text.partition("=")
    key = key.strip().lstrip("-")
    if not sep or not key:
        raise ConfigError(f"command line: override {text!r} must look like key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"command line: value of {key} is not valid YAML: {raw!r} ({_first_line(err)})") from None
    return key, value


def build_config(values: dict[str, Any], sources: dict[str, str] | None = None, purpose: str = "train") -> Config:
    """Validate a flat key -> value mapping into a Config for `purpose`; every problem is collected, then raised
    once."""
    sources = sources or {}
    owners = all_fields()
    problems: list[str] = []
    sectioned: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}

    def where(key: str) -> str:
        return f"{sources[key]}: " if key in sources else ""

    for key, value in values.items():
        if key not in owners:
            problems.append(f"{where(key)}{_unknown_key_message(key, owners)}")
            continue
        section, f, annotation = owners[key]
        try:
            sectioned[section][key] = _coerce(key, value, f, annotation)
        except ValueError as err:
            problems.append(f"{where(key)}{err}")
    for key, (section, f, _) in owners.items():
        if purpose in f.metadata["required"] and not sectioned[section].get(key, _default(f)):
            problems.append(f"missing required key {key}: {f.metadata['help']}")
    if problems:
        raise ConfigError(problems)
    config = Config(**{name: cls(**sectioned[name]) for name, cls in SECTIONS.items()})
    problems = _cross_checks(config)
    if problems:
        raise ConfigError(problems)
    return config


def identity_keys() -> tuple[str, ...]:
    """The keys that define a run (declared with identity=True): a checkpoint resumes only a run equal on all."""
    return tuple(key for key, (_, f, _) in all_fields().items() if f.metadata["identity"])


def _cross_checks(config: Config) -> list[str]:
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
    lora_only = {"adapter_name_or_path": model.adapter_name_or_path, "merge": model.merge}
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
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if generation.engine == "vllm" and processes > 1:
        problems.append(
            f"engine: vllm runs in one process, but {processes} were launched: run train/eval.py without "
            "accelerate launch (vLLM uses every GPU it is given itself)"
        )
    problems += _token_description_problems(model, data)
    return problems


def _token_description_problems(model: ModelConfig, data: DataConfig) -> list[str]:
    """desc_init* needs a description for every token it initialises, from new_special_tokens_config."""
    if not model.init_special_tokens.startswith("desc_init"):
        return []
    if not model.new_special_tokens_config:
        return [
            f"init_special_tokens: {model.init_special_tokens} needs new_special_tokens_config (a YAML mapping "
            "token: description)"
        ]
    try:
        descriptions = read_token_descriptions(Path(model.new_special_tokens_config))
    except ConfigError as err:
        return err.problems
    wanted = [*model.add_special_tokens, *model.add_tokens, *([data.backtrack_token] if data.backtrack_token else [])]
    return [
        f"init_special_tokens: {model.init_special_tokens} needs a description for every new token, and {token!r} "
        f"has none in {model.new_special_tokens_config}"
        for token in wanted
        if token not in descriptions
    ]


def read_token_descriptions(path: Path) -> dict[str, str]:
    """new_special_tokens_config: a YAML mapping of token to a non-empty description."""
    if not path.is_file():
        raise ConfigError(f"new_special_tokens_config: file not found: {path}")
    try:
        mapping = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"new_special_tokens_config: {path} is not valid YAML: {_first_line(err)}") from None
    if not isinstance(mapping, dict) or not all(isinstance(k, str) for k in mapping):
        raise ConfigError(f"new_special_tokens_config: {path} must be a mapping of token: description")
    for token, description in mapping.items():
        if not isinstance(description, str) or not description.strip():
            raise ConfigError(f"new_special_tokens_config: token {token!r} in {path} has an empty description")
    return mapping


def _unknown_key_message(key: str, owners: dict) -> str:
    if key in FOREIGN_KEYS:
        return f"unknown key {key!r}: {FOREIGN_KEYS[key]}"
    closest = difflib.get_close_matches(key, owners, n=1, cutoff=0.0)
    return f"unknown key {key!r} (closest valid key: {closest[0]!r})"


def _default(f: dataclasses.Field) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def _coerce(key: str, value: Any, f: dataclasses.Field, annotation: Any) -> Any:
    """Check `value` against the field's annotation and range; return it in canonical form."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ValueError(f"{key}: {value!r} is not one of {', '.join(args)}")
        return value
    if origin is list and args == (float,):
        return _coerce_number_list(key, value)
    if origin is list:
        return _coerce_name_list(key, value)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key}: expected an integer, got {value!r}")
    elif annotation is float:
        value = _as_float(key, value)
    elif annotation is str:
        if not isinstance(value, str):
            raise ValueError(f"{key}: expected a string, got {value!r} (quote it in YAML)")
        return value
    _check_minimum(key, value, f)
    return value


def _as_float(key: str, value: Any) -> float:
    # PyYAML reads `1e-5` (no dot) as a string, so numeric strings are accepted for float keys.
    if isinstance(value, bool):
        raise ValueError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{key}: expected a finite number, got {value!r}")
    return number


def _check_minimum(key: str, value: float, f: dataclasses.Field) -> None:
    minimum = f.metadata["minimum"]
    if minimum is None:
        return
    if f.metadata["exclusive"] and value <= minimum:
        raise ValueError(f"{key}: must be greater than {minimum}, got {value}")
    if value < minimum:
        raise ValueError(f"{key}: must be at least {minimum}, got {value}")


def _coerce_number_list(key: str, value: Any) -> list[float]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not value:
        raise ValueError(f"{key}: expected a list of numbers, got {value!r}")
    return [_as_float(key, v) for v in value]


def _coerce_name_list(key: str, value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{key}: expected a name or a list of names, got {value!r}")
    names = [v.strip() for v in value]
    if any(not name for name in names):
        raise ValueError(f"{key}: empty name in {value!r}")
    return names


def _read_yaml_with_bases(path: Path, seen: tuple[Path, ...]) -> tuple[dict[str, Any], dict[str, str]]:
    """Values of `path` over those of its `base:` file(s), with the file each key came from."""
    resolved = path.resolve()
    if resolved in seen:
        chain = " -> ".join(str(p) for p in (*seen, resolved))
        raise ConfigError(f"{path}: base: cycle ({chain})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: YAML syntax error: {_first_line(err)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of key: value, got {type(data).__name__}")
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    bases = data.pop("base", None)
    for base in [bases] if isinstance(bases, str) else bases or []:
        if not isinstance(base, str):
            raise ConfigError(f"{path}: base: expected a file name or a list of them, got {base!r}")
        base_values, base_sources = _read_yaml_with_bases(path.parent / base, (*seen, resolved))
        values.update(base_values)
        sources.update(base_sources)
    for key in data:
        if not isinstance(key, str):
            raise ConfigError(f"{path}: key {key!r} must be a string")
    values.update(data)
    sources.update(dict.fromkeys(data, str(path)))
    return values, sources


def _first_line(err: Exception) -> str:
    problem = getattr(err, "problem", None)
    return problem if problem else str(err).splitlines()[0]


def reference_markdown() -> str:
    """The config reference tables of docs/configuration.md, generated from the dataclasses."""
    lines = []
    for section, cls in SECTIONS.items():
        lines.append(f"**{section}** — {cls.__doc__}\n")
        lines.append("| key | default | meaning |")
        lines.append("| --- | --- | --- |")
        for f in dataclasses.fields(cls):
            default = yaml.safe_dump(_default(f), default_flow_style=True).strip().removesuffix("...").strip()
            if f.metadata["required"]:
                verbs = {"train": "train", "eval": "evaluate"}
                needed = f.metadata["required"]
                default = "required" if needed == PURPOSES else "required to " + " and ".join(verbs[p] for p in needed)
            lines.append(f"| `{f.name}` | `{default}` | {f.metadata['help']} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """`python -m llmhalluc.config` prints docs/configuration.md's tables; `--get KEY CONFIG [k=v ...]` one value."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--get", metavar="KEY", help="print this key's resolved value for CONFIG and overrides")
    parser.add_argument("config", nargs="?")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)
    if args.get is None:
        print(reference_markdown(), end="")
        return 0
    try:
        value = load_config(args.config, args.overrides).to_flat_dict()[args.get]
    except (ConfigError, KeyError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(value)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
