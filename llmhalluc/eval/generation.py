"""Generating answers to eval prompts: batched with left padding, greedy or sampled, stopping at the template's
end of turn, each rank a shard of the prompts (every rank runs the same number of batches, so ZeRO-3's gathers
stay in step), the results gathered in dataset order."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from llmhalluc.config import GenerationEvalConfig
from llmhalluc.data.backtrack import apply_backtracks
from llmhalluc.data.facts import TokenFacts
from llmhalluc.data.template import render
from llmhalluc.errors import UserError


@dataclass
class Generation:
    """One generated answer: the text the model meant (backtracks applied), the raw text (a token written in the
    data as an alias shown as that alias), its backtrack count, and the text with the backtrack tokens dropped but
    not applied (what a scorer that ignores backtracks would read)."""

    prediction: str
    raw: str
    backtracks: int
    unapplied: str


def render_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[list[dict]]) -> list[str]:
    """Each chat rendered with the training template and its generation prompt."""
    return [render(tokenizer, messages, add_generation_prompt=True) for messages in prompts]


def decode(tokenizer: PreTrainedTokenizerBase, ids: list[int], facts: TokenFacts) -> Generation:
    """The generated ids up to the first stop token, as text: raw, and with backtracks applied."""
    stops, backtrack_id = set(facts.stop_ids), facts.backtrack_id
    end = next((i for i, token in enumerate(ids) if token in stops), len(ids))
    ids = [t for t in ids[:end] if t != tokenizer.pad_token_id]
    raw = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    for alias, token in facts.aliases.items():
        raw = raw.replace(token, alias)
    if backtrack_id is None:
        return Generation(raw, raw, 0, raw)
    meant = apply_backtracks(ids, backtrack_id)
    text = tokenizer.decode(meant, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    dropped = [t for t in ids if t != backtrack_id]
    unapplied = tokenizer.decode(dropped, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return Generation(text, raw, sum(t == backtrack_id for t in ids), unapplied)


def meant_text(tokenizer: PreTrainedTokenizerBase, text: str, facts: TokenFacts) -> str:
    """A text written with backtrack tokens (a reference answer in the data) as it reads once they are applied."""
    if facts.backtrack_id is None:
        return text
    for alias, token in facts.aliases.items():
        text = text.replace(alias, token)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if facts.backtrack_id not in ids:
        return text
    meant = apply_backtracks(ids, facts.backtrack_id)
    return tokenizer.decode(meant, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def generate_hf(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: GenerationEvalConfig,
    accelerator: Accelerator,
    facts: TokenFacts,
    progress: bool = True,
) -> list[Generation]:
    """Generations for every prompt (in order, on every rank) with transformers' generate, the prompts split
    across ranks."""
    ranks, rank = accelerator.num_processes, accelerator.process_index
    mine = list(range(rank, len(prompts), ranks))
    per_rank_batches = math.ceil(math.ceil(len(prompts) / ranks) / settings.generation_batch_size)
    stops = facts.stop_ids
    network = accelerator.unwrap_model(model, keep_torch_compile=False)
    results: list[tuple[int, Generation]] = []
    bar = tqdm(total=len(prompts), desc="generate", disable=not (progress and accelerator.is_main_process))
    for batch in range(per_rank_batches):
        indices = mine[batch * settings.generation_batch_size : (batch + 1) * settings.generation_batch_size]
        # A rank with no prompts left still generates (and discards) so ZeRO-3's collectives stay in step.
        texts = [prompts[i] for i in indices] or [prompts[0]]
        inputs = left_padded(tokenizer, texts, accelerator.device)
        with torch.no_grad():
            output = network.generate(
                **inputs,
                max_new_tokens=settings.max_new_tokens,
                do_sample=settings.temperature > 0,
                temperature=settings.temperature if settings.temperature > 0 else None,
                top_p=settings.top_p if settings.temperature > 0 else None,
                eos_token_id=stops,
                pad_token_id=tokenizer.pad_token_id,
                use_cache=True,
            )
        new = output[:, inputs["input_ids"].shape[1] :].tolist()
        results += [(i, decode(tokenizer, ids, facts)) for i, ids in zip(indices, new)]
        bar.update(len(indices) * ranks)
    bar.close()
    ordered = dict(gather_object(results) if ranks > 1 else results)
    return [ordered[i] for i in range(len(prompts))]


def left_padded(tokenizer: PreTrainedTokenizerBase, texts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask, padded on the left (generation continues every row at its end)."""
    encoded = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts]
    return left_padded_ids(encoded, tokenizer.pad_token_id, device)


def left_padded_ids(encoded: list[list[int]], pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """input_ids and attention_mask of token id lists, padded on the left with pad_id."""
    longest = max(len(ids) for ids in encoded)
    input_ids = torch.full((len(encoded), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), longest), dtype=torch.long)
    for row, ids in enumerate(encoded):
        input_ids[row, longest - len(ids) :] = torch.tensor(ids)
        mask[row, longest - len(ids) :] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}


def check_engine(engine: str) -> None:
    """engine: vllm needs a GPU and the vllm package; say so before anything loads."""
    if engine != "vllm":
        return
    if not torch.cuda.is_available():
        raise UserError("engine: vllm needs a CUDA GPU; use engine: hf on this machine")
    import importlib.util

    if importlib.util.find_spec("vllm") is None:
        raise UserError(
            "engine: vllm is not installed in this environment; see requirements-vllm.txt for its own environment"
        )


def generate_vllm(
    model_path: str,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    settings: GenerationEvalConfig,
    facts: TokenFacts,
) -> list[Generation]:
    """Generations with vLLM (one process, GPU): the same prompts, stop tokens and decoding as the hf engine."""
    check_engine("vllm")
    from vllm import LLM, SamplingParams, TokensPrompt

    stops = facts.stop_ids
    sampling = SamplingParams(
        max_tokens=settings.max_new_tokens,
        temperature=settings.temperature,
        top_p=settings.top_p,
        stop_token_ids=stops,
        skip_special_tokens=False,
    )
    engine = LLM(model=model_path, tokenizer=model_path)
    requests = [TokensPrompt(prompt_token_ids=tokenizer(t, add_special_tokens=False)["input_ids"]) for t in prompts]
    outputs = engine.generate(requests, sampling)
    return [decode(tokenizer, list(o.outputs[0].token_ids), facts) for o in outputs]
