"""The package's shape (issue 17): imports point one way, nobody imports another module's private names,
and importing the package or asking the CLI for help loads no torch.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of a
``wina_convert`` module, at module level and inside functions alike, relative or absolute, plus the lazy
attributes of ``wina_convert/__init__.py`` (``_LAZY``). An edge goes to the module that is named; the
parent packages that Python imports on the way are not edges (a package's ``__init__`` is only an edge
when it is itself imported from, e.g. ``from wina_convert import __version__``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "wina_convert"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package in ``root``."""
    names = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def _base(module: str, path: Path, level: int) -> str:
    """The package a relative import of ``level`` dots in ``module`` starts from."""
    parts = module.split(".")
    if path.name != "__init__.py":
        parts.pop()
    return ".".join(parts[: len(parts) - (level - 1)] if level > 1 else parts)


def imports_of(module: str, path: Path, known: set[str]) -> tuple[set[str], list[str]]:
    """(modules of the package that ``module`` imports, ``from X import _name`` of private names)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    edges: set[str] = set()
    private: list[str] = []

    def add(target: str) -> None:
        while target and target not in known:  # `import wina_convert.a.b` names module a.b
            target = target.rpartition(".")[0]
        if target and target != module:
            edges.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "wina_convert":
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _base(module, path, node.level)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != "wina_convert":
                continue
            for alias in node.names:
                if f"{source}.{alias.name}" in known:  # `from . import launch`: a submodule
                    add(f"{source}.{alias.name}")
                    continue
                add(source)
                name = alias.name
                if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
                    private.append(f"{module}: from {source} import {name}")
        elif isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets):
            for value in ast.walk(node.value):  # the lazy attributes' modules
                if isinstance(value, ast.Constant) and isinstance(value.value, str) and value.value in known:
                    add(value.value)
    return edges, private


def import_graph(root: Path) -> tuple[dict[str, set[str]], list[str]]:
    modules = module_names(root)
    graph, private = {}, []
    for name, path in modules.items():
        graph[name], found = imports_of(name, path, set(modules))
        private += found
    return graph, private


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> ... -> a``) per strongly connected component of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_path_through(graph, sorted(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _path_through(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """A cycle inside ``component`` that starts and ends at its first module (breadth-first)."""
    start, members = component[0], set(component)
    previous = {start: None}
    queue = [start]
    while queue:
        v = queue.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                path = [v]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
            if w not in previous:
                previous[w] = v
                queue.append(w)
    return component


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "wina_convert"


def test_the_checker_finds_cycles_and_private_imports(tmp_path):
    """The checks below can fail: a small package with a cycle through a function-level import, another
    through the lazy table, and a private import, each found."""
    root = _write(tmp_path, {
        "wina_convert/__init__.py": '_LAZY = {"f": ("wina_convert.c", "f")}\n',
        "wina_convert/a.py": "from .sub import b\n",
        "wina_convert/sub/__init__.py": "",
        "wina_convert/sub/b.py": "def f():\n    from ..a import g\n    from wina_convert.sub.d import _hidden\n",
        "wina_convert/sub/d.py": "_hidden = 1\n",
        "wina_convert/c.py": "from . import __version__\n",
    })
    graph, private = import_graph(root)
    assert graph["wina_convert.a"] == {"wina_convert.sub.b"}
    assert graph["wina_convert.sub.b"] == {"wina_convert.a", "wina_convert.sub.d"}
    found = sorted(" -> ".join(c) for c in cycles(graph))
    assert found == ["wina_convert -> wina_convert.c -> wina_convert",
                     "wina_convert.a -> wina_convert.sub.b -> wina_convert.a"]
    assert private == ["wina_convert.sub.b: from wina_convert.sub.d import _hidden"]


def test_the_import_graph_has_no_cycle():
    graph, _ = import_graph(PACKAGE)
    assert len(graph) > 40 and "wina_convert.runtime.kernels.launch" in graph["wina_convert.runtime.kernels.attention"]
    assert cycles(graph) == []


def test_no_module_imports_another_modules_private_names():
    _, private = import_graph(PACKAGE)
    assert private == []


def _modules_loaded(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print(' '.join(sorted(sys.modules)))"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_importing_the_package_loads_no_torch():
    loaded = _modules_loaded("import wina_convert; wina_convert.WinaError; wina_convert.__version__")
    assert "wina_convert" in loaded and "torch" not in loaded and "transformers" not in loaded


def test_cli_help_loads_no_torch():
    for argv in (["--help"], ["convert", "--help"], ["eval", "--help"]):
        loaded = _modules_loaded(f"import contextlib, io\nfrom wina_convert.cli import main\n"
                                 f"with contextlib.redirect_stdout(io.StringIO()):\n    assert main({argv!r}) == 0")
        assert "wina_convert.cli" in loaded and "torch" not in loaded, argv


def test_lazy_attributes_are_the_functions():
    """``wina_convert.convert``/``evaluate`` stay the functions also after their modules are imported."""
    code = ("import wina_convert.convert, wina_convert.evaluate.perplexity, wina_convert\n"
            "assert callable(wina_convert.convert) and wina_convert.convert.__module__ == 'wina_convert.convert'\n"
            "assert wina_convert.evaluate.__module__ == 'wina_convert.evaluate.perplexity'\n"
            "assert wina_convert.load.__module__ == 'wina_convert.runtime.load'\n"
            "assert wina_convert.push.__module__ == 'wina_convert.hub.push'")
    assert "wina_convert.convert" in _modules_loaded(code)


def test_adapters_name_the_classes_transformers_maps_their_configs_to():
    """Each family's adapter imports its decoder-layer and rotary classes itself; they are the ones
    transformers' auto mapping gives for that family's config (what calibration and load build)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from wina_convert.arch import ADAPTERS

    for adapter in ADAPTERS:
        for model_type in adapter.model_types:
            causal_lm, layer, rotary = adapter.model_classes()
            assert causal_lm is AutoModelForCausalLM._model_mapping[type(AutoConfig.for_model(model_type))]
            assert layer.__module__ == rotary.__module__ == causal_lm.__module__
            assert layer.__name__.endswith("DecoderLayer") and rotary.__name__.endswith("RotaryEmbedding")
