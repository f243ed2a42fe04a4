"""dataset_info.json (LLaMA-Factory's schema) -> DatasetSpec -> raw `datasets.Dataset`."""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from pathlib import Path
from typing import Any

import datasets

from llmhalluc.data.converters import CONVERTERS, Converter
from llmhalluc.data.spec import DEFAULT_ANSWER_MARKERS, DatasetSpec
from llmhalluc.errors import DataError
from llmhalluc.hub import check_hub_name

INFO_FILE = "dataset_info.json"

# Entry keys LLaMA-Factory defines, plus our own `converter`.
ENTRY_KEYS = {
    "hf_hub_url",
    "ms_hub_url",
    "om_hub_url",
    "script_url",
    "cloud_file_name",
    "file_name",
    "file_sha1",
    "formatting",
    "ranking",
    "subset",
    "split",
    "folder",
    "num_samples",
    "columns",
    "tags",
    "converter",
    "metric",
    "answer_markers",
}
INSTRUCTIONS_FILE = "instructions.json"  # beside dataset_info.json: name -> a fixed instruction text
LF_COLUMN_KEYS = {
    "prompt",
    "query",
    "response",
    "history",
    "messages",
    "system",
    "tools",
    "images",
    "videos",
    "audios",
    "chosen",
    "rejected",
    "kto_tag",
}
TAG_KEYS = ("role_tag", "content_tag", "user_tag", "assistant_tag", "observation_tag", "function_tag", "system_tag")
FORMATTINGS = ("alpaca", "sharegpt", "openai")

