"""The layers of the code, kept by a test: each imports only the layers below it, and no modules import each other.

``zoo`` core -> ``finetune`` and ``ensemble`` side by side (neither imports the other) -> ``zoo.pipeline`` ->
``zoo.cli``. Every import counts: at module level, inside functions, ``importlib.import_module`` and ``__import__``
with a literal name. The one exemption is ``zoo/__init__.py``'s ``__getattr__`` (PEP 562), which hands out pipeline
functions lazily as the public Python API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("zoo", "finetune", "ensemble")
# (layer, group): an import may go to a lower layer, or stay inside its own group.
LAYERS = {"core": (0, "core"), "finetune": (1, "finetune"), "ensemble": (1, "ensemble"), "pipeline": (2, "pipeline"),
          "cli": (3, "cli")}
LAZY_API = ("zoo", "__getattr__")  # module, function whose imports may reach up


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("finetune", "ensemble"):
        return parts[0]
    if parts[:2] == ["zoo", "cli"] or module == "zoo.__main__":
        return "cli"
    if parts[:2] == ["zoo", "pipeline"]:
        return "pipeline"
    return "core"


def list_modules(root: Path) -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


UNCHECKABLE = "<a name computed at run time>"


def _dynamic_import(node: ast.Call) -> str | None:
    """The module named by ``importlib.import_module("x")`` or ``__import__("x")``: the literal, or
    ``UNCHECKABLE`` when the name is computed (only the lazy API may do that); None for other calls."""
    func = node.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id in ("import_module", "__import__"))
    if not named:
        return None
    if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
        return node.args[0].value
    return UNCHECKABLE


def module_imports(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, str | None]]:
    """``(imported module, line, enclosing function)`` for every import in ``path`` that names one of ``modules``.

    ``from package import name`` counts as importing ``package.name`` when that is a module, else ``package``.
    """
    is_package = path.name == "__init__.py"
    found = []

    def resolve(name: str | None, level: int) -> str:
        if not level:
            return name or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - (level - 1)]
        return ".".join(base + ([name] if name else []))

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    def visit(node: ast.AST, function: str | None) -> None:
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module, child.level)
                names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in child.names]
            elif isinstance(child, ast.Call) and (dynamic := _dynamic_import(child)):
                names = [dynamic]
            for name in names:
                target = UNCHECKABLE if name == UNCHECKABLE else known(name)
                if target and target != module:
                    found.append((target, child.lineno, function))
            visit(child, inner)

    visit(ast.parse(path.read_text(encoding="utf-8")), None)
    return found


def import_graph(root: Path) -> dict[str, list[tuple[str, int, str | None]]]:
    modules = list_modules(root)
    return {m: module_imports(m, p, modules) for m, p in modules.items()}


def layer_violations(graph) -> list[str]:
    out = []
    for module, imports in graph.items():
        layer, group = LAYERS[layer_of(module)]
        for target, line, function in imports:
            if (module, function) == LAZY_API:
                continue
            if target == UNCHECKABLE:
                out.append(f"{module} (line {line}) imports a module named at run time, which no test can check; import it by name")
                continue
            target_layer, target_group = LAYERS[layer_of(target)]
            if target_group != group and target_layer >= layer:
                out.append(f"{module} (line {line}, layer {layer_of(module)}) imports {target} (layer {layer_of(target)}): "
                           + ("a package beside it" if target_layer == layer else "a layer above it"))
    return out


def find_cycle(graph) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or None; every import counts except the lazy API's."""
    edges = {m: sorted({t for t, _, f in imports if (m, f) != LAZY_API and t != UNCHECKABLE}) for m, imports in graph.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in edges.get(m, ()):
            if state.get(t) == 1:
                return path[path.index(t):] + [t]
            if t not in state and (cycle := visit(t)):
                return cycle
        path.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_the_code_has_no_import_cycle_and_no_import_up_a_layer():
    graph = import_graph(REPO)
    assert {"zoo.data", "finetune.train", "ensemble.fit", "zoo.pipeline.run", "zoo.cli"} <= set(graph)  # it saw the tree
    assert any(f is not None for imports in graph.values() for _, _, f in imports)  # ... and imports inside functions
    assert layer_violations(graph) == []
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _tree(root: Path, files: dict[str, str]) -> dict:
    """A small tree of the three packages with ``files`` written over it; its import graph."""
    empty = ["zoo/__init__.py", "zoo/data.py", "zoo/pipeline/__init__.py", "zoo/pipeline/run.py", "zoo/cli/__init__.py",
             "finetune/__init__.py", "finetune/train.py", "finetune/probe.py", "ensemble/__init__.py", "ensemble/fit.py"]
    _write(root, {**dict.fromkeys(empty, ""), **files})
    return import_graph(root)


def test_the_checker_finds_a_cycle_through_a_function_level_import(tmp_path):
    graph = _tree(tmp_path, {"finetune/train.py": "from finetune.probe import fit\n",
                             "finetune/probe.py": "def f():\n    from finetune import train\n"})
    assert find_cycle(graph) in (["finetune.probe", "finetune.train", "finetune.probe"],
                                 ["finetune.train", "finetune.probe", "finetune.train"])
    assert find_cycle(_tree(tmp_path / "clean", {"finetune/train.py": "from finetune.probe import fit\n"})) is None


def test_the_checker_names_an_import_up_a_layer_or_across_to_a_sibling(tmp_path):
    graph = _tree(tmp_path, {"ensemble/fit.py": "def f():\n    import importlib\n    importlib.import_module('finetune.train')\n",
                             "zoo/data.py": "from zoo.pipeline import run\n",
                             "zoo/pipeline/run.py": "import zoo.cli\nimport finetune.train\n"})
    found = layer_violations(graph)
    assert any(v.startswith("ensemble.fit (line 3") and "imports finetune.train" in v and "beside" in v for v in found)
    assert any(v.startswith("zoo.data") and "imports zoo.pipeline.run" in v and "above" in v for v in found)
    assert any(v.startswith("zoo.pipeline.run") and "imports zoo.cli" in v for v in found)
    assert not any("pipeline.run" in v and "finetune.train" in v for v in found)  # downward: allowed
    assert len(found) == 3


def test_only_the_lazy_public_api_may_reach_up(tmp_path):
    lazy = "import importlib\ndef __getattr__(name):\n    from zoo.pipeline.run import run_zoo\n    return importlib.import_module(name)\n"
    assert layer_violations(_tree(tmp_path / "a", {"zoo/__init__.py": lazy})) == []
    eager = "from zoo.pipeline.run import run_zoo\n"
    assert layer_violations(_tree(tmp_path / "b", {"zoo/__init__.py": eager})) != []
    hidden = "import importlib\ndef load(name):\n    return importlib.import_module(name)\n"
    assert [v for v in layer_violations(_tree(tmp_path / "c", {"finetune/train.py": hidden})) if "named at run time" in v]


def test_import_zoo_does_not_import_torch_and_hands_out_the_api_lazily():
    code = textwrap.dedent("""
        import sys
        import zoo
        assert "torch" not in sys.modules and "zoo.pipeline.run" not in sys.modules
        from zoo.pipeline.run import run_zoo
        assert zoo.run_zoo is run_zoo
        assert all(getattr(zoo, name) is not None for name in zoo.__all__)  # every public name resolves
        try:
            zoo.no_such_name
        except AttributeError as e:
            assert "no_such_name" in str(e)
        else:
            raise AssertionError("an unknown name must raise AttributeError")
        print("lazy")
    """)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "lazy" in done.stdout


@pytest.mark.parametrize("package", ["zoo/pipeline", "finetune", "ensemble", "zoo/cli"])
def test_each_package_says_its_layer(package):
    text = ast.get_docstring(ast.parse((REPO / package / "__init__.py").read_text(encoding="utf-8"))) or ""
    assert "layer" in text.lower(), f"{package}/__init__.py: its docstring does not say which layer it is"
