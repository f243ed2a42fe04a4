"""The generation evaluation's config: settings of train/eval.py and of the evaluation during training."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from llmhalluc.config.fields import option


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
    num_fewshot: int = option(
        0,
        "Solved examples shown before each eval prompt, as prior user/assistant turns (after a system message); "
        "drawn per evaluated row with a seeded generator, never the evaluated row itself.",
        minimum=0,
    )
    fewshot_dataset: str | None = option(
        None, "dataset_info.json entry the few-shot examples come from; null = the first training dataset."
    )
    overlap_metrics: list[str] = option(
        help="Text-overlap metrics added for every eval dataset: bleu (sacrebleu, 0-100), rouge (rouge-score "
        "rouge1/rouge2/rougeL F-measure, 0-1).",
        default_factory=list,
    )
    eval_tag: str | None = option(
        None,
        "Name of this evaluation: train/eval.py writes output_dir/eval/<eval_tag>/; null = the UTC start time "
        "(an earlier evaluation is never overwritten).",
    )