# Column and tag defaults when the entry has no `columns` / `tags` (LLaMA-Factory's; openai is sharegpt with
# OpenAI's names). When an entry does give `columns` or `tags`, the keys it leaves out are None, as in LLaMA-Factory.
DEFAULT_COLUMNS = {
    "alpaca": {"prompt": "instruction", "query": "input", "response": "output"},
    "sharegpt": {"messages": "conversations"},
    "openai": {"messages": "messages"},
}
DEFAULT_TAGS = {
    "sharegpt": dict(zip(TAG_KEYS, ("from", "value", "human", "gpt", "observation", "function_call", "system"))),
    "openai": dict(zip(TAG_KEYS, ("role", "content", "user", "assistant", "tool", "function_call", "system"))),
}
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def read_dataset_info(dataset_dir: str | Path) -> dict[str, dict[str, Any]]:
    """The raw entries of `dataset_dir/dataset_info.json`."""
    path = Path(dataset_dir) / INFO_FILE
    if not path.is_file():
        raise DataError(f"dataset registry not found: {path} (set dataset_dir to the folder holding {INFO_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    if not isinstance(info, dict) or not all(isinstance(v, dict) for v in info.values()):
        raise DataError(f"{path}: expected an object mapping dataset names to entries")
    return info


def resolve_dataset(name: str, dataset_dir: str | Path) -> DatasetSpec:
    """Validate the entry `name` of dataset_dir's dataset_info.json into a DatasetSpec."""
    info = read_dataset_info(dataset_dir)
    where = f"{Path(dataset_dir) / INFO_FILE}: dataset {name!r}"
    if name not in info:
        known = ", ".join(sorted(info)) or "(none)"
        raise DataError(f"unknown dataset {name!r} in {Path(dataset_dir) / INFO_FILE}; known datasets: {known}")
    entry = info[name]
    _reject_unknown(where, "key", entry, ENTRY_KEYS)
    formatting = entry.get("formatting", "alpaca")
    if formatting not in FORMATTINGS:
        raise DataError(f"{where}: formatting {formatting!r} is not one of {', '.join(FORMATTINGS)}")
    converter = entry.get("converter", formatting)
    if converter not in CONVERTERS:
        raise DataError(f"{where}: unknown converter {converter!r}; known: {', '.join(sorted(CONVERTERS))}")
    ranking = bool(entry.get("ranking"))
    if ranking and converter != formatting:
        raise DataError(f"{where}: a ranking dataset is read by its formatting ({formatting}), not by a converter")
    columns = _columns(where, entry, formatting, CONVERTERS[converter], converter != formatting, ranking)
    texts = read_instructions(dataset_dir)
    instructions = {key: texts[column] for key, column in columns.items() if column in texts}
    markers = entry.get("answer_markers", list(DEFAULT_ANSWER_MARKERS))
    if not isinstance(markers, list) or not markers or not all(isinstance(m, str) and m.strip() for m in markers):
        raise DataError(f"{where}: answer_markers must be a list of texts, got {markers!r}")
    tags = _tags(where, entry, formatting)
    source, location = _source(where, entry, Path(dataset_dir))
    metric = entry.get("metric")
    if metric is not None and metric not in ("gsm8k", "squad_v2", "exact_match"):
        raise DataError(f"{where}: unknown metric {metric!r}; known: gsm8k, squad_v2, exact_match")
    num_samples = entry.get("num_samples")
    if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
        raise DataError(f"{where}: num_samples must be a positive integer, got {num_samples!r}")
    return DatasetSpec(
        name=name,
        source=source,
        location=location,
        formatting=formatting,
        converter=converter,
        columns=columns,
        tags=tags,
        subset=entry.get("subset"),
        split=entry.get("split", "train"),
        folder=entry.get("folder"),
        num_samples=num_samples,
        columns_given="columns" in entry,
        metric=metric,
        instructions=instructions,
        answer_markers=tuple(markers),
        ranking=ranking,
    )


def read_instructions(dataset_dir: str | Path) -> dict[str, str]:
    """dataset_dir/instructions.json: fixed instruction texts by name ({} without the file). A column of a
    dataset_info.json entry that names one (and no column of the data) puts that text in every row."""
    path = Path(dataset_dir) / INSTRUCTIONS_FILE
    if not path.is_file():
        return {}
    try:
        texts = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
    if not isinstance(texts, dict) or not all(isinstance(v, str) and v.strip() for v in texts.values()):
        raise DataError(f"{path}: expected an object mapping names to instruction texts")
    return texts


def _reject_unknown(where: str, kind: str, given: dict, valid: set[str] | tuple[str, ...]) -> None:
    unknown = [key for key in given if key not in valid]
    if unknown:
        hints = [f"{key!r} (closest: {difflib.get_close_matches(key, valid, n=1, cutoff=0)[0]!r})" for key in unknown]
        raise DataError(f"{where}: unknown {kind}{'s' if len(unknown) > 1 else ''} {', '.join(hints)}")


def _source(where: str, entry: dict, dataset_dir: Path) -> tuple[str, str]:
    if "hf_hub_url" in entry:
        return "hf_hub", entry["hf_hub_url"]
    for key in ("ms_hub_url", "om_hub_url", "script_url", "cloud_file_name"):
        if key in entry:
            raise DataError(f"{where}: {key} is not supported; download the data and point file_name at it")
    if "file_name" not in entry:
        raise DataError(f"{where}: needs hf_hub_url or file_name")
    path = dataset_dir / entry["file_name"]
    if not path.exists():
        raise DataError(f"{where}: data file not found: {path}")
    return "file", str(path)


def _columns(where: str, entry: dict, formatting: str, converter: Converter, own: bool, ranking: bool = False) -> dict:
    """The entry's column mapping: LLaMA-Factory's for its formattings; for our converters their own keys (an entry
    may name them by LLaMA-Factory's names, e.g. query/response for a GSM8K converter's question/answer). A ranking
    entry maps chosen and rejected (the two answers) in place of response."""
    given = entry.get("columns")
    required = [c for c in converter.columns if c not in converter.optional]
    if ranking:
        columns = dict(DEFAULT_COLUMNS[formatting])
        columns.pop("response", None)
        columns |= {"chosen": "chosen", "rejected": "rejected"}
        if given is not None:
            if not isinstance(given, dict):
                raise DataError(f"{where}: columns must be an object, got {given!r}")
            _reject_unknown(where, "column key", given, LF_COLUMN_KEYS)
            columns = dict(given)
        for side in ("chosen", "rejected"):
            if not columns.get(side):
                raise DataError(f"{where}: a ranking dataset needs a {side!r} column (columns.{side})")
        return columns
    if given is None:
        return dict(DEFAULT_COLUMNS[formatting]) if not own else {c: c for c in required}
    if not isinstance(given, dict):
        raise DataError(f"{where}: columns must be an object, got {given!r}")
    valid = LF_COLUMN_KEYS | set(converter.columns)
    _reject_unknown(where, "column key", given, valid)
    if own:
        given = {converter.aliases.get(key, key): value for key, value in given.items()}
    for unsupported in ("images", "videos", "audios", "chosen", "rejected", "kto_tag"):
        if given.get(unsupported):
            hint = ' (set "ranking": true for a preference dataset)' if unsupported in ("chosen", "rejected") else ""
            raise DataError(f"{where}: column {unsupported!r} is not supported here{hint}")
    if own:  # our converters: required columns left out keep their own names, optional ones are absent
        return {c: given.get(c, None if c in converter.optional else c) for c in converter.columns}
    return dict(given)


def _tags(where: str, entry: dict, formatting: str) -> dict:
    if formatting == "alpaca":
        return {}
    given = entry.get("tags")
    if given is None:
        return dict(DEFAULT_TAGS[formatting])
    if not isinstance(given, dict):
        raise DataError(f"{where}: tags must be an object, got {given!r}")
    _reject_unknown(where, "tag", given, TAG_KEYS)
    return {tag: given.get(tag) for tag in TAG_KEYS}


def load_rows(
    name: str, dataset_dir: str | Path, seed: int = 0, max_samples: int | None = None
) -> tuple[DatasetSpec, datasets.Dataset]:
    """The entry `name` and its rows (at most max_samples, the first ones), with every mapped column checked; a
    column that names an instruction and no column of the data gives that instruction to every row."""
    spec = resolve_dataset(name, dataset_dir)
    raw = load_raw_dataset(spec, seed=seed)
    if max_samples is not None and len(raw) > max_samples:
        raw = raw.select(range(max_samples))
    fixed = {key: text for key, text in spec.instructions.items() if spec.columns[key] not in raw.column_names}
    spec = dataclasses.replace(spec, instructions=fixed)
    check_columns(spec, raw)
    return spec, raw


def load_raw_dataset(spec: DatasetSpec, seed: int = 0) -> datasets.Dataset:
    """The rows of `spec` as a datasets.Dataset, with num_samples applied."""
    if spec.source == "hf_hub":
        check_hub_name(f"dataset {spec.name!r}", spec.location, kind="dataset")
        try:
            dataset = datasets.load_dataset(spec.location, name=spec.subset, split=spec.split, data_dir=spec.folder)
        except Exception as err:
            raise DataError(f"dataset {spec.name!r}: cannot load {spec.location} from the hub: {err}") from None
    else:
        dataset = _load_local(spec)
    if spec.num_samples is not None:
        dataset = _sample(dataset, spec.num_samples, seed)
    return dataset


def _load_local(spec: DatasetSpec) -> datasets.Dataset:
    path = Path(spec.location)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    suffixes = {p.suffix for p in files}
    if len(suffixes) != 1 or next(iter(suffixes)) not in FILE_BUILDERS:
        raise DataError(
            f"dataset {spec.name!r}: {path} must hold files of one type of {', '.join(FILE_BUILDERS)}, "
            f"found {sorted(suffixes)}"
        )
    builder = FILE_BUILDERS[files[0].suffix]
    # datasets logs its own error first, counting rows from 0; the DataError below names file, line and column.
    quiet = datasets.utils.logging.get_logger(f"datasets.packaged_modules.{builder}.{builder}")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train")
    except Exception as err:
        if builder == "json":  # datasets' error does not say where; parse again only now, to name file and line
            for file in files:
                check_json_file(file)
        raise DataError(f"dataset {spec.name!r}: cannot read {path}: {err}") from None
    finally:
        quiet.setLevel(level)


def check_json_file(path: Path) -> None:
    """Raise a DataError naming file and line if `path` is not valid JSON / JSON Lines."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if not stripped:
        raise DataError(f"{path}: the file is empty")
    if stripped[0] == "[":
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}:{err.colno}: malformed JSON: {err.msg}") from None
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{lineno}:{err.colno}: malformed JSON line: {err.msg}") from None


def _sample(dataset: datasets.Dataset, num_samples: int, seed: int) -> datasets.Dataset:
    # LLaMA-Factory's rule: a random subset; asking for more rows than exist repeats the data, then tops up at random.
    import numpy as np

    rng = np.random.default_rng(seed)
    indices = rng.permutation(len(dataset))[:num_samples]
    if num_samples > len(dataset):
        repeats = np.tile(np.arange(len(dataset)), num_samples // len(dataset))
        extra = rng.choice(len(dataset), num_samples - len(repeats), replace=False)
        indices = np.concatenate([repeats, extra])
    return dataset.select(indices.tolist())


def check_columns(spec: DatasetSpec, dataset: datasets.Dataset) -> None:
    """Raise a DataError if a column the spec maps to is missing from the data."""
    for key, column in spec.columns.items():
        if key in spec.instructions:
            continue
        if not spec.columns_given and key == "query" and column not in dataset.column_names:
            continue  # alpaca data often has no input column at all; only a named column must exist
        if column is not None and column not in dataset.column_names:
            raise DataError(
                f"dataset {spec.name!r}: columns.{key} names column {column!r}, which the data lacks; "
                f"its columns are: {', '.join(dataset.column_names)} (a fixed instruction would be a name in "
                f"{INSTRUCTIONS_FILE} beside dataset_info.json)"
            )
