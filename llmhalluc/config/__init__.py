"""The experiment config: declarations (schema) and reading them from YAML (engine)."""

from llmhalluc.config.engine import (
    all_fields,
    build_config,
    changed_keys,
    identity_keys,
    load_config,
    parse_override,
    reference_markdown,
)
from llmhalluc.config.schema import (
    PURPOSES,
    SECTIONS,
    Config,
    DataConfig,
    GenerationEvalConfig,
    ModelConfig,
    RunConfig,
    TrainingConfig,
)
from llmhalluc.config.tokens import TokenDescription, read_token_descriptions

__all__ = [
    "PURPOSES",
    "SECTIONS",
    "Config",
    "DataConfig",
    "GenerationEvalConfig",
    "ModelConfig",
    "RunConfig",
    "TokenDescription",
    "TrainingConfig",
    "all_fields",
    "build_config",
    "changed_keys",
    "identity_keys",
    "load_config",
    "parse_override",
    "read_token_descriptions",
    "reference_markdown",
]
