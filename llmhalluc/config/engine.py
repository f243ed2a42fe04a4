"""Reading and checking an experiment config: flat YAML keys owned by the dataclasses of llmhalluc.config.schema,
`base:` inheritance, key=value overrides, every problem collected then raised once, and the generated reference."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmhalluc.config.schema import OVERLAP_METRICS, PURPOSES, REPORTERS, SECTIONS, Config
from llmhalluc.config.tokens import token_description_problems
from llmhalluc.errors import ConfigError

# Keys that configs written for other trainers carry, with what to do instead.
FOREIGN_KEYS = {
    "deepspeed": "DeepSpeed is chosen by the accelerate config: accelerate launch --config_file "
    "accelerate_configs/zero3.yaml train/sft.py ...",
    "fsdp": "FSDP is not supported; use a DeepSpeed ZeRO-3 accelerate config",
    "local_rank": "ranks come from accelerate launch",
    "cutoff_len": "use max_length",
    "fp16": "fp16 is not supported; use bf16",
    "do_train": "train/sft.py always trains",
    "val_size": "name a held-out set with eval_dataset",
    "overwrite_cache": "the cache is keyed by every setting that changes the data",
    "model_name": "use model_name_or_path",
}


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


def changed_keys(config: Config) -> dict[str, Any]:
    """The keys whose value differs from their default, in declaration order."""
    owners = all_fields()
    return {key: value for key, value in config.to_flat_dict().items() if value != _default(owners[key][1])}


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
    lora_only = {
        "adapter_name_or_path": model.adapter_name_or_path,
        "merge": model.merge,
        "freeze_new_token_rows": model.freeze_new_token_rows,
    }
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
    if training.stage == "dpo" and data.packing:
        problems.append(
            "packing with stage: dpo: pairs are batched padding-free (no padding computed) or padded; drop packing"
        )
    if training.pref_loss == "robust" and not training.dpo_label_smoothing < 0.5:
        problems.append(
            f"dpo_label_smoothing must be below 0.5 for pref_loss robust, got {training.dpo_label_smoothing}"
        )
    if training.dpo_label_smoothing and training.pref_loss not in ("sigmoid", "robust"):
        problems.append(f"dpo_label_smoothing applies to pref_loss sigmoid or robust, not {training.pref_loss}")
    if training.ref_model and training.pref_loss in ("simpo", "orpo"):
        problems.append(f"ref_model is set but pref_loss {training.pref_loss} uses no reference model")
    for name in generation.overlap_metrics:
        if name not in OVERLAP_METRICS:
            problems.append(f"overlap_metrics: unknown metric {name!r}; choose from {', '.join(OVERLAP_METRICS)}")
    if generation.eval_tag is not None and not re.fullmatch(r"[\w.\-]+", generation.eval_tag):
        problems.append(f"eval_tag: {generation.eval_tag!r} must be a folder name (letters, digits, _ . -)")
    if generation.num_fewshot and not (generation.fewshot_dataset or data.dataset):
        problems.append("num_fewshot is set but there is no dataset to draw examples from: set fewshot_dataset")
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if generation.engine == "vllm" and processes > 1:
        problems.append(
            f"engine: vllm runs in one process, but {processes} were launched: run train/eval.py without "
            "accelerate launch (vLLM uses every GPU it is given itself)"
        )
    problems += token_description_problems(model, data)
    if training.stage == "grpo":
        problems += _rl_problems(config)
    return problems


def _rl_problems(config: Config) -> list[str]:
    """What stage grpo needs of the rest of the config."""
    rl, training, data, run = config.rl, config.training, config.data, config.run
    problems = []
    if not rl.reward_funcs:
        problems.append("stage grpo needs reward_funcs: built-ins gsm8k, squad_v2, format, backtrack or import paths")
    if rl.reward_weights is not None and len(rl.reward_weights) != len(rl.reward_funcs):
        problems.append(
            f"reward_weights has {len(rl.reward_weights)} values for {len(rl.reward_funcs)} reward_funcs "
            f"({', '.join(rl.reward_funcs)})"
        )
    per_rank = training.per_device_train_batch_size * training.gradient_accumulation_steps
    if per_rank % rl.num_generations:
        problems.append(
            f"stage grpo: per_device_train_batch_size x gradient_accumulation_steps ({per_rank} completions per "
            f"process and step) must be a multiple of num_generations ({rl.num_generations}): a prompt's group is "
            "generated and scored on one process"
        )
    if rl.rollout_top_p > 1.0:
        problems.append(f"rollout_top_p must be at most 1, got {rl.rollout_top_p}")
    if rl.rollout_engine == "vllm":
        problems.append("rollout_engine: vllm is not built yet; use rollout_engine: hf (the model being trained)")
    if data.packing:
        problems.append("packing with stage: grpo: completions are batched padding-free or padded; drop packing")
    if run.eval_steps is not None:
        problems.append(
            "eval_steps with stage: grpo: there is no eval loss; evaluate with generation_eval_steps on eval_dataset"
        )
    if training.ref_model and rl.beta == 0:
        problems.append("ref_model is set but beta is 0: stage grpo uses a reference model only with beta > 0")
    return problems


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
    if origin is dict:
        return _coerce_text_mapping(key, value)
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


def _coerce_text_mapping(key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError(f"{key}: expected a mapping of text to text, got {value!r}")
    if any(not k or not v for k, v in value.items()):
        raise ValueError(f"{key}: empty text in {value!r}")
    return dict(value)


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
