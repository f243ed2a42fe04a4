"""Load the model and tokenizer named by the config: chat template, pad token, attention kernel, checkpointing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from llmhalluc.config import ModelConfig
from llmhalluc.data.template import chat_template_of
from llmhalluc.data.templates import BUILTIN_TEMPLATES, read_builtin_template
from llmhalluc.errors import UserError
from llmhalluc.hub import check_hub_name


def resolve_template(template: str) -> str:
    """The text of `template`: a built-in name or a path to a .jinja file."""
    if template in BUILTIN_TEMPLATES:
        return read_builtin_template(template)
    path = Path(template)
    if path.suffix == ".jinja":
        if not path.is_file():
            raise UserError(f"template: file not found: {path}")
        return path.read_text(encoding="utf-8")
    raise UserError(
        f"template: unknown template {template!r}; built-in: {', '.join(BUILTIN_TEMPLATES)}, or a path to a .jinja file"
    )


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The tokenizer with the chat template to train with and a pad token."""
    if model.template is not None:
        template = resolve_template(model.template)  # checked before the (possibly slow) tokenizer download
    check_hub_name("model_name_or_path", model.model_name_or_path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model.model_name_or_path, trust_remote_code=model.trust_remote_code)
    except OSError as err:
        raise UserError(
            f"model_name_or_path: cannot load a tokenizer from {model.model_name_or_path!r}: {str(err).splitlines()[0]}"
        ) from None
    if model.template is not None:
        tokenizer.chat_template = template
    chat_template_of(tokenizer)  # a tokenizer with no template at all is an error now, not at the first row
    if tokenizer.pad_token is None:
        # Labels come from the mask, never from pad ids, so eos doubles safely as padding.
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_attention(model: ModelConfig) -> str:
    """The attention kernel: as configured, else the fastest exact one installed (flash-attention 3 or 2 on a GPU),
    else sdpa."""
    if model.attn_implementation is not None:
        return model.attn_implementation
    if torch.cuda.is_available():
        for implementation, module in (
            ("flash_attention_3", "flash_attn_interface"),
            ("flash_attention_2", "flash_attn"),
        ):
            if importlib.util.find_spec(module) is not None:
                return implementation
    return "sdpa"


def load_dtype(bf16: bool, deepspeed: bool) -> torch.dtype:
    """The dtype weights are loaded in: what the engine holds. DeepSpeed in bf16 holds bf16 weights (its optimizer
    keeps the fp32 master copy), so loading fp32 would only cost host memory on every rank; autocast (DDP, one GPU)
    computes in bf16 from fp32 weights, which it needs."""
    return torch.bfloat16 if bf16 and deepspeed else torch.float32


def load_model(model: ModelConfig, attention: str, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The causal LM in `dtype` with `attention`, cache off, gradient checkpointing if asked."""
    if model.trust_remote_code:
        print(
            f"WARNING: trust_remote_code is on: running modelling code shipped with {model.model_name_or_path}",
            flush=True,
        )
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            model.model_name_or_path,
            dtype=dtype,
            attn_implementation=attention,
            trust_remote_code=model.trust_remote_code,
        )
    except (OSError, ImportError, ValueError) as err:
        raise UserError(
            f"model_name_or_path: cannot load {model.model_name_or_path!r}: {str(err).splitlines()[0]}"
        ) from None
    loaded.config.use_cache = False
    if model.use_liger_kernel:
        apply_liger_kernels(loaded)
    if model.gradient_checkpointing:
        loaded.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    return loaded


def apply_liger_kernels(model: PreTrainedModel) -> None:
    """Swap RMSNorm, RoPE and SwiGLU for Liger's Triton kernels; the loss stays ours (LM head on trained tokens)."""
    if not torch.cuda.is_available():
        raise UserError("use_liger_kernel: Liger's kernels are Triton kernels and need a CUDA GPU")
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError:
        raise UserError(
            "use_liger_kernel: the liger-kernel package is not installed (pip install liger-kernel)"
        ) from None
    _apply_liger_kernel_to_instance(model=model, cross_entropy=False, fused_linear_cross_entropy=False)
