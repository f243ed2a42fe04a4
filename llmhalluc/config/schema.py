"""The experiment config's declarations: one dataclass per concern, every YAML key a field with its default, help
text, allowed range, the purposes it is required for and whether it is part of a run's identity. Reading and
checking a config file is llmhalluc.config.engine's."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from llmhalluc.config.fields import PURPOSES, option
from llmhalluc.config.generation import GenerationEvalConfig
from llmhalluc.config.rl import RLConfig

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3")


REPORTERS = ("none", "wandb")


OVERLAP_METRICS = ("bleu", "rouge")  # text overlap scored on request (llmhalluc.eval.metrics.overlap_scores)


@dataclass
class ModelConfig:
    """Which model to train and how to load it."""

    model_name_or_path: str = option(
        "", "Hub id or local folder of the model and tokenizer.", required=PURPOSES, identity=True
    )
    template: str | None = option(
        None,
        "Chat template: null = the tokenizer's own; a built-in name (chatml, qwen, qwen3, qwen3_nothink, llama3, "
        "mistral, gemma, phi3); or a path to a .jinja file.",
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
    init_special_tokens: Literal["noise_init", "desc_init", "desc_init_w_noise", "combined"] = option(
        "noise_init",
        "Rows of the new (and reused) tokens: the mean of the original vocabulary's rows + seeded noise N(0, 1/hidden) "
        "(noise_init); the mean of the description's token rows (desc_init), plus the same noise (desc_init_w_noise); "
        "or description_weight x the description's mean + the rest x the mean of the token's words + noise "
        "(combined). docs/models.md says which rule untied output rows follow.",
        identity=True,
    )
    freeze_new_token_rows: bool = option(
        False,
        "With LoRA, keep the new tokens' rows as initialised instead of training them (they are saved with the "
        "adapter either way).",
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
        "Token that deletes the token before it (e.g. <|BACKTRACK|>); added as a special token when missing, or one "
        "of token_aliases' texts (then the token it stands for).",
        identity=True,
    )
    token_aliases: dict[str, str] = option(
        help="Text written in the data -> the token it stands for (e.g. {'<|BACKTRACK|>': "
        "'<|reserved_special_token_0|>'}): replaced in every message before tokenizing (training_detail offsets "
        "follow), and back in printed generations.",
        default_factory=dict,
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

    def backtrack_target(self) -> str | None:
        """The backtrack token as the tokenizer knows it: backtrack_token, through token_aliases when it is an alias."""
        return (
            None if self.backtrack_token is None else self.token_aliases.get(self.backtrack_token, self.backtrack_token)
        )


@dataclass
class TrainingConfig:
    """The stage and its objective, batch, steps, optimizer and schedule."""

    stage: Literal["sft", "dpo", "grpo"] = option(
        "sft",
        "Training stage: sft (supervised fine-tuning), dpo (preference optimisation on ranking datasets; "
        "pref_loss picks DPO or a variant) or grpo (online RL with rewards, docs/grpo.md).",
        identity=True,
    )
    pref_beta: float = option(
        0.1, "stage dpo: beta, the preference loss's temperature.", minimum=0.0, exclusive=True, identity=True
    )
    pref_loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = option(
        "sigmoid",
        "stage dpo: sigmoid (DPO), ipo, hinge, robust (with dpo_label_smoothing), simpo (no reference), orpo (no "
        "reference).",
        identity=True,
    )
    dpo_label_smoothing: float = option(
        0.0,
        "stage dpo: share of flipped preference labels (cDPO for sigmoid; robust needs it below 0.5).",
        minimum=0.0,
        identity=True,
    )
    simpo_gamma: float = option(0.5, "stage dpo, pref_loss simpo: the target reward margin.", minimum=0, identity=True)
    pref_ftx: float = option(
        0.0, "stage dpo: weight of an SFT loss (the chosen answer's mean token NLL) per pair.", minimum=0, identity=True
    )
    ref_model: str | None = option(
        None,
        "stage dpo and grpo (with beta > 0): the reference model; null = the model training starts from (under LoRA: "
        "the base with adapters disabled). DPO computes its log-probabilities once and caches them in output_dir.",
        identity=True,
    )
    per_device_train_batch_size: int = option(
        1,
        "Sequences (or packed rows; pairs for stage dpo; completions for grpo) per micro-batch per process.",
        minimum=1,
    )
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
    do_train: bool = option(True, "train/run.py: train the model (false: only evaluate model_name_or_path).")
    do_merge: bool = option(False, "train/run.py: merge the LoRA adapter after training (the same as merge: true).")
    do_eval: bool = option(False, "train/run.py: evaluate the trained model by generation on eval_dataset.")
    metric_for_best_model: str | None = option(
        None, "The metric that picks the best model: eval_loss, or any eval_* or gen/<dataset>/<metric> row key."
    )
    greater_is_better: bool | None = option(
        None, "Whether a larger metric_for_best_model is better; null = false for names ending in loss, else true."
    )
    load_best_model_at_end: bool = option(
        False, "The final model is the best checkpoint's (save_steps must equal the metric's evaluation cadence)."
    )
    early_stopping_patience: int | None = option(
        None, "Stop after this many evaluations in a row without a better metric_for_best_model.", minimum=1
    )
    disable_tqdm: bool | None = option(
        None,
        "The progress bar: null = shown when stderr is a terminal, true = never, false = always (a printed line per "
        "metrics row, with elapsed time and ETA, is always written).",
    )
    run_name: str | None = option(None, "Run name for wandb; default: the output_dir's name.")
    wandb_project: str = option("llmhalluc", "wandb project.")


SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "training": TrainingConfig,
    "run": RunConfig,
    "generation": GenerationEvalConfig,
    "rl": RLConfig,
}


@dataclass
class Config:
    """The whole experiment: one dataclass per concern, every YAML key owned by exactly one field."""

    model: ModelConfig
    data: DataConfig
    training: TrainingConfig
    run: RunConfig
    generation: GenerationEvalConfig
    rl: RLConfig

    def to_flat_dict(self) -> dict[str, Any]:
        """The flat key -> value mapping a YAML config file holds."""
        flat: dict[str, Any] = {}
        for section in SECTIONS:
            flat.update(dataclasses.asdict(getattr(self, section)))
        return flat

    def to_yaml(self) -> str:
        """The resolved config as YAML that load_config reads back to an equal Config."""
        return yaml.safe_dump(self.to_flat_dict(), sort_keys=False, allow_unicode=True)
