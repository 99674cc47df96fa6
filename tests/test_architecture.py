"""The house rules: subpackages in the order of the flow, no module importing a higher layer,
no import cycles, Keras internals behind one door, and a CLI that starts without Keras, JAX or
matplotlib."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ablab"

LAYERS = {
    "errors": 0,
    "_keras": 0,
    "_source": 0,
    "_startup": 0,
    "study": 1,
    "store": 2,
    "stats": 3,
    "engine": 4,
    "analysis": 5,
    "execution": 6,
    "output": 7,
    "cli": 8,
    "__init__": 9,
    "__main__": 9,
}
"""errors / keras shim < study < store < stats < engine < analysis < execution < output < cli."""

ALLOWED_UPWARD = {
    # RunResult.plot / write_report / report_data / _repr_html_ draw with the output layer,
    # imported lazily inside those methods (and for type hints only)
    ("ablab.execution.result", "ablab.output.report"),
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    """ablab modules imported by ``path`` (every import, or only those run at import time:
    module level, outside ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    nodes: list[ast.AST]
    if top_level_only:
        nodes = []
        todo: list[ast.AST] = list(tree.body)
        while todo:  # what runs at import: not function bodies, not `if TYPE_CHECKING:`
            node = todo.pop()
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            nodes.append(node)
            todo.extend(ast.iter_child_nodes(node))
    else:
        nodes = list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ablab"):
            if node.module == "ablab":
                found.update(f"ablab.{a.name}" for a in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ablab"))
    return found


def test_every_module_sits_in_a_known_layer() -> None:
    for name in _modules():
        assert _layer(name) >= 0, name


def test_no_module_imports_a_higher_layer() -> None:
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for target in _imports(path, top_level_only=False):
            target = target if target in modules else target.rsplit(".", 1)[0]
            if _layer(target) > _layer(name) and (name, target) not in ALLOWED_UPWARD:
                bad.append(f"{name} -> {target}")
    assert not bad, "upward imports:\n" + "\n".join(sorted(bad))


def test_no_import_cycles_at_import_time() -> None:
    modules = _modules()
    graph = {
        name: {t for t in _imports(path, top_level_only=True) if t in modules and t != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " -> ".join([*trail, node, nxt]))
            if nxt not in state:
                visit(nxt, [*trail, node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_keras_internals_only_behind_the_shim() -> None:
    private = (
        "keras.src",
        "._flatten_layers",
        "._seed_generators",
        "._initializer",
        "._trainable_variables",
        "._non_trainable_variables",
        "._symbolic_build",
        "._update_metrics_variables",
        "._momentums",
        "._velocities",
        "._get_variable_index",
    )
    offenders = [
        f"{path.relative_to(PACKAGE)}: {needle}"
        for path in PACKAGE.rglob("*.py")
        if path.name != "_keras.py"
        for needle in private
        if needle in path.read_text()
    ]
    assert not offenders, offenders


def test_keras_is_in_the_tested_range() -> None:
    import keras
    from packaging.specifiers import SpecifierSet

    from ablab._keras import TESTED_RANGE

    assert keras.__version__ in SpecifierSet(TESTED_RANGE)


LIGHT = """
import sys
from ablab.cli import main
main({argv!r})
heavy = sorted(m for m in ("keras", "jax", "matplotlib") if m in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["show", "--runs-dir", "{tmp}"], ["query", "SELECT 1", "--runs-dir", "{tmp}"]],
)
def test_the_cli_starts_without_keras_jax_or_matplotlib(argv: list[str], tmp_path: Path) -> None:
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = subprocess.run(
        [sys.executable, "-c", LIGHT.format(argv=argv)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_import_ablab_is_light_and_names_resolve_on_use() -> None:
    code = (
        "import sys, ablab; assert 'keras' not in sys.modules and 'jax' not in sys.modules;"
        "ablab.Study; assert 'pydantic' in sys.modules;"
        "print(sorted(set(ablab.__all__) - set(dir(ablab))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]"
