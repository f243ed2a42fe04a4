"""The documentation's promises about the code: every llmhalluc import line it shows runs as written."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

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


RUNNABLE = re.compile(r"<!-- runnable -->\n```bash\n(.*?)```", re.DOTALL)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_model_dir) -> Path:
    """A working directory laid out like the repository (models/tiny, a copy of data/), where examples may write."""
    root = tmp_path_factory.mktemp("docs")
    (root / "models").mkdir()
    (root / "models" / "tiny").symlink_to(tiny_model_dir)
    shutil.copytree(REPO / "data", root / "data")
    for name in ("configs", "train", "accelerate_configs", "ds_configs"):
        (root / name).symlink_to(REPO / name)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if RUNNABLE.search(p.read_text())], ids=lambda p: p.name)
def test_runnable_examples_run_as_written(sandbox, page):
    """Every block marked <!-- runnable --> runs, in order, in bash with this python first on PATH."""
    path = f"{Path(sys.executable).parent}:{os.environ['PATH']}"
    for block in RUNNABLE.findall(page.read_text()):
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block],
            cwd=sandbox,
            env={**os.environ, "PATH": path},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{page.name}:\n{block}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        assert "dry run: nothing was trained or written" in result.stdout or "wrote" in result.stdout
