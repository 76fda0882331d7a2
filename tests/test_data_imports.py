"""densediff.data has no import cycles, counting function-level imports too (issue #15)."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGES = ("densediff.data", "densediff.testing")


def _modules() -> dict[str, Path]:
    mods = {}
    for f in sorted(SRC.rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        if name.startswith(PACKAGES):
            mods[name] = f
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere (``if TYPE_CHECKING:`` skipped)."""
    graph = {}
    for name, path in mods.items():
        edges: set[str] = set()
        stack = list(ast.parse(path.read_text()).body)
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges.add(full if full in mods else node.module)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
            stack.extend(child for child in ast.iter_child_nodes(node) if isinstance(child, ast.stmt))
        graph[name] = {e for e in edges if e in mods and e != name}
    return graph


def test_data_package_has_no_import_cycles():
    graph = _graph(_modules())
    assert "densediff.data.worlds.raycast" in graph
    state: dict[str, int] = {}  # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            assert state.get(n) != 1, "import cycle: " + " -> ".join(path + [m, n])
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_runtime_modules_do_not_import_the_test_fixtures():
    for name, deps in _graph(_modules()).items():
        if not name.startswith("densediff.testing"):
            assert not any(d.startswith("densediff.testing") for d in deps), name
