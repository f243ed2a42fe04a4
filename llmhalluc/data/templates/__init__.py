"""Built-in chat templates, written by us with {% generation %} markers around what the assistant generates."""

from __future__ import annotations

from pathlib import Path

TEMPLATE_DIR = Path(__file__).parent
BUILTIN_TEMPLATES = tuple(sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja")))


def read_builtin_template(name: str) -> str:
    """The text of built-in template `name` (one of BUILTIN_TEMPLATES)."""
    if name not in BUILTIN_TEMPLATES:
        raise KeyError(name)
    return (TEMPLATE_DIR / f"{name}.jinja").read_text(encoding="utf-8")
