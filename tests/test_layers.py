"""The code's shape: layers that import only downward, no import circle, no module over 400 lines, a short train()."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmhalluc"
# Each part of llmhalluc may import its own layer and those below it, never above. Evaluation (generation and
# scoring) sits below training: training evaluates by generation and GRPO generates its rollouts with it.
LAYERS = {
    "errors": 0,
    "hub": 0,
    "plot": 0,
    "config": 1,
    "runtime": 2,
    "data": 3,
    "models": 4,
    "eval": 5,
    "train": 6,
    "cli": 7,
    "merge": 7,
    "lm_eval": 7,
    "__init__": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path) -> set[str]:
    """Every llmhalluc module a file imports, anywhere in it (module level, in functions, under TYPE_CHECKING)."""
    found = set()
    known = modules()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("llmhalluc"):
            for alias in node.names:  # `from llmhalluc.data import chat` imports the module llmhalluc.data.chat
                candidate = f"{node.module}.{alias.name}"
                found.add(candidate if candidate in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("llmhalluc")}
    return found


def layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS[parts[1] if len(parts) > 1 else "__init__"]


def test_every_part_has_a_layer():
    assert {m.split(".")[1] for m in modules() if "." in m} <= set(LAYERS)


def test_imports_point_only_downward():
    upward = [
        f"{source} (layer {layer(source)}) imports {target} (layer {layer(target)})"
        for source, path in modules().items()
        for target in imported(path)
        if layer(target) > layer(source)
    ]
    assert upward == []


def test_there_is_no_import_circle():
    graph = {source: {t for t in imported(path) if t != source} for source, path in modules().items()}
    circles = []
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            node, trail = stack.pop()
            for target in graph.get(node, ()):
                if target == start:
                    circles.append(" -> ".join([*trail, target]))
                elif target not in seen and target in graph:
                    seen.add(target)
                    stack.append((target, [*trail, target]))
    assert circles == []


def test_no_module_is_over_400_lines():
    long = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in long.items() if n > 400} == {}


def test_the_training_procedure_reads_on_two_screens():
    from llmhalluc.train.loop import train

    assert len(inspect.getsource(train).splitlines()) <= 80
