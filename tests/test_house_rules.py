"""The house rules of issue #18, checked on the source itself.

- A one-way stack: a module imports only its own layer or lower ones (`LAYER`; lazy imports inside
  functions count, `if TYPE_CHECKING:` imports do not), and no two modules import each other, even
  through others and even inside one package.
- Modules under ~600 lines, functions under ~80 lines of code (signature and docstring not counted).
- `ruff format` and `ruff check` (settings in pyproject.toml) have nothing to say.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "dqo_megatron"

LAYERS = [
    ["", "paths", "processes", "outputs", "errors", "env_report", "checkpoint_integrity", "tokenizer_files"],  # leaves
    ["losses", "algorithms"],
    ["config"],
    ["parallel", "compat"],
    ["logprobs"],
    ["models"],
    ["conversion"],
    ["data", "tasks"],
    ["training"],
    ["rollout", "process_scores"],
    ["eval", "analysis"],
    ["demo"],
    ["cli", "__main__"],
]
"""The stack, lowest first: each top-level module or package of dqo_megatron (docs/architecture.md draws it)."""

LAYER = {name: level for level, names in enumerate(LAYERS) for name in names}

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80


def _imports(node: ast.AST, package: list[str]):
    """(line, dotted name) of every import under `node`, relative ones resolved against `package`."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            child = ast.Module(body=child.orelse, type_ignores=[])
        elif isinstance(child, ast.Import):
            yield from ((child.lineno, alias.name) for alias in child.names)
        elif isinstance(child, ast.ImportFrom):
            base = ".".join(package[: len(package) - child.level + 1]) if child.level else ""
            for alias in child.names:
                yield child.lineno, ".".join(filter(None, [base, child.module, alias.name]))
        yield from _imports(child, package)


def _sources() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): p for p in PKG.rglob("*.py")}


def import_graph() -> dict[str, dict[str, int]]:
    """{module: {dqo_megatron module it imports: first line}} over the whole package."""
    paths = _sources()
    graph: dict[str, dict[str, int]] = {m: {} for m in paths}
    for module, path in paths.items():
        package = module.split(".")[: None if path.name == "__init__.py" else -1]
        for line, name in _imports(ast.parse(path.read_text()), package):
            while name and name not in paths:  # `from pkg.mod import func` -> pkg.mod
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].setdefault(name, line)
    return graph


def layer_of(module: str) -> str:
    """The `LAYER` key of a dotted module name ("" for the package itself)."""
    return (module.split(".") + [""])[1]


def cycles(graph: dict[str, set[str] | dict]) -> list[str]:
    """Every import cycle a depth-first walk meets, as "a -> b -> a"."""
    done: set[str] = set()
    stack: list[str] = []
    found: list[str] = []

    def visit(node: str) -> None:
        if node in stack:
            found.append(" -> ".join(stack[stack.index(node) :] + [node]))
        elif node not in done:
            stack.append(node)
            for target in sorted(graph.get(node, ())):
                visit(target)
            stack.pop()
            done.add(node)

    for node in sorted(graph):
        visit(node)
    return found


def test_every_top_level_module_has_a_layer():
    tops = {p.stem for p in PKG.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()} - {"__init__"}
    assert tops <= LAYER.keys(), f"give these a layer in LAYER and docs/architecture.md: {sorted(tops - LAYER.keys())}"


def test_imports_go_one_way_without_cycles():
    graph = import_graph()
    upward = [
        f"{module}:{line} imports {target} (layer {layer_of(target)} is above {layer_of(module) or 'the package'})"
        for module in sorted(graph)
        for target, line in graph[module].items()
        if LAYER[layer_of(target)] > LAYER[layer_of(module)]
    ]
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        packages.setdefault(layer_of(module), set()).update({layer_of(t) for t in targets} - {layer_of(module)})
    problems = upward + cycles(graph) + cycles(packages)
    assert not problems, "\n".join(problems)


def test_the_checker_sees_upward_imports_and_cycles():
    graph = {"dqo_megatron.models.a": {"dqo_megatron.demo.b": 3}, "dqo_megatron.demo.b": {"dqo_megatron.models.a": 1}}
    assert LAYER[layer_of("dqo_megatron.demo.b")] > LAYER[layer_of("dqo_megatron.models.a")]
    assert cycles(graph) == ["dqo_megatron.demo.b -> dqo_megatron.models.a -> dqo_megatron.demo.b"]
    lazy = ast.parse(
        "def f():\n    from dqo_megatron.demo import run\nif TYPE_CHECKING:\n    import dqo_megatron.cli\n"
    )
    assert [name for _, name in _imports(lazy, ["dqo_megatron"])] == ["dqo_megatron.demo.run"]


def _first_code_line(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Where a function's code starts: after its signature (for a CLI command, a declarative table of
    options) and its docstring."""
    body = function.body
    has_docstring = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
    return body[1].lineno if has_docstring and len(body) > 1 else body[0].lineno


def test_modules_and_functions_stay_small():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            problems.append(f"{path.relative_to(ROOT)}: {lines} lines (max {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - _first_code_line(node) + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines of code")
    assert not problems, "\n".join(problems)


def _ruff() -> str:
    found = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if found is None:
        pytest.skip("ruff is not installed (pip install -e '.[test]' brings it)")
    return found


@pytest.mark.parametrize("command", [["format", "--check", "--diff"], ["check", "--no-fix"]], ids=["format", "check"])
def test_ruff_is_clean(command):
    done = subprocess.run([_ruff(), *command, "."], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]


def test_architecture_doc_names_every_module_and_layer():
    """docs/architecture.md: one line per module (its path under dqo_megatron/, `__init__.py` files
    covered by their package) and every layer in its picture."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    modules = [p.relative_to(PKG).as_posix() for p in sorted(PKG.rglob("*.py")) if p.name != "__init__.py"]
    missing = [m for m in modules if f"`{m}`" not in doc]
    assert not missing, f"docs/architecture.md has no line for: {missing}"
    picture = doc[doc.index("```mermaid") : doc.index("```", doc.index("```mermaid") + 3)]
    unnamed = [name for names in LAYERS for name in names if name and name not in picture]
    assert not unnamed, f"the layers picture lacks: {unnamed}"
