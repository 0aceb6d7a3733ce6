"""The package boundaries, read from the source with `ast` (no imports run): `quantize` and `athena_runtime` never
import each other except through `athena_runtime.format`, the format package imports nothing else of either, the
server reaches the quantizer only through its application commands, and no first-party file imports itself back
through a cycle (lazy imports inside functions count too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("athena_runtime", "quantize", "server", "bench")
FORMAT = "athena_runtime.format"
# server modules that may import the quantizer: application commands that quantize the embedded default on first use
SERVER_QUANTIZER_ENTRY_POINTS = {
    "server.app",  # `athena serve` without a model: quantize.embedded.default_model_path
    "server.chat_cli",  # `athena chat` without a model: the same
    "server.eval_cli",  # `athena eval ppl`: the reference model's perplexity (quantize.evaluate) and the default
    "server.cli",  # the `athena` console script lists `quantize.cli` as the module of `athena quantize`
}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


def imported_names(path: Path, modules: dict[str, Path], root: Path = ROOT) -> list[str]:
    """First-party modules `path` imports (anywhere in the file): `from a.b import c` names a.b.c when that is a
    module, else a.b; relative imports are resolved against the file's package."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = module_name(path, root)
    package = own if path.name == "__init__.py" else own.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in modules else base)
    return [name for name in found if name.split(".")[0] in PACKAGES or name.split(".")[0] == "tests"]


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    modules = source_modules(root)
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target in imported_names(path, modules, root):
            while target not in modules and "." in target:  # `import a.b.attr`-style names: the module that holds it
                target = target.rpartition(".")[0]
            if (target in modules or target.split(".")[0] == "tests") and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def boundary_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for src, targets in graph.items():
        for dst in targets:
            top_src, top_dst = src.split(".")[0], dst.split(".")[0]
            in_format = src == FORMAT or src.startswith(FORMAT + ".")
            dst_format = dst == FORMAT or dst.startswith(FORMAT + ".")
            if top_dst == "tests":
                bad.append(f"{src} imports {dst}: nothing outside tests/ imports from tests/")
            elif top_src == "athena_runtime" and top_dst == "quantize":
                bad.append(f"{src} imports {dst}: the runtime never imports the quantizer")
            elif top_src == "quantize" and top_dst == "athena_runtime" and not dst_format:
                bad.append(f"{src} imports {dst}: the quantizer imports only {FORMAT} from the runtime")
            elif in_format and not dst_format and top_dst in PACKAGES:
                bad.append(f"{src} imports {dst}: the format package imports nothing outside itself")
            elif top_src == "server" and top_dst == "quantize" and src not in SERVER_QUANTIZER_ENTRY_POINTS:
                bad.append(f"{src} imports {dst}: only {sorted(SERVER_QUANTIZER_ENTRY_POINTS)} reach the quantizer")
    return sorted(bad)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                stack.append((nxt, iter(sorted(graph.get(nxt, ())))))
                path.append(nxt)
    return None


def test_package_boundaries_hold():
    assert boundary_violations(import_graph()) == []


def test_no_import_cycles():
    assert find_cycle(import_graph()) is None


def test_graph_sees_the_edges_it_checks():
    """The walker finds real edges (absolute, relative and lazy imports), so an empty violation list means something."""
    graph = import_graph()
    assert "athena_runtime.format.layers" in graph["athena_runtime.pq_linear"]
    assert "athena_runtime.format.bits" in graph["athena_runtime.format.layers"]
    assert "quantize.embedded" in graph["server.app"]  # a lazy import inside a function


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


@pytest.mark.parametrize(
    "files,expected",
    [
        (
            {"athena_runtime/loader.py": "def f():\n    from quantize.driver import run\n", "quantize/driver.py": ""},
            "the runtime never imports the quantizer",
        ),
        (
            {"quantize/driver.py": "from athena_runtime.engine import LLMEngine\n", "athena_runtime/engine.py": ""},
            "the quantizer imports only",
        ),
        (
            {
                "athena_runtime/format/layers.py": "from ..kernels import layout\n",
                "athena_runtime/kernels/layout.py": "",
            },
            "the format package imports nothing outside itself",
        ),
        ({"server/routes.py": "import quantize.embedded\n", "quantize/embedded.py": ""}, "reach the quantizer"),
        (
            {"bench/diag/x.py": "from tests.tiny_models import tiny\n", "tests/tiny_models.py": ""},
            "nothing outside tests/ imports from tests/",
        ),
    ],
)
def test_boundary_check_fails_on_a_forbidden_import(tmp_path, files, expected):
    _write(tmp_path, files)
    bad = boundary_violations(import_graph(tmp_path))
    assert len(bad) == 1 and expected in bad[0]


def test_boundary_check_allows_the_format_package(tmp_path):
    _write(
        tmp_path,
        {
            "quantize/driver.py": "from athena_runtime.format import checkpoint\n",
            "athena_runtime/format/checkpoint.py": "from .layers import x\n",
            "athena_runtime/format/layers.py": "",
            "server/app.py": "from quantize import embedded\n",
            "quantize/embedded.py": "",
        },
    )
    graph = import_graph(tmp_path)
    assert graph["athena_runtime.format.checkpoint"] == {"athena_runtime.format.layers"}
    assert boundary_violations(graph) == []


def test_cycle_check_finds_a_lazy_cycle(tmp_path):
    _write(
        tmp_path, {"quantize/a.py": "from quantize import b\n", "quantize/b.py": "def f():\n    import quantize.a\n"}
    )
    assert find_cycle(import_graph(tmp_path)) == ["quantize.a", "quantize.b", "quantize.a"]
