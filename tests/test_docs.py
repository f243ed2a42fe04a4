"""The documentation's promises about the code: every llmhalluc import line it shows runs as written."""

from __future__ import annotations

import ast
import re

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
PYTHON_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def documented_imports() -> list[tuple[str, str]]:
    """(page, import statement) for every `import llmhalluc...` / `from llmhalluc... import ...` in a python block."""
    found = []
    for page in PAGES:
        for block in PYTHON_BLOCK.findall(page.read_text()):
            for node in ast.parse(block).body:
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                module = node.module or "" if isinstance(node, ast.ImportFrom) else ""
                if module.startswith("llmhalluc") or any(n.startswith("llmhalluc") for n in names):
                    found.append((page.name, ast.unparse(node)))
    return found


def test_the_docs_show_the_public_api():
    statements = {statement for _, statement in documented_imports()}
    assert "from llmhalluc.data import tokenize_chat" in statements or any(
        s.startswith("from llmhalluc.data import") and "tokenize_chat" in s for s in statements
    )


@pytest.mark.parametrize(("page", "statement"), documented_imports())
def test_documented_import_runs_as_written(page, statement):
    exec(compile(statement, page, "exec"), {})
