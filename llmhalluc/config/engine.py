"""Reading and checking an experiment config: flat YAML keys owned by the dataclasses of llmhalluc.config.schema,
`base:` inheritance, key=value overrides, every problem collected then raised once, and the generated reference."""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from llmhalluc.config.checks import cross_checks
from llmhalluc.config.schema import PURPOSES, SECTIONS, Config
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
    config.model.merge = config.model.merge or config.run.do_merge  # do_merge is the plan's name for merge
    problems = cross_checks(config)
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
