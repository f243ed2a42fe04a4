"""Experiment config: keys, types, ranges, base: inheritance, overrides, and the CLI's exit code 2."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, run_sft

from llmhalluc.config import SECTIONS, all_fields, build_config, load_config, parse_override, reference_markdown
from llmhalluc.errors import ConfigError

MINIMAL = {"model_name_or_path": "m", "dataset": "demo", "output_dir": "out"}


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def problems_of(values: dict, sources: dict | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        build_config(values, sources)
    return caught.value.problems


def test_every_key_is_owned_by_exactly_one_field():
    names = [f.name for cls in SECTIONS.values() for f in dataclasses.fields(cls)]
    assert len(names) == len(set(names))
    assert set(all_fields()) == set(names)


def test_hf_and_llamafactory_key_names_are_accepted():
    keys = [
        "model_name_or_path",
        "template",
        "dataset",
        "eval_dataset",
        "dataset_dir",
        "max_length",
        "packing",
        "per_device_train_batch_size",
        "per_device_eval_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "max_grad_norm",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "warmup_ratio",
        "warmup_steps",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "output_dir",
        "seed",
        "bf16",
        "gradient_checkpointing",
        "attn_implementation",
        "resume_from_checkpoint",
        "report_to",
        "run_name",
        "wandb_project",
    ]
    assert set(keys) <= set(all_fields())


def test_defaults_and_typed_values():
    config = build_config({**MINIMAL, "learning_rate": "1e-5", "dataset": "a,b", "report_to": "wandb"})
    assert config.training.learning_rate == 1e-5  # PyYAML reads 1e-5 as a string; it is still a number
    assert config.data.dataset == ["a", "b"]
    assert config.run.report_to == ["wandb"]
    assert config.training.per_device_train_batch_size == 1
    assert config.data.eval_dataset == []


def test_unknown_key_names_the_closest_valid_key():
    problems = problems_of({**MINIMAL, "learnig_rate": 1e-3}, {"learnig_rate": "x.yaml"})
    assert problems == ["x.yaml: unknown key 'learnig_rate' (closest valid key: 'learning_rate')"]


def test_all_unknown_keys_are_listed_at_once_with_foreign_trainer_hints():
    problems = problems_of({**MINIMAL, "deepspeed": "ds.json", "cutoff_len": 512, "num_epochs": 3})
    assert len(problems) == 3
    assert "DeepSpeed is chosen by the accelerate config" in problems[0]
    assert "use max_length" in problems[1]
    assert "'num_epochs'" in problems[2] and "'num_train_epochs'" in problems[2]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("learning_rate", "abc", "learning_rate: expected a number, got 'abc'"),
        ("per_device_train_batch_size", 0, "per_device_train_batch_size: must be at least 1, got 0"),
        ("max_steps", -5, "max_steps: must be at least 1, got -5"),
        ("learning_rate", -1e-4, "learning_rate: must be greater than 0.0"),
        ("gradient_accumulation_steps", 2.5, "gradient_accumulation_steps: expected an integer, got 2.5"),
        ("packing", "yes", "packing: expected true or false, got 'yes'"),
        ("lr_scheduler_type", "cosine_restarts", "lr_scheduler_type: 'cosine_restarts' is not one of"),
        ("num_train_epochs", "nan", "num_train_epochs: expected a finite number"),
        ("report_to", "tensorboard", "report_to: unknown tracker 'tensorboard'"),
        ("warmup_ratio", 1.5, "warmup_ratio must be below 1"),
    ],
)
def test_bad_values_are_named(key, value, message):
    problems = problems_of({**MINIMAL, key: value})
    assert any(message in p for p in problems), problems


def test_missing_required_keys_are_each_named():
    problems = problems_of({"dataset": "demo"})
    assert any("missing required key model_name_or_path" in p for p in problems)
    assert any("missing required key output_dir" in p for p in problems)


def test_eval_steps_needs_an_eval_dataset():
    problems = problems_of({**MINIMAL, "eval_steps": 10})
    assert problems == ["eval_steps is set but eval_dataset is empty: name an eval dataset or drop eval_steps"]


def test_override_parser():
    assert parse_override("learning_rate=1e-5") == ("learning_rate", "1e-5")
    assert parse_override("packing=true") == ("packing", True)
    assert parse_override("dataset=[a, b]") == ("dataset", ["a", "b"])
    assert parse_override("max_steps=10") == ("max_steps", 10)
    assert parse_override("run_name=my run") == ("run_name", "my run")
    assert parse_override("max_steps=") == ("max_steps", None)
    with pytest.raises(ConfigError, match="must look like key=value"):
        parse_override("max_steps")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_override("dataset=[a, b")


def test_base_inheritance_chain_and_overrides(tmp_path):
    write(tmp_path / "root.yaml", "model_name_or_path: m\ndataset: demo\noutput_dir: out\nlearning_rate: 1.0e-4\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub" / "mid.yaml", "base: ../root.yaml\nlearning_rate: 2.0e-4\nmax_steps: 5\n")
    leaf = write(tmp_path / "sub" / "leaf.yaml", "base: mid.yaml\nmax_steps: 7\n")
    config = load_config(leaf, ["seed=3"])
    assert config.training.learning_rate == 2e-4  # mid over root
    assert config.training.max_steps == 7  # leaf over mid
    assert config.training.seed == 3  # command line over everything
    assert config.model.model_name_or_path == "m"  # inherited from root


def test_base_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="base: cycle"):
        load_config(tmp_path / "a.yaml")


def test_error_names_the_file_a_bad_key_came_from(tmp_path):
    write(tmp_path / "root.yaml", "model_name_or_path: m\ndataset: demo\noutput_dir: out\nwarmup_stepz: 3\n")
    leaf = write(tmp_path / "leaf.yaml", "base: root.yaml\n")
    with pytest.raises(ConfigError) as caught:
        load_config(leaf, ["learning_rate=abc"])
    assert f"{tmp_path / 'leaf.yaml'}/../root.yaml: unknown key 'warmup_stepz'" in str(caught.value) or (
        "root.yaml: unknown key 'warmup_stepz'" in str(caught.value)
    )
    assert "command line: learning_rate: expected a number, got 'abc'" in str(caught.value)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model_name_or_path: m\ndataset: [demo\noutput_dir: out\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}:3:")
    assert "YAML syntax error" in str(caught.value)


def test_config_file_not_found(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path / "list.yaml", "- a\n- b\n"))


def test_resolved_config_round_trips(tmp_path):
    config = load_config(REPO / "configs" / "demo.yaml", ["learning_rate=3e-4", "dataset=[demo, gsm8k_sample]"])
    saved = write(tmp_path / "config.yaml", config.to_yaml())
    assert load_config(saved) == config


def test_config_reference_is_in_sync():
    reference = (REPO / "docs" / "configuration.md").read_text()
    assert reference_markdown() in reference, "regenerate with: python -m llmhalluc.config (docs/configuration.md)"


def test_shipped_configs_load():
    from llmhalluc.cli.pipeline import read_plan

    for path in sorted((REPO / "configs").glob("*.yaml")):
        if "steps" in (yaml.safe_load(path.read_text()) or {}):
            read_plan(path)  # a study's plan: every step's config
        else:
            load_config(path)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learnig_rate=1"], "unknown key 'learnig_rate' (closest valid key: 'learning_rate')"),
        (["learning_rate=abc"], "learning_rate: expected a number, got 'abc'"),
        (["per_device_train_batch_size=0"], "per_device_train_batch_size: must be at least 1, got 0"),
        (["dataset=nosuch"], "unknown dataset 'nosuch' in data/dataset_info.json; known datasets: "),
    ],
)
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, tiny_model_dir, overrides, message):
    out = tmp_path / "out"
    result = run_sft(
        ["configs/demo.yaml", f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", *overrides],
        expect_code=2,
    )
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and message in error_lines[0], result.stderr
    assert not out.exists()


def test_cli_missing_config_file_exits_2(tmp_path):
    result = run_sft([str(tmp_path / "missing.yaml")], expect_code=2)
    assert f"error: config file not found: {tmp_path / 'missing.yaml'}" in result.stderr


def test_cli_debug_shows_the_traceback(tmp_path):
    result = run_sft([str(tmp_path / "missing.yaml"), "--debug"], expect_code=1)
    assert "Traceback" in result.stderr and "ConfigError" in result.stderr


def test_yaml_dump_of_defaults_has_every_key():
    config = build_config(MINIMAL)
    assert set(yaml.safe_load(config.to_yaml())) == set(all_fields())


@pytest.mark.parametrize(
    ("overrides", "env", "message"),
    [
        (
            ["model_name_or_path=some-org/no-such-model"],
            {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on port 9
            "model_name_or_path: 'some-org/no-such-model' is not a local folder, and it is not in the local cache "
            "and the hub (http://127.0.0.1:9) cannot be reached",
        ),
        (
            ["dataset=gsm8k"],
            {"HF_HUB_OFFLINE": "1"},
            "dataset 'gsm8k': 'openai/gsm8k' is not a local folder, and HF_HUB_OFFLINE is set and it is not in the "
            "local cache",
        ),
    ],
    ids=["unreachable-model", "offline-dataset"],
)
def test_a_hub_name_that_cannot_be_had_fails_fast_with_one_line(tmp_path, tiny_model_dir, overrides, env, message):
    out = tmp_path / "out"
    started = time.time()
    result = run_sft(
        ["configs/demo.yaml", f"model_name_or_path={tiny_model_dir}", f"output_dir={out}", *overrides],
        expect_code=2,
        env=env,
    )
    assert time.time() - started < 10
    (line,) = [line for line in result.stderr.splitlines() if line.strip()]
    assert line.startswith(f"error: {message}: download it first")
    assert "Retrying" not in result.stdout + result.stderr and not out.exists()
