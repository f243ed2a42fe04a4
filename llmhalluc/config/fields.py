"""How a config key is declared: its default, help text, allowed range, the purposes it is required for and whether
it is part of a run's identity."""

from __future__ import annotations

from dataclasses import field
from typing import Any

PURPOSES = ("train", "eval")  # what a config is loaded for: train/sft.py, or train/eval.py


def option(
    default: Any = None,
    help: str = "",
    *,
    minimum: float | None = None,
    exclusive: bool = False,
    required: tuple[str, ...] = (),
    identity: bool = False,
    default_factory: Any = None,
) -> Any:
    """A config field: default, help text for the docs, the smallest allowed value, the purposes (train, eval) it
    is required for, and whether it is part of a run's identity (a checkpoint resumes only a run that agrees on
    every identity key)."""
    metadata = {"help": help, "minimum": minimum, "exclusive": exclusive, "required": required, "identity": identity}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)
