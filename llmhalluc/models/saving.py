"""Saving a trained model in Hugging Face format: weights, config, a generation config that stops where a turn
ends, and the tokenizer with its chat template."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from accelerate import Accelerator
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from llmhalluc.config import Config
from llmhalluc.data.chat import end_of_turn_ids
from llmhalluc.models.tokens import NewTokens
from llmhalluc.train.dist import zero_stage


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The ids generation stops on: the tokenizer's eos and the chat template's end-of-turn token(s)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return ids + [i for i in end_of_turn_ids(tokenizer) if i not in ids]


def generation_config_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """The model's own generation config with the template's end-of-turn tokens added to eos_token_id (a Llama-3
    base model trained on the llama3 template must stop at <|eot_id|>, not only at <|end_of_text|>), and no
    sampling or length defaults it did not have."""
    config = model.generation_config
    given = config.eos_token_id
    ids = [] if given is None else [given] if isinstance(given, int) else list(given)
    ids += [i for i in stop_token_ids(tokenizer) if i not in ids]
    config.eos_token_id = ids[0] if len(ids) == 1 else ids
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    return config


def save_model_metadata(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """config.json, generation_config.json (with the stop tokens) and the tokenizer, without weights."""
    training_value = model.config.use_cache
    model.config.use_cache = True  # off while training; a loaded model generates with its cache
    model.config.save_pretrained(folder)
    model.config.use_cache = training_value
    generation_config_for(model, tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def save_pretrained_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, **kwargs: Any
) -> None:
    """save_pretrained of model (weights from kwargs' state_dict when given) and tokenizer, with the stop tokens."""
    model.generation_config = generation_config_for(model, tokenizer)
    model.config.use_cache = True
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    tokenizer.save_pretrained(folder)


def save_final_model(
    accelerator: Accelerator,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    config: Config,
    new_tokens: NewTokens | None = None,
) -> None:
    """The trained model in output_dir: the full weights, or with LoRA the adapter (and, with merge, base + adapter
    in output_dir/merged). Under ZeRO-3 weights are gathered from the shards on every rank (a collective);
    otherwise only the writing rank materialises them, so no other rank holds a second copy."""
    if config.model.finetuning_type == "lora":
        save_adapter(accelerator, model, tokenizer, output_dir, config, new_tokens or NewTokens())
        return
    state_dict = None
    if zero_stage(accelerator) == 3 or accelerator.is_main_process:
        state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        # torch.compile's wrapper prefixes every key; the saved model must load into the plain architecture.
        state_dict = {key.removeprefix("_orig_mod."): value for key, value in state_dict.items()}
        unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
        save_pretrained_model(unwrapped, tokenizer, output_dir, state_dict=state_dict)
    accelerator.wait_for_everyone()


def save_adapter(
    accelerator: Accelerator,
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    output_dir: Path,
    config: Config,
    new_tokens: NewTokens,
) -> None:
    """The LoRA adapter (and new-token rows) with PEFT's save_pretrained, gathered whole under ZeRO-3, never empty
    or partial; the tokenizer; and, with merge, the merged standalone model."""
    from llmhalluc.models.lora import merge_adapter, write_adapter_metadata

    unwrapped = accelerator.unwrap_model(model, keep_torch_compile=False)
    trainable = [(name, p) for name, p in unwrapped.named_parameters() if p.requires_grad]
    gather = zero_stage(accelerator) == 3
    with _gathered([p for _, p in trainable]) if gather else contextlib.nullcontext():
        state = {n: p.detach().cpu().clone() for n, p in trainable} if accelerator.is_main_process else {}
    if accelerator.is_main_process:
        # New tokens' rows are saved whole (PEFT's trainable_tokens "delta" holds the rows' values, copied over the
        # base's rows when loaded), so the full embedding matrices need not travel with the adapter.
        unwrapped.save_pretrained(output_dir, state_dict=state, save_embedding_layers=False)
        tokenizer.save_pretrained(output_dir)
        write_adapter_metadata(output_dir, config.model.model_name_or_path, new_tokens.rows_after, new_tokens)
        if config.model.merge:
            merge_adapter(output_dir, output_dir / "merged", tokenizer)
    accelerator.wait_for_everyone()


def _gathered(parameters: list) -> Any:
    import deepspeed

    return deepspeed.zero.GatheredParameters(parameters)
