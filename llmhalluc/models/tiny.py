"""A tiny random-init Llama-architecture model and a locally trained byte-level BPE tokenizer, built offline.

`python -m llmhalluc.models.tiny OUT_DIR [--template chatml]` writes a folder that
`AutoModelForCausalLM.from_pretrained` and `AutoTokenizer.from_pretrained` load: tests and the demo use it in place
of hub weights. The same seed gives byte-identical files.
"""

from __future__ import annotations

import argparse
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from llmhalluc.data.templates import read_builtin_template

CORPUS = Path(__file__).with_name("corpus.txt")
PAD_TOKEN = "<|pad|>"


@dataclass(frozen=True)
class TemplateTokens:
    """The special tokens a chat-template family needs in its tokenizer."""

    bos: str | None
    eos: str
    extra: tuple[str, ...]


# Per built-in template: the tokens its text uses, as the vendors' tokenizers define them.
TEMPLATE_TOKENS = {
    "chatml": TemplateTokens(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "qwen": TemplateTokens(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "qwen3": TemplateTokens(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "qwen3_nothink": TemplateTokens(None, "<|im_end|>", ("<|im_start|>", "<|endoftext|>")),
    "llama3": TemplateTokens("<|begin_of_text|>", "<|eot_id|>", ("<|start_header_id|>", "<|end_header_id|>")),
    "mistral": TemplateTokens("<s>", "</s>", ("[INST]", "[/INST]")),
    "gemma": TemplateTokens("<bos>", "<eos>", ("<start_of_turn>", "<end_of_turn>")),
    "phi3": TemplateTokens("<s>", "<|endoftext|>", ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
}


@functools.cache
def _trained_bpe(vocab_size: int) -> str:
    """A byte-level BPE trained on the shipped corpus, as tokenizer.json text (cached per process)."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    tokenizer.train_from_iterator(lines, trainer=trainer)
    return tokenizer.to_str()


def build_tokenizer(template: str = "chatml", vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with `template`'s special tokens, chat template and a pad token distinct from eos."""
    tokens = TEMPLATE_TOKENS[template]
    backend = Tokenizer.from_str(_trained_bpe(vocab_size))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=tokens.bos,
        eos_token=tokens.eos,
        pad_token=PAD_TOKEN,
        extra_special_tokens=list(tokens.extra),
    )
    tokenizer.chat_template = read_builtin_template(template)
    return tokenizer


def build_model(
    tokenizer: PreTrainedTokenizerFast,
    seed: int = 0,
    hidden_size: int = 256,
    num_layers: int = 4,
) -> LlamaForCausalLM:
    """A random-init Llama model sized for `tokenizer`, deterministic for `seed`."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    # Token ids only: a base model carries no sampling or length defaults that would override a harness's own.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def write_tiny_model(
    out_dir: str | Path, template: str = "chatml", seed: int = 0, hidden_size: int = 256, num_layers: int = 4
) -> Path:
    """Build the tiny model and tokenizer and save both to `out_dir` in Hugging Face format."""
    out = Path(out_dir)
    tokenizer = build_tokenizer(template)
    model = build_model(tokenizer, seed=seed, hidden_size=hidden_size, num_layers=num_layers)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def main() -> None:
    """Command line: python -m llmhalluc.models.tiny OUT_DIR."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--template", default="chatml", choices=sorted(TEMPLATE_TOKENS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--num-layers", type=int, default=4)
    args = parser.parse_args()
    out = write_tiny_model(args.out_dir, args.template, args.seed, args.hidden_size, args.num_layers)
    params = sum(p.numel() for p in LlamaForCausalLM.from_pretrained(out).parameters())
    print(f"wrote a {params / 1e6:.1f}M-parameter {args.template} tiny model to {out}")


if __name__ == "__main__":
    main()
